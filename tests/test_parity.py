"""hf_lorax layers compute the same function as peft's, given the same weights (fp32, 1e-5)."""

import copy

import pytest
import torch
from conftest import randomize_adapters
from peft import LoraConfig, get_peft_model

from hf_lorax import DoRAConfig, LoRAConfig
from hf_lorax.layers import LoraEmbedding, LoraLinear, dora_row_norm

CASES = {
    "gpt2": (["c_attn", "c_proj", "c_fc"], "tiny_gpt2"),
    "roberta": (["query", "value", "dense"], "tiny_roberta"),
}


def _pair(base, targets, dora, dropout, **extra):
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, lora_dropout=dropout, **extra),
    )
    cls = DoRAConfig if dora else LoRAConfig
    ours = get_peft_model(copy.deepcopy(base), cls(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **extra))
    randomize_adapters(peft_model)
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return peft_model, ours


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_eval_outputs_match_peft(arch, dora, dropout, request, input_ids):
    targets, fixture = CASES[arch]
    peft_model, ours = _pair(request.getfixturevalue(fixture), targets, dora, dropout)
    assert any(isinstance(m, LoraLinear) for m in ours.modules())
    peft_model.eval()
    ours.eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        actual = ours(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_gradients_match_peft(arch, dora, request, input_ids):
    targets, fixture = CASES[arch]
    peft_model, ours = _pair(request.getfixturevalue(fixture), targets, dora, 0.0)
    grads = []
    for model in (peft_model, ours):
        model.train()
        torch.manual_seed(0)
        model(input_ids).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_lora_training_with_dropout_matches_peft(arch, request, input_ids):
    """The fast LoRA path (scaling applied to ``A x``) draws the same dropout masks and gives peft's grads."""
    targets, fixture = CASES[arch]
    peft_model, ours = _pair(request.getfixturevalue(fixture), targets, False, 0.1)
    outputs, grads = [], []
    for model in (peft_model, ours):
        model.train()
        torch.manual_seed(0)
        logits = model(input_ids).logits
        logits.float().pow(2).mean().backward()
        outputs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_embedding_matches_peft(dora, tiny_roberta, input_ids):
    peft_model, ours = _pair(tiny_roberta, ["word_embeddings", "query"], dora, 0.0)
    assert any(isinstance(m, LoraEmbedding) for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_rslora_and_gaussian_init_match_peft(tiny_gpt2, input_ids):
    peft_model, ours = _pair(tiny_gpt2, ["c_attn"], False, 0.0, use_rslora=True, init_lora_weights="gaussian")
    assert ours.base_model.model.transformer.h[0].attn.c_attn.scaling["default"] == pytest.approx(8 / 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_factorized_dora_norm_equals_dense_norm():
    torch.manual_seed(0)
    W, A, B = torch.randn(48, 40), torch.randn(6, 40), torch.randn(48, 6)
    dense = torch.linalg.norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(dora_row_norm(W, A, B, 0.7, W.pow(2).sum(1)), dense, atol=1e-5, rtol=1e-5)


def test_dora_norm_cache_follows_weight_changes(tiny_gpt2, input_ids):
    model = get_peft_model(tiny_gpt2, DoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    randomize_adapters(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        model(input_ids)
        layer.base_layer.weight.mul_(2.0)  # in-place change of the frozen weight
        fresh = layer.lora_variant["default"].weight_norm(layer, "default")
        W = layer.base_layer.weight.T
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = torch.linalg.norm(W + layer.scaling["default"] * B @ A, dim=1)
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_and_shift_gradients(with_bias):
    from hf_lorax.layers.dora import ScaleAndShift

    c = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    n = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (c, n, b)
    assert torch.autograd.gradcheck(ScaleAndShift.apply, inputs)
