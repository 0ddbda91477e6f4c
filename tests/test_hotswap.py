"""Hotswapping hf_lorax adapters gives the directly loaded adapter (case 5 and the fused-slice part of case 3).

The reference is the second adapter loaded directly with ``PeftModel.from_pretrained``. peft's own
``hotswap_adapter`` gets modules with ``rank_pattern`` / ``alpha_pattern`` entries wrong (it matches parameter
names against module patterns, so every module gets ``lora_alpha / r``); :func:`hf_lorax.hotswap_adapter` does not,
and hf_lorax's hook fixes peft's own function for hf_lorax adapters (``tests/test_peft_hotswap.py``).
"""

import copy

import pytest
import torch
from conftest import build_gpt2, randomize_adapters
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

from hf_lorax import LoRAConfig, get_model, hotswap_adapter

CONFIGS = {
    "maps": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], rank_map={"h.1.*": 2},
                 alpha_map={"h.0.attn.c_proj": 2}),
    "slices": dict(r=2, lora_alpha=8, target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}),
    "slices-maps": dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"], fused_slices={"c_attn": ["q", "v"]},
                        rank_map={"h.1.attn.c_attn": 4}),
}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    out = {}
    for kind, kwargs in CONFIGS.items():
        for seed in (1, 2):
            model = get_model(LoRAConfig(task_type="CAUSAL_LM", **kwargs), model=build_gpt2())
            randomize_adapters(model, seed=seed)
            model.save_pretrained(root / f"{kind}-{seed}")
        out[kind] = (root / f"{kind}-1", root / f"{kind}-2")
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hf_lorax_hotswap_equals_direct_load(kind, two_adapters, input_ids):
    first, second = two_adapters[kind]
    direct = _logits(PeftModel.from_pretrained(build_gpt2(), second), input_ids)
    model = PeftModel.from_pretrained(build_gpt2(), first)
    assert not torch.allclose(_logits(model, input_ids), direct)
    hotswap_adapter(model, str(second), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(_logits(model, input_ids), direct, atol=1e-5, rtol=1e-5)
    if kind == "slices":  # equal per-slice rank and alpha everywhere: peft's own hotswap is right too
        model = PeftModel.from_pretrained(build_gpt2(), first)
        peft_hotswap_adapter(model, str(second), adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(_logits(model, input_ids), direct, atol=1e-5, rtol=1e-5)


def test_transformers_load_adapter_hotswap_of_fused_slices(two_adapters, input_ids):
    first, second = two_adapters["slices"]
    direct = _logits(PeftModel.from_pretrained(build_gpt2(), second), input_ids)
    model = build_gpt2()
    model.load_adapter(str(first), adapter_name="default")
    model.load_adapter(str(second), adapter_name="default", hotswap=True)
    torch.testing.assert_close(_logits(model, input_ids), direct, atol=1e-5, rtol=1e-5)


def test_an_adapter_with_a_task_head_is_refused_with_a_clear_error(tmp_path):
    """peft 0.21's hotswap cannot swap modules_to_save (a bare KeyError on the head's parameter): hf_lorax's names it."""
    from conftest import roberta_config
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(roberta_config())
    config = LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"])
    get_model(config, model=copy.deepcopy(base)).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(ValueError, match=r"trains modules in full \(\['classifier', 'score'\].*PeftModel.from_pretrained"):
        hotswap_adapter(model, str(tmp_path / "a"), adapter_name="default", torch_device="cpu")
    with pytest.raises(ValueError, match=r"trains modules in full \(\['classifier', 'score'\].*PeftModel.from_pretrained"):
        peft_hotswap_adapter(model, str(tmp_path / "a"), adapter_name="default", torch_device="cpu")  # peft's own
