"""Bad input that used to give a traceback deep in torch, or a silently wrong result: now an error naming it.

Adapter folders (factor shapes, a missing tensor, a config that does not fit its weights, a config read the way
peft reads it), labels that do not fit the tokens, ``set_fused_path``'s setting.
"""

import json
import re

import pytest
import torch
from conftest import gpt2_config
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_export import tiny_llama, trained
from transformers import GPT2LMHeadModel

from hf_lorax import LoRAConfig, check_serving, export_adapter, get_model, read_adapter_folder
from hf_lorax.export.__main__ import main as export_main
from hf_lorax.layers import set_fused_path
from hf_lorax.serving import MISSING_KEY

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs") / "a"
    trained(tiny_llama(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), folder)
    return folder


def _copy_with(saved, tmp_path, tensors=None, config=None):
    folder = tmp_path / "broken"
    folder.mkdir()
    weights = load_file(saved / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    raw = json.loads((saved / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config(raw) if config else raw))
    return folder


def _drop_b(weights):
    del weights[B_KEY]
    return weights


def _rank_8_b(weights):
    weights[B_KEY] = torch.zeros(weights[B_KEY].shape[0], 8)
    return weights


def _vector_b(weights):
    weights[B_KEY] = weights[B_KEY][:, 0].contiguous()
    return weights


@pytest.mark.parametrize(("tensors", "config", "match"), [
    (_drop_b, None, rf"holds {A_KEY} but not {B_KEY}: the file is incomplete"),
    (_vector_b, None, rf"{B_KEY} has shape \[32\]; a LoRA factor is a matrix"),  # was a bare IndexError
    (_rank_8_b, None, rf"{A_KEY} has rank 4 \(shape \[4, 32\]\) but .*lora_B.weight has rank 8 \(shape \[32, 8\]\)"),
    (None, lambda c: {**c, "r": 8}, rf"{A_KEY} has rank 4, but adapter_config.json gives .*q_proj rank 8"),
])
def test_a_broken_folder_is_refused_naming_the_tensor(saved, tmp_path, capsys, tensors, config, match):
    folder = _copy_with(saved, tmp_path, tensors, config)
    with pytest.raises(ValueError, match=match):
        read_adapter_folder(str(folder))
    with pytest.raises(ValueError, match=match):
        check_serving(str(folder), "vllm")
    with pytest.raises(ValueError, match=match):
        export_adapter(str(folder), str(tmp_path / "out"), "vllm")
    assert not (tmp_path / "out").exists()
    assert export_main(["--check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and A_KEY.removesuffix(".lora_A.weight") in err


def test_a_config_without_lora_alpha_is_read_with_peft_default(saved, tmp_path):
    folder = _copy_with(saved, tmp_path, config=lambda c: {k: v for k, v in c.items() if k != "lora_alpha"})
    parsed = read_adapter_folder(str(folder))
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert parsed.config["lora_alpha"] == peft_model.peft_config["default"].lora_alpha == 8
    assert parsed.modules[0].scaling == q_proj.scaling["default"] == 2.0
    assert check_serving(str(folder), "lorax").servable_as_is  # LoRAX reads it through peft: the same default
    assert check_serving(str(folder), "vllm").first(MISSING_KEY).kind == "refused"  # vLLM requires the key (issue 33)
    export_adapter(str(folder), str(tmp_path / "out"), "vllm")  # the peft default is written out explicitly
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 4  # scaling baked into B


def test_logits_free_loss_names_both_shapes():
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config())).train()
    ids = torch.randint(0, 64, (2, 10))
    with pytest.raises(ValueError, match=r"labels have shape \(2, 9\), but the hidden states .* have shape \(2, 10\)"):
        model(input_ids=ids, labels=ids[:, 1:])
    assert model(input_ids=ids, labels=ids).loss.isfinite()


@pytest.mark.parametrize("setting", ["false", "true", 0, 1, "", [True], None])
def test_set_fused_path_takes_exactly_true_false(setting):
    model = get_model(LoRAConfig(r=2, target_modules=["c_attn"]), model=GPT2LMHeadModel(gpt2_config()))
    with pytest.raises(TypeError, match=r"enabled must be True or False, got " + re.escape(repr(setting))):
        set_fused_path(model, setting)
    layers = [m for m in model.modules() if hasattr(m, "use_fused_path")]
    assert layers and all(m.use_fused_path is False for m in layers)  # nothing changed
    for value in (True, False):
        assert set_fused_path(model, value) == len(layers)
        assert all(m.use_fused_path is value for m in layers)


def test_every_reader_of_a_folder_refuses_a_missing_factor(saved, tmp_path):
    """get_model would otherwise load the missing lora_B as zeros: an adapter that silently does nothing."""
    from hf_lorax import push_adapter

    folder = _copy_with(saved, tmp_path, _drop_b)
    with pytest.raises(ValueError, match=rf"holds {A_KEY} but not {B_KEY}"):
        get_model(str(folder), model=tiny_llama())
    with pytest.raises(ValueError, match=rf"holds {A_KEY} but not {B_KEY}"):
        push_adapter(str(folder), "me/x", dry_run=True)


def test_damaged_json_beside_an_adapter_is_named(saved, tmp_path):
    from hf_lorax import write_model_card

    folder = _copy_with(saved, tmp_path)
    (folder / "results.json").write_text('{"metrics": {"accuracy": 0.9')
    with pytest.raises(ValueError, match=r"results.json is not valid JSON"):
        write_model_card(str(folder))


def test_base_weights_that_do_not_fit_the_adapter_are_named(saved):
    from hf_lorax.analysis.report import updates_from_adapter_dir

    with pytest.raises(ValueError, match=r"q_proj has shape \(5, 5\), the adapter's update \(32, 32\)"):
        updates_from_adapter_dir(str(saved), {"model.layers.0.self_attn.q_proj": torch.zeros(5, 5)})


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=float("nan")), "lr=nan must be a finite number > 0"), (dict(lr=0.0), "lr=0.0 must be"),
    (dict(lr=1e-3, loraplus_lr_ratio=float("nan")), "loraplus_lr_ratio=nan"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay=-0.1"),
])
def test_loraplus_numbers_are_checked(kwargs, match):
    from hf_lorax import create_loraplus_optimizer

    model = get_model(LoRAConfig(r=2, target_modules=["c_attn"]), model=GPT2LMHeadModel(gpt2_config()))
    with pytest.raises(ValueError, match=match):
        create_loraplus_optimizer(model, **kwargs)


