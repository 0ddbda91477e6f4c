"""Saved adapters are standard peft LoRA: plain peft (no hf_lorax import) reproduces the logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification

from hf_lorax import DoRAConfig, LoRAConfig, get_model
from hf_lorax.layers import LoraLinear

PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_lorax"] = None  # any attempt to import hf_lorax fails
    import torch, transformers
    from peft import PeftModel
    for case in json.load(open(sys.argv[1])):
        base = getattr(transformers, case["auto"]).from_pretrained(case["base"])
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        with torch.no_grad():
            torch.save(model(torch.load(case["ids"])).logits, case["out"])
    print("ok")
    """
)


def _save_base(model, path):
    model.save_pretrained(path)
    return str(path)


CASES = {
    "lora-rankmap-roberta": (
        "roberta",
        lambda base: LoRAConfig(base_model_name_or_path=base, task_type="SEQ_CLS", num_labels=2, r=4,
                                target_modules=["query", "value"],
                                rank_map={"layer.{0-0}.attention.self.query": 8, "layer.1.*": 2},
                                alpha_map={"layer.1.*": 4}),
    ),
    "dora-roberta": (
        "roberta",
        lambda base: DoRAConfig(base_model_name_or_path=base, task_type="SEQ_CLS", num_labels=2, r=4,
                                lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1),
    ),
    "lora-slices-gpt2": (
        "gpt2",
        lambda base: LoRAConfig(base_model_name_or_path=base, task_type="CAUSAL_LM", r=4, lora_alpha=32,
                                target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}),
    ),
    "dora-slices-rankmap-gpt2": (
        "gpt2",
        lambda base: DoRAConfig(base_model_name_or_path=base, task_type="CAUSAL_LM", r=4, lora_alpha=32,
                                target_modules=["c_attn", "c_proj"], fused_slices={"c_attn": ["q", "v"]},
                                rank_map={"h.1.*": 2}),
    ),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    return {
        "roberta": _save_base(RobertaForSequenceClassification(roberta_config()), root / "roberta"),
        "gpt2": _save_base(GPT2LMHeadModel(gpt2_config()), root / "gpt2"),
    }


def test_plain_peft_in_a_fresh_process_reproduces_logits(bases, tmp_path, input_ids):
    cases, expected = [], {}
    for name, (arch, make_config) in CASES.items():
        model = get_model(make_config(bases[arch]))
        randomize_adapters(model, seed=len(name))
        model.eval()
        adapter = tmp_path / name
        model.save_pretrained(adapter)
        with torch.no_grad():
            expected[name] = model(input_ids).logits
        torch.save(input_ids, tmp_path / "ids.pt")
        auto = "AutoModelForSequenceClassification" if arch == "roberta" else "AutoModelForCausalLM"
        cases.append({"auto": auto, "base": bases[arch], "adapter": str(adapter), "ids": str(tmp_path / "ids.pt"),
                      "out": str(tmp_path / f"{name}.pt")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "plain.py").write_text(PLAIN_PEFT_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(tmp_path / "cases.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in CASES:
        actual = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(actual, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_saved_config_has_exact_rank_pattern(bases, tmp_path):
    model = get_model(CASES["lora-rankmap-roberta"][1](bases["roberta"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    prefix = "roberta.encoder.layer"
    assert saved["rank_pattern"] == {
        f"{prefix}.0.attention.self.query": 8,
        f"{prefix}.1.attention.self.query": 2,
        f"{prefix}.1.attention.self.value": 2,
    }
    assert saved["alpha_pattern"] == {f"{prefix}.1.attention.self.query": 4, f"{prefix}.1.attention.self.value": 4}
    assert "classifier" in saved["modules_to_save"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.classifier.out_proj.weight" in keys  # the task head is saved with the adapter
    sidecar = json.loads((tmp_path / "hf_lorax.json").read_text())
    assert sidecar["config_class"] == "LoRAConfig" and sidecar["num_labels"] == 2
    assert sidecar["rank_map"] == {"layer.{0-0}.attention.self.query": 8, "layer.1.*": 2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_get_model_reloads_the_adapter(name, bases, tmp_path, input_ids):
    arch, make_config = CASES[name]
    model = get_model(make_config(bases[arch]))
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    again = get_model(str(tmp_path), is_trainable=False)
    assert type(again.peft_config["default"]) is type(model.peft_config["default"])
    assert any(isinstance(m, LoraLinear) for m in again.modules())
    assert not any(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=1e-6)
    trainable = get_model(str(tmp_path))
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_auto_peft_model_loads_hf_lorax_adapter(bases, tmp_path, input_ids):
    model = get_model(CASES["dora-roberta"][1](bases["roberta"]))
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    again = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert isinstance(again.peft_config["default"], DoRAConfig)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=1e-6)


def test_transformers_add_adapter_save_and_load_adapter(bases, tmp_path, input_ids):
    model = RobertaForSequenceClassification.from_pretrained(bases["roberta"]).eval()
    model.add_adapter(DoRAConfig(r=4, target_modules=["query", "value"], rank_map={"layer.1.*": 2}))
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "hf_lorax.json").exists()
    fresh = RobertaForSequenceClassification.from_pretrained(bases["roberta"]).eval()
    fresh.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    fresh.set_adapter("default")


def test_peft_model_from_pretrained_without_sidecar_is_plain_peft(bases, tmp_path, input_ids):
    model = get_model(CASES["lora-slices-gpt2"][1](bases["gpt2"]))
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "hf_lorax.json").unlink()
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(bases["gpt2"]), tmp_path).eval()
    assert not any(isinstance(m, LoraLinear) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=1e-5)
