"""hf_lorax's logits-free causal-LM loss equals the LM head then transformers' ForCausalLMLoss (value and gradients)
with less memory."""

import copy

import pytest
import torch
from conftest import gpt2_config, randomize_adapters
from peft import LoraConfig, get_peft_model
from transformers import GPT2LMHeadModel
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_lorax import LoRAConfig, get_model
from hf_lorax.loss import causal_lm_loss_from_hidden


def _labels(shape, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[-1, -2:] = -100  # padding
    return labels


@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_value_and_gradients_equal_the_head_then_transformers_loss(num_items):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, dtype=torch.float64)
    hidden = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    labels = _labels((3, 7), 50)
    n = torch.tensor(11) if num_items == "tensor" else num_items
    expected = ForCausalLMLoss(head(hidden), labels, 50, num_items_in_batch=n)
    actual = causal_lm_loss_from_hidden(hidden, head, labels, num_items_in_batch=n)
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=1e-6, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(actual, (hidden, head.weight, head.bias)),
                         torch.autograd.grad(expected, (hidden, head.weight, head.bias))):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)


def test_gradcheck_across_ragged_chunks(monkeypatch):
    import hf_lorax.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4 * 6)  # four rows per chunk, a ragged last chunk
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, -100, 2, 2, 1, -100, 4, 3])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, label_smoothing=0.1),
                                    (hidden, weight))


def test_bf16_inputs_match_the_float32_reference():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).bfloat16()
    hidden = torch.randn(4, 9, 16).bfloat16().requires_grad_()
    labels = _labels((4, 9), 300)
    reference = hidden.detach().float().requires_grad_()
    actual = causal_lm_loss_from_hidden(hidden, head, labels)
    expected = ForCausalLMLoss(reference @ head.weight.float().T, labels, 300)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    actual.backward()
    expected.backward()
    assert hidden.grad.dtype == head.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), reference.grad, atol=1e-3, rtol=1e-2)


