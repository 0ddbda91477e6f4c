"""The fused node (:mod:`hf_lorax.layers.fused`): one autograd node per adapted linear, equal to peft's forward.

Each case runs the same model twice from the same seed, fused node on and off (off: peft's forward), and compares the
loss, every adapter gradient and the input gradient: float32 to round-off, bfloat16 autocast to bf16 tolerance.
Dropout draws the same mask in both (``native_dropout`` draws ``F.dropout``'s mask on CPU), so training-mode steps
compare too.
"""

import copy

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from torch import nn
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, get_model
from hf_lorax.layers import set_fused_path
from hf_lorax.layers.fused import fused_lora_linear

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
GPT2_CASES = {
    "lora-dropout": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, lora_dropout=0.1),
    "lora-slices-rank-map": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS,
                                               fused_slices={"c_attn": ["q", "v"]}, rank_map={"h.1.*": 8}),
    "lora-trained-bias": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, bias="all"),
    "dora-dropout-slices": lambda: DoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS,
                                              lora_dropout=0.1, fused_slices={"c_attn": ["q", "v"]}),
}


def _grads(model, batch, autocast: torch.dtype | None = None):
    torch.manual_seed(7)  # the same dropout masks in both runs
    model.train()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return float(loss), grads


def _assert_same_step(fused, plain, batch, autocast=None, rel=1e-6, rtol=1e-4, atol=1e-6):
    """One training step of each from the same seed: equal loss, the same adapter gradients (float32 ones)."""
    loss_f, grads_f = _grads(fused, batch, autocast)
    loss_p, grads_p = _grads(plain, batch, autocast)
    assert loss_f == pytest.approx(loss_p, rel=rel)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name in grads_f:
        assert grads_f[name].dtype == grads_p[name].dtype == torch.float32, name
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=rtol, atol=atol, msg=name)


def _pair(config, base):
    fused = get_model(config, model=copy.deepcopy(base))
    plain = get_model(copy.deepcopy(config), model=copy.deepcopy(base))
    for m in (fused, plain):
        randomize_adapters(m, seed=1)
    assert set_fused_path(fused, True) == set_fused_path(plain, False) > 0
    return fused, plain


def _count_fused_nodes(model, batch) -> int:
    seen = []
    model.train()
    loss = model(**batch).loss
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if type(node).__name__ == "FusedLoraLinearBackward":
            seen.append(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_fused_equals_plain_float32(case, input_ids):
    torch.manual_seed(0)
    fused, plain = _pair(GPT2_CASES[case](), GPT2LMHeadModel(gpt2_config()))
    batch = {"input_ids": input_ids, "labels": input_ids}
    assert _count_fused_nodes(fused, batch) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert _count_fused_nodes(plain, batch) == 0
    _assert_same_step(fused, plain, batch)


def test_roberta_fused_equals_plain_under_bf16_autocast():
    torch.manual_seed(0)
    config = LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=8, target_modules=["query", "value", "dense"],
                        lora_dropout=0.1)
    fused, plain = _pair(config, RobertaForSequenceClassification(roberta_config()))
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 1, 0])}
    # bf16 GEMMs on both sides, summed in different orders
    _assert_same_step(fused, plain, batch, autocast=torch.bfloat16, rel=2e-2, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_4bit_fused_equals_plain(tmp_path, use_dora, compute_dtype, input_ids):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_embd=64)).save_pretrained(tmp_path)
    config = QLoRAConfig(base_model_name_or_path=str(tmp_path), task_type="CAUSAL_LM", r=4, lora_dropout=0.1,
                         target_modules=GPT2_TARGETS, compute_dtype=compute_dtype, use_dora=use_dora)
    fused, plain = get_model(config), get_model(copy.deepcopy(config))
    for m in (fused, plain):
        randomize_adapters(m, seed=1)
    set_fused_path(fused, True)
    set_fused_path(plain, False)
    batch = {"input_ids": input_ids, "labels": input_ids}
    assert _count_fused_nodes(fused, batch) == 8
    if compute_dtype == "float32":
        _assert_same_step(fused, plain, batch, rel=1e-5)
    else:
        _assert_same_step(fused, plain, batch, rel=2e-2, rtol=5e-2, atol=5e-3)


