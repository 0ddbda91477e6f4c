"""merge / unmerge / merge_and_unload keep the function (fp32, 1e-5) for LoRA, DoRA, slices, embeddings."""

import copy

import pytest
import torch
from conftest import randomize_adapters
from peft import get_peft_model

from hf_lorax import DoRAConfig, LoRAConfig

CONFIGS = {
    "lora-linear": (LoRAConfig, dict(target_modules=["query", "value", "word_embeddings"]), "tiny_roberta"),
    "dora-linear": (DoRAConfig, dict(target_modules=["query", "value", "word_embeddings"]), "tiny_roberta"),
    "lora-conv1d": (LoRAConfig, dict(target_modules=["c_attn", "c_proj"]), "tiny_gpt2"),
    "dora-conv1d": (DoRAConfig, dict(target_modules=["c_attn", "c_proj"]), "tiny_gpt2"),
    "lora-slices": (LoRAConfig, dict(target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}), "tiny_gpt2"),
    "dora-slices": (DoRAConfig, dict(target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}), "tiny_gpt2"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_merge_unmerge_and_unload(case, request, input_ids):
    cls, kwargs, fixture = CONFIGS[case]
    base = request.getfixturevalue(fixture)
    model = get_peft_model(copy.deepcopy(base), cls(r=4, lora_alpha=8, **kwargs))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert not torch.equal(base(input_ids).logits, expected)  # the adapter did change the function


def test_safe_merge(tiny_gpt2, input_ids):
    model = get_peft_model(copy.deepcopy(tiny_gpt2), DoRAConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        merged = model.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
