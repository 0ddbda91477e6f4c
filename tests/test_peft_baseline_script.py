"""scripts/run_peft_baseline.py: the task harness with the adapter built by plain peft (docs/real_weights.md)."""
# ruff: noqa: F811  (the fixtures imported from test_script_targets are parameters of the tests below)

import json

from peft import PeftModel
from peft.tuners.lora import Linear as PeftLoraLinear
from test_script_targets import _glue, _one_line, glue_dir, tiny_bert  # noqa: F401 (fixtures)

from hf_lorax.layers import LoraLinear
from hf_lorax_paper import experiment
from hf_lorax_paper.tasks.glue import GluePlugin
from scripts.run_peft_baseline import build_peft_model


def test_peft_baseline_trains_plain_peft_lora_with_the_hf_lorax_runs_settings(tiny_bert, glue_dir, tmp_path,
                                                                              monkeypatch):
    assert experiment.main(GluePlugin(), _glue(tiny_bert, glue_dir, tmp_path / "ours")) == 0
    built = []
    monkeypatch.setattr(experiment, "build_model", lambda *a, **k: built.append(build_peft_model(*a, **k)) or built[-1])
    assert experiment.main(GluePlugin(), _glue(tiny_bert, glue_dir, tmp_path / "peft")) == 0
    layers = [m for m in built[0].modules() if isinstance(m, PeftLoraLinear)]
    assert isinstance(built[0], PeftModel) and len(layers) == 4  # query and value of 2 layers: peft's own layers
    assert not any(isinstance(m, LoraLinear) for m in layers)  # none of them hf_lorax's
    ours, peft = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("ours", "peft"))
    config = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 8)
    assert sorted(config["target_modules"]) == ["query", "value"] and "classifier" in config["modules_to_save"]
    assert peft["trainable_params"] == ours["trainable_params"]
    assert abs(peft["train_loss"] - ours["train_loss"]) < 1e-4  # same seed, same init, same batches


def test_peft_baseline_refuses_what_plain_peft_lora_cannot_do(tiny_bert, glue_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "build_model", build_peft_model)
    code = experiment.main(GluePlugin(), _glue(tiny_bert, glue_dir, tmp_path / "out") + ["--method", "dora"])
    assert code == 2 and "plain peft LoRA only (--method lora" in _one_line(capsys)