def test_get_model_keeps_the_models_own_loss_where_logits_are_formed(input_ids):
    """Evaluation forms the logits: the model computes transformers' own loss there, equal to plain peft's."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config())
    ours = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]), model=copy.deepcopy(base))
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    assert ours.get_base_model().loss_function is LOSS_MAPPING["ForCausalLM"]
    randomize_adapters(plain)
    ours.load_state_dict(plain.state_dict(), strict=False)
    labels = input_ids.clone()
    labels[:, :4] = -100
    losses = []
    for model in (plain, ours):
        model.eval()
        with torch.no_grad():
            losses.append(model(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)


def linear_cross_entropy(hidden, weight, targets, bias=None, label_smoothing=0.0):
    """The summed cross-entropy of ``hidden @ weightᵀ + bias`` by :class:`LinearCrossEntropy` (no logits)."""
    from hf_lorax.loss import LinearCrossEntropy, _targets

    safe, weights = _targets(targets.reshape(-1))
    return LinearCrossEntropy.apply(hidden, weight, bias, safe, weights, float(label_smoothing))


def test_a_loss_the_user_set_is_kept():
    from hf_lorax.loss import prepare_loss

    model = GPT2LMHeadModel(gpt2_config())

    def custom(*args, **kwargs):
        return torch.tensor(0.0)

    model.loss_function = custom
    prepare_loss(model, "CAUSAL_LM")
    assert model.loss_function is custom and type(model) is GPT2LMHeadModel  # not logits-free either


def test_never_holds_the_logits(monkeypatch):
    """Bytes autograd saves plus the forward's and backward's allocations, measured with the profiler's allocator
    events: in row chunks of an eighth of the logits, the loss from the hidden states allocates a fraction of the
    logits' bytes; the head's logits and transformers' loss, three times them."""
    from torch.profiler import ProfilerActivity, profile

    import hf_lorax.loss as loss_module

    rows, vocab = 512, 4096
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ELEMENTS", rows // 8 * vocab)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", rows // 8 * vocab)
    head = torch.nn.Linear(16, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, rows))

    def peak(loss_fn) -> int:
        hidden = torch.randn(1, rows, 16, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_fn(hidden).backward()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        total = top = 0
        for _, nbytes in events:
            total += nbytes
            top = max(top, total)
        return top

    logits_bytes = rows * vocab * 4
    ours = peak(lambda hidden: causal_lm_loss_from_hidden(hidden, head, labels))
    stock = peak(lambda hidden: ForCausalLMLoss(head(hidden), labels, vocab))
    assert ours <= 0.5 * logits_bytes < 2.5 * logits_bytes <= stock


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_cross_entropy_equals_head_then_cross_entropy(monkeypatch, label_smoothing):
    """Value and gradients (hidden, weight, bias) equal ``F.cross_entropy(hidden @ Wᵀ + b)``, across chunks."""
    import hf_lorax.loss as loss_module
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * 8)  # several row chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = -100
    ours = linear_cross_entropy(hidden, weight, targets, bias, label_smoothing)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum",
                                                  label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(0.7 * ours, (hidden, weight, bias)),
                    torch.autograd.grad(0.7 * reference, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_linear_cross_entropy_matmul_dtype_under_autocast(device):
    """CUDA: bf16 head GEMMs as the stock ``lm_head`` under autocast, softmax and loss in float32. CPU: float32
    GEMMs (a CPU without bf16 units runs them several times faster), so the loss is the float32 one."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=g).to(device)
    weight = torch.randn(40, 16, generator=g).to(device).requires_grad_(True)
    targets = torch.randint(0, 40, (8,), generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets)
        stock = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets,
                                                  reduction="sum")
    reference = stock if device == "cuda" else torch.nn.functional.cross_entropy(hidden @ weight.T, targets,
                                                                                 reduction="sum")
    tolerance = 2e-2 if device == "cuda" else 1e-5
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5 if device == "cpu" else 1e-2, rtol=tolerance)
    (grad_ours,) = torch.autograd.grad(ours, weight)
    (grad_reference,) = torch.autograd.grad(reference, weight)
    assert grad_ours.dtype == torch.float32
    torch.testing.assert_close(grad_ours, grad_reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_equals_the_trainers_label_smoother(eps):
    """The loss from the hidden states equals LabelSmoother(shift_labels=True) on the head's logits."""
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, dtype=torch.float64)
    hidden = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    labels = _labels((3, 7), 50)
    logits = head(hidden)
    expected = LabelSmoother(epsilon=eps)({"logits": logits}, labels, shift_labels=True)  # float64 throughout
    actual = causal_lm_loss_from_hidden(hidden, head, labels, label_smoothing=eps)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)  # its smoothed sum is float32
    got = torch.autograd.grad(actual, (hidden, head.weight, head.bias))
    want = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_loss_from_hidden_has_no_data_dependent_shapes_and_few_chunks(monkeypatch):
    """No op that makes a GPU wait for the device (boolean gathers, nonzero, .item()), and the row chunks are few
    and large: the head's forward GEMMs are one per chunk, not one per vocabulary-sized slice of rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import hf_lorax.loss as loss_module

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._overloadpacket.__name__)
            if func._overloadpacket.__name__ in ("index", "index_put", "index_put_"):
                assert not any(torch.is_tensor(a) and a.dtype == torch.bool for a in args[1] if a is not None)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 10 * 50)  # 10 rows of a 50-token vocabulary per chunk
    monkeypatch.setattr(loss_module, "LABELLED_ROWS_ONLY_ON", ())  # every row goes through, as on CUDA
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    labels = _labels((3, 7), 50)
    with Ops() as ops:
        loss_module.causal_lm_loss_from_hidden(hidden, head, labels, label_smoothing=0.1).backward()
    assert not {"nonzero", "_local_scalar_dense", "masked_select", "item"} & set(ops.names)
    assert ops.names.count("logsumexp") == 3  # 21 rows in chunks of 10


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_labelled_rows_only_on_cpu_equals_every_row_with_weight_zero(monkeypatch, label_smoothing):
    """On a CPU the loss gathers the labelled rows before the head: the same value and gradients as every row
    with weight 0 (the CUDA route), a batch without any label included."""
    import hf_lorax.loss as loss_module

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50)
    labels = _labels((3, 7), 50)
    labels[:, :4] = -100  # a masked prompt
    results = {}
    for route in (("cpu",), ()):
        monkeypatch.setattr(loss_module, "LABELLED_ROWS_ONLY_ON", route)
        for name, batch_labels, items in (("some", labels, None), ("none", torch.full_like(labels, -100), 5)):
            hidden = torch.randn(3, 7, 8, generator=gen.manual_seed(1), requires_grad=True)
            head.zero_grad()
            loss = loss_module.causal_lm_loss_from_hidden(hidden, head, batch_labels, items, label_smoothing)
            loss.backward()
            results[route, name] = (loss.detach(), hidden.grad, head.weight.grad.clone(), head.bias.grad.clone())
    for name in ("some", "none"):
        for got, want in zip(results[("cpu",), name], results[(), name]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert float(results[("cpu",), "none"][0]) == 0.0


def test_a_negative_label_other_than_ignore_index_fails_loudly():
    head = torch.nn.Linear(8, 50, bias=False)
    labels = _labels((3, 7), 50)
    labels[1, 2] = -1
    with pytest.raises((RuntimeError, IndexError)):
        causal_lm_loss_from_hidden(torch.randn(3, 7, 8), head, labels)


@pytest.mark.parametrize(("rows", "vocab"), [(1024, 50257), (4096, 50257), (65536, 128256), (7, 11)])
def test_row_chunks_cover_the_rows_in_at_most_four_bounded_chunks(rows, vocab):
    """A quarter of the logits per chunk, between 64 MiB and 256 MiB of float32: at most four chunks (a bounded
    kernel count) until the logits pass 1 GiB, never a chunk over 256 MiB, small logits in 64 MiB pieces."""
    from hf_lorax.loss import CHUNK_ELEMENTS, MIN_CHUNK_ELEMENTS, _row_chunks

    chunks = _row_chunks(rows, vocab)
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(rows))
    assert all((c.stop - c.start) * vocab <= CHUNK_ELEMENTS for c in chunks)
    if rows * vocab <= 4 * CHUNK_ELEMENTS:
        assert len(chunks) <= 4
    assert all((c.stop - c.start) * vocab <= max(MIN_CHUNK_ELEMENTS, -(-rows * vocab // 4)) for c in chunks)