def test_the_node_is_exact_in_float64():
    """gradcheck of the node itself (no dropout), DoRA's rescale, a trained bias and a dequantising weight source."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(grad)

    x, weight, bias, A, B, scale = t(3, 5, 7), t(6, 7, grad=False), t(6), t(2, 7), t(6, 2), t(6)
    for w in (weight, lambda: weight):
        for norm_scale in (None, scale):
            torch.autograd.gradcheck(
                lambda x, bias, A, B, n, w=w: fused_lora_linear(x, w, bias, A, B, 0.5, 0.0, n), (x, bias, A, B, norm_scale)
            )
    reference = ((x @ weight.T + 0.5 * (x @ A.T) @ B.T) * scale + bias)
    torch.testing.assert_close(fused_lora_linear(x, weight, bias, A, B, 0.5, 0.0, scale), reference)


def test_a_trainable_base_weight_is_refused_by_the_node_and_keeps_the_plain_path(input_ids):
    x, w = torch.randn(2, 4), nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="base weight"):
        fused_lora_linear(x, w, None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
    torch.manual_seed(0)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    set_fused_path(model, True)
    model.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight.requires_grad_(True)
    assert _count_fused_nodes(model, {"input_ids": input_ids, "labels": input_ids}) == 1  # layer 1 only


def test_the_node_is_opt_in(input_ids):
    """Off by default on every device (no GPU run has measured it faster yet); set_fused_path turns it on and off."""
    torch.manual_seed(0)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS),
                      model=GPT2LMHeadModel(gpt2_config()))
    batch = {"input_ids": input_ids, "labels": input_ids}
    assert _count_fused_nodes(model, batch) == 0
    if torch.cuda.is_available():
        assert _count_fused_nodes(model.cuda(), {k: v.cuda() for k, v in batch.items()}) == 0
        model.cpu()
    set_fused_path(model, True)
    assert _count_fused_nodes(model, batch) == 8
    set_fused_path(model, False)
    assert _count_fused_nodes(model, batch) == 0


def _saved_bytes(model, batch, autocast: bool) -> int:
    """Bytes of distinct tensor storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad()
    return sum(storages.values())


@pytest.mark.parametrize(("dropout", "autocast", "at_most"), [(0.0, False, 1.0), (0.0, True, 0.85), (0.1, False, 1.01)])
def test_fused_layers_keep_fewer_activations(dropout, autocast, at_most):
    """float32 without dropout: both keep the same x. Under autocast the plain path keeps two bf16 copies of x
    per layer (the base linear's and lora_A's), the fused one; with dropout both draw from ``native_dropout``
    and keep a bool mask (the plain path its dropped x, the fused one x; within one mask of each other)."""
    torch.manual_seed(0)
    config = LoRAConfig(task_type="CAUSAL_LM", r=8, target_modules=GPT2_TARGETS, lora_dropout=dropout)
    fused, plain = _pair(config, GPT2LMHeadModel(gpt2_config(n_embd=128, vocab_size=64)))
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    fused_bytes, plain_bytes = _saved_bytes(fused, batch, autocast), _saved_bytes(plain, batch, autocast)
    assert fused_bytes <= plain_bytes * at_most, (fused_bytes, plain_bytes)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_fused_layers_under_gradient_checkpointing(use_reentrant, input_ids):
    """Checkpointing reruns each block's forward in backward: the fused node must redraw the same dropout mask
    (checkpoint restores the RNG state) and give the plain path's gradients."""
    torch.manual_seed(0)
    config = DoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, lora_dropout=0.1)
    fused, plain = _pair(config, GPT2LMHeadModel(gpt2_config()))
    for m in (fused, plain):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    _assert_same_step(fused, plain, {"input_ids": input_ids, "labels": input_ids})


class _TwoReaders(nn.Module):
    """Two adapted linears reading one input (as q and v do): their masks must stay two draws when compiled."""

    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(16, 24), nn.Linear(16, 24)

    def forward(self, x):
        return self.q(x) * self.v(x).sigmoid()


@pytest.mark.parametrize("dora", [False, True])
def test_one_seed_gives_one_dropout_mask_fused_and_peft(dora):
    """With one seed the fused node and peft's forward draw the same dropout mask: same outputs and gradients."""
    cls = DoRAConfig if dora else LoRAConfig
    torch.manual_seed(0)
    model = get_model(cls(r=4, target_modules=["q", "v"], lora_dropout=0.5), model=_TwoReaders())
    randomize_adapters(model, seed=1)
    model.train()
    x = torch.randn(5, 16, requires_grad=True)

    def run(fused: bool, seed: int = 11):
        set_fused_path(model, fused)
        torch.manual_seed(seed)
        model.zero_grad()
        x.grad = None
        out = model(x)
        out.sum().backward()
        return [out.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    fused = run(True)
    for got, want in zip(run(False), fused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(False, seed=12)[0], fused[0])  # another seed, another mask: the test has teeth
