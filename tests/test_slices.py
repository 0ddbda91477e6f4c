"""Fused-projection slices: paper parameter counts, exact equivalence to a block-structured standard LoRA."""

import copy
import json
import os

import pytest
import torch
from conftest import randomize_adapters
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from hf_lorax import DoRAConfig, LoRAConfig, describe
from hf_lorax.layers import SlicedLoraB


def _qv_config(cls=LoRAConfig, **kw):
    return cls(r=4, lora_alpha=32, target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}, **kw)


@pytest.mark.parametrize(("size", "expected"), [("medium", 393_216), ("large", 737_280)])
def test_trainable_params_equal_the_lora_paper(size, expected):
    dims = {"medium": (1024, 24, 16), "large": (1280, 36, 20)}[size]
    with torch.device("meta"):
        base = GPT2LMHeadModel(GPT2Config(n_embd=dims[0], n_layer=dims[1], n_head=dims[2]))
        model = get_peft_model(base, _qv_config())
    assert describe(model).adapter_params == expected  # B is held dense; only its blocks train
    blocks = sum(m.adapted_entries for m in model.modules() if isinstance(m, SlicedLoraB))
    a = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert a + blocks == expected


def test_slice_output_equals_dense_block_lora(tiny_gpt2, input_ids):
    ours = get_peft_model(copy.deepcopy(tiny_gpt2), _qv_config())
    randomize_adapters(ours)
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer.lora_B["default"], SlicedLoraB)
    dense_B = layer.lora_B["default"].weight
    d = 32
    assert dense_B.shape == (3 * d, 8)
    assert torch.all(dense_B[d : 2 * d] == 0)  # k rows untouched
    assert torch.all(dense_B[:d, 4:] == 0) and torch.all(dense_B[2 * d :, :4] == 0)  # block structure

    reference = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(r=8, lora_alpha=64, target_modules=["c_attn"]))
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [LoRAConfig, DoRAConfig], ids=["lora", "dora"])
def test_saved_slices_load_as_standard_peft(cls, tiny_gpt2, input_ids, tmp_path):
    ours = get_peft_model(copy.deepcopy(tiny_gpt2), _qv_config(cls))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 8 for i in range(2)}
    assert saved["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 64 for i in range(2)}
    assert "fused_slices" not in saved and "rank_map" not in saved
    os.remove(tmp_path / "hf_lorax.json")  # without it, loading is plain peft
    plain = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path)
    assert type(plain.peft_config["default"]) is LoraConfig
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_slices_reload_into_hf_lorax_layers(tiny_gpt2, input_ids, tmp_path):
    ours = get_peft_model(copy.deepcopy(tiny_gpt2), _qv_config(DoRAConfig))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path)
    assert isinstance(again.peft_config["default"], DoRAConfig)
    assert isinstance(again.base_model.model.transformer.h[1].attn.c_attn.lora_B["default"], SlicedLoraB)
    assert describe(again).rows[0].r == 4
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, ours(input_ids).logits, atol=1e-6, rtol=1e-6)


def test_dense_adapter_refuses_to_load_into_slices(tiny_gpt2):
    dense = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(r=8, lora_alpha=64, target_modules=["c_attn"]))
    randomize_adapters(dense)
    ours = get_peft_model(copy.deepcopy(tiny_gpt2), _qv_config())
    state = {k: v for k, v in dense.state_dict().items() if "lora_" in k}
    with pytest.raises(RuntimeError, match="non-zero entries outside the adapted slices"):
        ours.load_state_dict(state, strict=False)


def test_rank_map_applies_per_slice(tiny_gpt2):
    config = _qv_config(rank_map={"h.1.attn.c_attn": 2})
    model = get_peft_model(copy.deepcopy(tiny_gpt2), config)
    rows = {r.module: r for r in describe(model).rows}
    assert rows["transformer.h.0.attn.c_attn"].r == 4 and rows["transformer.h.1.attn.c_attn"].r == 2
    assert rows["transformer.h.1.attn.c_attn"].params == 2 * (2 * 32 + 32 * 2)
    saved = model.peft_config["default"].to_dict()  # the full-module ranks peft builds and reloads: 2 x 4, 2 x 2
    assert {k: saved["rank_pattern"].get(k, saved["r"]) for k in rows} == {"transformer.h.0.attn.c_attn": 8,
                                                                          "transformer.h.1.attn.c_attn": 4}
    assert config.rank_pattern == {} and config.rank_map == {"h.1.attn.c_attn": 2}  # the user's config: untouched


def test_a_short_rank_pattern_key_beside_sliced_modules_saves_and_reloads(tiny_gpt2, input_ids, tmp_path):
    """peft writes adapter_config.json with sorted keys and takes the first key that matches: a short user key
    ("c_attn") would come before the exact entry of the sliced module and give it the wrong rank on reload."""
    from hf_lorax import get_model

    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], rank_pattern={"c_attn": 2},
                        fused_slices={"h.0.attn.c_attn": ["q", "v"]}, task_type="CAUSAL_LM")
    model = get_model(config, copy.deepcopy(tiny_gpt2))
    randomize_adapters(model)
    model.eval().save_pretrained(tmp_path / "a")
    expected = model(input_ids).logits
    for loaded in (get_model(str(tmp_path / "a"), copy.deepcopy(tiny_gpt2), is_trainable=False),
                   PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), tmp_path / "a")):
        ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in loaded.named_modules()
                 if n.endswith("attn.c_attn") and hasattr(m, "r")}
        assert ranks == {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 2}  # q, v at 2 each
        assert torch.allclose(loaded(input_ids).logits, expected, atol=1e-6)


def test_explicit_layout_for_other_fused_modules(tiny_gpt2):
    config = LoRAConfig(r=2, target_modules=["c_fc"], fused_slices={"c_fc": {"layout": ["a", "b"], "adapt": ["b"]}})
    model = get_peft_model(copy.deepcopy(tiny_gpt2), config)
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    mask = layer.lora_B["default"].slice_mask
    assert mask.shape == (128, 2) and mask[64:].all() and not mask[:64].any()