@pytest.mark.parametrize(("argv", "message"), [(["--epochs", "-1"], "error: --epochs -1.0: must be a finite number > 0."),
                                               (["--train_size", "0"], "error: --train_size 0: must be a whole number >= 1.")])
def test_demo_numbers_are_checked(argv, message, capsys):
    from hf_lorax_paper.demo import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == message + "\n"


def test_analysis_base_model_that_cannot_give_every_norm_is_one_line(saved, tmp_path, capsys):
    from hf_lorax.analysis.__main__ import main as analysis_main

    empty = tmp_path / "empty_base"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    assert analysis_main([str(saved), "--base_model", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --base_model '{empty}' holds no .safetensors weights.")
    other = tmp_path / "other_base"  # a base without the adapted modules: each ‖ΔW‖/‖W‖ would read "-"
    GPT2LMHeadModel(gpt2_config()).save_pretrained(other)
    capsys.readouterr()  # transformers' own save progress
    assert analysis_main([str(saved), "--base_model", str(other), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the base weights hold no weight for model.layers.0.self_attn.q_proj" in err


@pytest.mark.parametrize("smoothing", [-0.1, 1.5, float("nan")])
def test_targeted_loss_label_smoothing_is_checked(tmp_path, smoothing):
    from transformers import TrainingArguments

    from hf_lorax import TargetedLossTrainer

    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    with pytest.raises(ValueError, match=r"label_smoothing_factor=.* must be in \[0, 1\]"):
        TargetedLossTrainer(model=model, args=TrainingArguments(str(tmp_path), label_smoothing_factor=smoothing,
                                                                use_cpu=True, report_to=[]))


def test_analysis_keeps_a_training_runs_history(saved, tmp_path, capsys):
    import shutil

    from hf_lorax.analysis.__main__ import main as analysis_main

    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    history = {"history": [{"step": 10, "summary": {}}], "modules": []}
    (folder / "rank_utilization.json").write_text(json.dumps(history))
    assert analysis_main([str(folder)]) == 2
    assert "holds the training run's rank-utilization history" in capsys.readouterr().err
    assert json.loads((folder / "rank_utilization.json").read_text()) == history  # untouched
    assert analysis_main([str(folder), "--output_dir", str(tmp_path / "o")]) == 0
    assert analysis_main([str(folder), "--overwrite"]) == 0
    assert json.loads((folder / "rank_utilization.json").read_text())["history"] == []


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(every_n_steps=0), "every_n_steps=0 must be a positive integer"),
    (dict(every_n_steps=True), "every_n_steps=True must be a positive integer"),
    (dict(every_n_steps=2.5), "every_n_steps=2.5"), (dict(threshold=0), r"threshold=0 must be in \(0, 1\]"),
    (dict(threshold=float("nan")), "threshold=nan"), (dict(threshold=True), "threshold=True"),
])
def test_rank_utilization_callback_numbers_are_checked(kwargs, match):
    from hf_lorax import RankUtilizationCallback

    with pytest.raises(ValueError, match=match):
        RankUtilizationCallback(**kwargs)


@pytest.mark.parametrize("threshold", ["1.5", "0", "nan"])
def test_analysis_threshold_is_one_line(saved, threshold, capsys):
    from hf_lorax.analysis.__main__ import main as analysis_main

    assert analysis_main([str(saved), "--threshold", threshold]) == 2
    assert capsys.readouterr().err == f"error: --threshold {float(threshold)} must be in (0, 1].\n"
