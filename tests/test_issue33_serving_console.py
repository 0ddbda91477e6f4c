"""Issue 33: vLLM's required adapter_config.json keys; a readable console with rank utilization on; describe()
of a frozen (reloaded) adapter."""

import copy
import json

import pytest
import torch
from conftest import gpt2_config, randomize_adapters
from engine_reference import EngineRefused, serve
from transformers import (
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_lorax import (
    LoRAConfig,
    RankUtilizationCallback,
    check_serving,
    describe,
    export_adapter,
    get_model,
    serving,
)
from hf_lorax.export.__main__ import main as export_cli

# -- item 1: vLLM requires r, lora_alpha and target_modules -------------------------------------------------


def _adapter_without(key: str, folder):
    """A llama adapter at peft's defaults (r=8, lora_alpha=8, q_proj/v_proj), its config stripped of ``key``:
    peft loads it the same with or without the key; vLLM refuses it without."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = get_model(LoRAConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]), model=copy.deepcopy(base))
    randomize_adapters(model, seed=3)
    model.eval().save_pretrained(folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    del config[key]
    path.write_text(json.dumps(config))
    return base, model


IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("key", "value"), [("lora_alpha", 8), ("r", 8), ("target_modules", ["q_proj", "v_proj"])])
def test_a_config_without_a_key_vllm_requires_fails_the_check_and_export_writes_it(tmp_path, capsys, key, value):
    base, model = _adapter_without(key, tmp_path / "a")
    with pytest.raises(EngineRefused, match=key):  # what vLLM's PEFTHelper does
        serve(base, tmp_path / "a", "vllm")
    report = check_serving(str(tmp_path / "a"), "vllm")
    assert not report.servable_as_is, str(report)
    finding = report.first(serving.MISSING_KEY)
    assert finding.kind == "refused"
    assert f"has no '{key}', which vLLM requires; add \"{key}\": {json.dumps(value)}" in finding.message
    assert "python -m hf_lorax.export SRC DST --engine vllm" in finding.message
    for engine in ("lorax", "tgi", "peft"):  # they read the config through peft's LoraConfig: its defaults
        assert check_serving(str(tmp_path / "a"), engine).servable_as_is, engine
    assert export_cli(["--check", str(tmp_path / "a"), "--engine", "vllm"]) == 1
    assert f"has no '{key}'" in capsys.readouterr().out

    with torch.no_grad():
        ours = model(input_ids=IDS).logits.double()
    for engine in ("vllm", "peft"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / engine), engine)
        written = json.loads((tmp_path / engine / "adapter_config.json").read_text())
        assert {"r", "lora_alpha", "target_modules"} <= written.keys(), engine
        assert check_serving(str(tmp_path / engine), "vllm").servable_as_is, engine
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[key] == value
    with torch.no_grad():
        served = serve(base, tmp_path / "vllm", "vllm")(input_ids=IDS).logits.double()
    assert (served - ours).abs().max() < 1e-5


# -- item 4: the console shows the summary, the reporters everything -----------------------------------------


class Recorder(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _rank_keys(logs: dict) -> set:
    return {k for k in logs if k.startswith("rank_utilization/")}


@pytest.mark.parametrize("disable_tqdm", [True, False])  # PrinterCallback / ProgressCallback
def test_console_shows_the_summary_while_reporters_and_the_json_get_every_key(tmp_path, capsys, disable_tqdm):
    torch.manual_seed(0)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn", "c_proj"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    rows = torch.randint(3, 96, (4, 8)).tolist()
    args = TrainingArguments(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, logging_steps=100,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=disable_tqdm)
    reporter, later = Recorder(), Recorder()  # a reporter (before the printer), and a callback added after it
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                      callbacks=[reporter])
    callback = RankUtilizationCallback(every_n_steps=1, plot=False).attach(trainer)
    trainer.add_callback(later)
    capsys.readouterr()
    trainer.train()

    printed = [line for line in capsys.readouterr().out.splitlines() if "rank_utilization" in line]
    assert len(printed) == 2, printed
    for line in printed:  # the mean, the min and the lowest module; no per-layer / per-type / per-module keys
        assert line.count("rank_utilization/") == 3, line
        assert "rank_utilization/mean" in line and "rank_utilization/min" in line
        assert "rank_utilization/lowest': 'transformer.h." in line
    for recorder in (reporter, later):
        logged = [logs for logs in recorder.seen if "rank_utilization/mean" in logs]
        assert len(logged) == 2
        assert {"rank_utilization/layer/0/mean", "rank_utilization/layer/1/min", "rank_utilization/type/c_attn/min",
                "rank_utilization/module/transformer.h.0.attn.c_attn"} <= _rank_keys(logged[0])
        assert "rank_utilization/lowest" not in logged[0]  # the console's string stays out of the reporters
    history = [h for h in trainer.state.log_history if "rank_utilization/mean" in h]
    assert _rank_keys(history[0]) == _rank_keys(reporter.seen[0]) - {"rank_utilization/lowest"}
    callback.write(str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "rank_utilization.json").read_text())
    assert "rank_utilization/layer/1/mean" in report["history"][0]["summary"]


def test_attaching_twice_keeps_one_console_summary_around_the_printer(tmp_path):
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    args = TrainingArguments(tmp_path / "run", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args)
    callback = RankUtilizationCallback(plot=False)
    callback.attach(trainer)
    callback.attach(trainer)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names[0] == "RankUtilizationCallback" and names.count("ConsoleSummary") == 2
    assert names[names.index("PrinterCallback") - 1] == names[names.index("PrinterCallback") + 1] == "ConsoleSummary"


# -- item 5: describe() of a frozen adapter -------------------------------------------------------------------


def test_describe_of_a_reloaded_adapter_says_inference_mode_and_its_size(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config())
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]), model=copy.deepcopy(base))
    trained = describe(model)
    assert trained.trainable_params > 0 and "; trainable " in trained.summary()
    model.save_pretrained(tmp_path / "a")
    frozen = describe(get_model(str(tmp_path / "a"), model=copy.deepcopy(base), is_trainable=False))
    line = frozen.summary().splitlines()[0]
    assert frozen.trainable_params == 0 and frozen.adapter_params == trained.adapter_params > 0
    pct = 100 * frozen.adapter_params / frozen.total_params
    assert line == (f"adapter 'default': 2 modules, {frozen.adapter_params:,} adapter params ({pct:.4f}% of "
                    f"{frozen.total_params:,}); inference mode (frozen): nothing trainable, load with "
                    "is_trainable=True to train it")
    assert "trainable 0 of" not in str(frozen)
