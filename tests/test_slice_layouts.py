"""Fused-slice row sets follow each architecture's own q/k/v split (interleaved, multi-query, grouped-query).

Checked through the model's behaviour, not through hf_lorax's arithmetic: adapting only ``v`` must leave the first
layer's attention probabilities unchanged (they depend on q and k only) while changing the output; adapting ``q``
must change them.
"""

import copy

import pytest
import torch
from conftest import randomize_adapters
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTNeoXConfig,
    MptConfig,
    Phi3Config,
)

from hf_lorax import LoRAConfig

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MODELS = {
    "gpt2": ("c_attn", lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("query_key_value", lambda: GPTNeoXConfig(**SMALL, intermediate_size=64, max_position_embeddings=64)),
    "phi3": ("qkv_proj", lambda: Phi3Config(**SMALL, num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=64, pad_token_id=0)),
    "gpt_bigcode": ("c_attn", lambda: GPTBigCodeConfig(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                      multi_query=True)),
    "falcon-grouped": ("query_key_value", lambda: FalconConfig(**SMALL, num_kv_heads=2, new_decoder_architecture=True)),
    "falcon-mqa": ("query_key_value", lambda: FalconConfig(**SMALL, multi_query=True, new_decoder_architecture=False)),
    "bloom": ("query_key_value", lambda: BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)),
    "mpt": ("Wqkv", lambda: MptConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
}


def _run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return out.logits, out.attentions


@pytest.mark.parametrize("arch", list(MODELS))
def test_value_slice_leaves_attention_probabilities_alone(arch):
    suffix, make = MODELS[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
    ids = torch.randint(3, 96, (2, 10))
    base_logits, base_attn = _run(base, ids)
    for part, attention_changes in (("v", False), ("q", True)):
        model = get_peft_model(copy.deepcopy(base), LoRAConfig(r=2, target_modules=[suffix],
                                                               fused_slices={suffix: [part]}))
        randomize_adapters(model, seed=5)
        model.eval()
        logits, attn = _run(model, ids)
        assert (logits - base_logits).abs().max() > 1e-4, (arch, part)
        changed = float((attn[0] - base_attn[0]).abs().max())  # the first layer: its input is the base model's
        assert (changed > 1e-4) == attention_changes, (arch, part, changed)


@pytest.mark.parametrize("arch", list(MODELS))
def test_plain_peft_loads_the_saved_dense_form_exactly(arch, tmp_path):
    """Saved, a q/v-slice adapter is a standard LoRA with a block-structured B: plain peft (the folder without
    hf_lorax.json, so nothing of hf_lorax's reads it) rebuilds the same function."""
    import os

    from peft import PeftModel

    suffix, make = MODELS[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make()).eval()
    ids = torch.randint(3, 96, (2, 10))
    model = get_peft_model(copy.deepcopy(base), LoRAConfig(r=2, target_modules=[suffix], fused_slices={suffix: ["q", "v"]}))
    randomize_adapters(model, seed=3)
    model.eval()
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "hf_lorax.json")
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(plain.peft_config["default"]).__name__ == "LoraConfig"
    with torch.no_grad():
        expected, actual, untouched = model(input_ids=ids).logits, plain(input_ids=ids).logits, base(input_ids=ids).logits
    assert (expected - untouched).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_each_slice_equals_its_own_projection_carved_from_the_weights(arch):
    """The fused module's q rows (and v rows) equal a separate projection carved from the same weight rows, adapted
    with that slice's own factors: slice i is ``W[rows_i] x + s·B_i A_i x`` with ``A_i`` the i-th r rows of ``A``."""
    suffix, make = MODELS[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make()).eval()
    model = get_peft_model(base, LoRAConfig(r=2, target_modules=[suffix], fused_slices={suffix: ["q", "v"]}))
    randomize_adapters(model, seed=4)
    name, layer = next((n, m) for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "slice_specs"))
    spec, base_layer = layer.slice_specs["default"], layer.get_base_layer()
    weight = base_layer.weight.T if layer.fan_in_fan_out else base_layer.weight  # (out, in)
    bias = getattr(base_layer, "bias", None)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(3, weight.shape[1])
    with torch.no_grad():
        fused = layer(x)
        for i, rows in enumerate(spec.rows(weight.shape[0], name)):
            carved = torch.nn.Linear(weight.shape[1], len(rows), bias=bias is not None)
            carved.weight.copy_(weight[rows])
            if bias is not None:
                carved.bias.copy_(bias[rows])
            a, b = A[i * 2:(i + 1) * 2], B[rows, i * 2:(i + 1) * 2]
            torch.testing.assert_close(fused[:, rows], carved(x) + s * (x @ a.T) @ b.T, atol=1e-5, rtol=1e-5)
            assert (s * (x @ a.T) @ b.T).abs().max() > 1e-3  # the slice's adapter is really there
