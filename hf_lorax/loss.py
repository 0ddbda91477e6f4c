"""hf_lorax's one causal-LM loss: one label shift, one ignore index, one normalisation, no data-dependent shapes.

Why this exists: ``transformers``' ``ForCausalLMLoss`` calls ``F.cross_entropy`` on the ``n × vocab`` logits;
autograd keeps the log-softmax output for backward and backward materialises two more vocabulary-sized buffers.
With GPT-2's 50,257-token (or Llama 3's 128,256-token) vocabulary these buffers, not the adapters, set a LoRA
step's peak memory. Two entry points share every rule here (:func:`shifted_labels`, :data:`IGNORE_INDEX`,
:func:`per_item`, the label-smoothed row loss):

* :func:`causal_lm_loss_from_hidden` (what training uses): the LM head and the cross-entropy in a few large row
  chunks (:class:`LinearCrossEntropy`), never holding the logits;
* :func:`causal_lm_loss` (where the model forms logits anyway): ``ForCausalLMLoss``'s signature with
  :class:`CrossEntropyFromLogits`, which keeps the logits and one float per row instead of three buffers.

Masked rows (label ``-100``) go through the chunks with weight 0 instead of being gathered out: a boolean gather
has a data-dependent shape, which makes the device wait (``nonzero``) and breaks ``torch.compile`` graphs. Only
on a CPU, in eager mode, where no device waits, does the loss from hidden states gather the labelled rows
(:data:`LABELLED_ROWS_ONLY_ON`): same value and gradients, the head's work only where a label is.
Label smoothing follows ``F.cross_entropy(label_smoothing=eps)`` and the ``Trainer``'s ``LabelSmoother``:
``(1 - eps)·NLL + eps·mean_j(-log p_j)``. Values and gradients equal transformers' (tests/test_loss.py,
tests/test_logits_free.py, tests/test_e2e.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# A row chunk's float32 logits hold a quarter of all the logits, kept between 64 MiB and 256 MiB: at most four
# chunks until the logits pass 1 GiB, so the kernels a loss launches do not grow with the vocabulary, while small
# logits still go through in 64 MiB pieces (each chunk reads the whole head weight: on a CPU, where that read is
# the cost, fewer chunks are faster) and large ones never need more than 256 MiB at once.
MIN_CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS = 1 << 26  # the largest chunk
TARGET_CHUNKS = 4
HALF_PRECISION_GEMM_DEVICES = ("cuda", "xpu")  # where bf16/fp16 GEMMs outrun float32 ones
# Device types on which rows without a label skip the LM head (a boolean gather): on a CPU the gather waits for no
# device, and the head's GEMMs shrink to the labelled rows (a masked prompt and padding can be most of a batch).
# Elsewhere the gather's size would make the host wait for the device, and under torch.compile
# it is a data-dependent shape: there every row goes through, unlabelled ones with weight 0.
LABELLED_ROWS_ONLY_ON = ("cpu",)


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    vocab = max(vocab, 1)
    elements = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, -(-rows * vocab // TARGET_CHUNKS)))
    step = max(1, elements // vocab)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def check_label_smoothing(label_smoothing: float, name: str = "label_smoothing") -> float:
    """``label_smoothing`` as a float in [0, 1], or a ``ValueError`` naming it as ``name``."""
    if not 0 <= label_smoothing <= 1:  # ``not`` catches NaN
        raise ValueError(f"{name}={label_smoothing} must be in [0, 1].")
    return float(label_smoothing)


def _targets(targets: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather-safe targets as ``n × 1``, row weights: 1.0 where labelled, 0.0 where ``ignore_index``)."""
    valid = targets.ne(ignore_index)
    # ``* valid``: 0 on ignored rows, one kernel; any other negative label still fails loudly in the gather
    return (targets * valid).unsqueeze(1), valid.to(dtype)


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` without a dispatcher call in the common case of equal dtypes."""
    return a if a == b else torch.promote_types(a, b)


class CrossEntropyFromLogits(torch.autograd.Function):
    """Per-row label-smoothed cross-entropy of given logits (0 where the target is ``ignore_index``), at least float32.

    Saves the logits (alive anyway: the model returns them), the targets and one log-sum-exp per row; backward
    recomputes the softmax chunk by chunk straight into the gradient buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                label_smoothing: float = 0.0) -> torch.Tensor:
        dtype = _wider(logits.dtype, torch.float32)  # as ForCausalLMLoss's upcast
        safe, weights = _targets(targets, ignore_index, dtype)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        mean = torch.empty_like(lse) if label_smoothing else None
        for rows in _row_chunks(*logits.shape):
            chunk = logits[rows].to(dtype)
            torch.logsumexp(chunk, dim=-1, out=lse[rows])
            if mean is not None:
                torch.mean(chunk, dim=-1, out=mean[rows])
        target_logits = logits.gather(1, safe).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, safe, weights, lse)
        ctx.label_smoothing = label_smoothing
        return _row_loss(lse, target_logits, mean, label_smoothing) * weights

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        logits, safe, weights, lse = ctx.saved_tensors
        eps, vocab = ctx.label_smoothing, logits.shape[1]
        grad = torch.empty_like(logits)
        scale = grad_rows.to(lse.dtype) * weights
        in_place = logits.dtype == lse.dtype  # else a chunk-sized float32 buffer, cast into ``grad``
        for rows in _row_chunks(*logits.shape):
            probs = grad[rows] if in_place else torch.empty_like(logits[rows], dtype=lse.dtype)
            torch.sub(logits[rows].to(lse.dtype), lse[rows, None], out=probs)
            _softmax_minus_targets(probs.exp_(), safe[rows], eps, vocab).mul_(scale[rows, None])
            if not in_place:
                grad[rows] = probs
        return grad, None, None, None


def _row_loss(lse, target_logits, mean, label_smoothing: float) -> torch.Tensor:
    """``(1 - eps)·(lse - x_target) + eps·(lse - mean_j x_j)`` per row."""
    if not label_smoothing:
        return lse - target_logits
    return lse - (1.0 - label_smoothing) * target_logits - label_smoothing * mean


def _softmax_minus_targets(probs: torch.Tensor, safe: torch.Tensor, eps: float, vocab: int) -> torch.Tensor:
    """In place: the row loss's gradient with respect to the logits, ``softmax - (1 - eps)·onehot - eps / vocab``."""
    probs.scatter_add_(1, safe, probs.new_full((1, 1), eps - 1.0).expand(safe.shape))
    return probs.sub_(eps / vocab) if eps else probs


class LinearCrossEntropy(torch.autograd.Function):
    """``sum over rows of weightedCE(hidden @ weightᵀ + bias, target)`` with label smoothing, never holding ``n × vocab``.

    The rows go through the head in chunks whose float32 logits stay under ``CHUNK_ELEMENTS``; each chunk's loss
    and its gradients with respect to ``hidden``, ``weight`` and ``bias`` are computed at once (Liger-Kernel's
    fused-linear-cross-entropy scheme, in plain PyTorch so it runs on CPU and CUDA), so backward only scales them.
    Rows whose target is ``ignore_index`` get weight 0. liger-kernel's Triton kernel is not used: CUDA only, and
    whether it beats this on a GPU is unmeasured (docs/benchmarks_gpu.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, safe_targets, row_weights, label_smoothing: float):
        """``safe_targets`` (n × 1) index the vocabulary on every row; ``row_weights`` (n,) are 0 where there is no
        label (:func:`_targets` makes both)."""
        matmul_dtype = LinearCrossEntropy.matmul_dtype(hidden, weight)  # reads the caller's autocast state
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return LinearCrossEntropy._forward(ctx, hidden, weight, bias, safe_targets, row_weights, label_smoothing,
                                               matmul_dtype)

    @staticmethod
    def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        """The dtype of the head's GEMMs; the softmax and the loss always run in at least float32.

        On GPUs the autocast dtype when autocast is on (as the stock head's ``F.linear``), else the inputs' dtype:
        a float32 head GEMM costs a GPU several times the bf16 one. On CPUs at least float32: without bf16 GEMM
        units a bf16 GEMM is the slower one.
        """
        device = hidden.device.type
        dtype = _wider(hidden.dtype, weight.dtype)
        if device in HALF_PRECISION_GEMM_DEVICES:
            return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        return _wider(dtype, torch.float32)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, safe, weights, eps: float, matmul_dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = _wider(matmul_dtype, torch.float32)
        new = {"dtype": dtype, "device": hidden.device}
        weight_mm, hidden_mm = weight.to(matmul_dtype), hidden.to(matmul_dtype)
        weights = weights.to(dtype)
        lse, target_logits = torch.empty(n, **new), torch.empty(n, **new)
        mean = torch.empty(n, **new) if eps else None
        grad_hidden = torch.empty(hidden.shape, **new) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty(weight.shape, **new) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(vocab, **new) if bias is not None and ctx.needs_input_grad[2] else None
        for i, rows in enumerate(_row_chunks(n, vocab)):
            h = hidden_mm[rows]
            logits = (torch.mm(h, weight_mm.T) if bias is None else torch.addmm(bias.to(matmul_dtype), h, weight_mm.T))
            logits = logits.to(dtype)
            torch.logsumexp(logits, dim=-1, out=lse[rows])
            torch.gather(logits, 1, safe[rows], out=target_logits[rows, None])
            if mean is not None:
                torch.mean(logits, dim=-1, out=mean[rows])
            grad = logits.sub_(lse[rows, None]).exp_()  # softmax, in the logits' buffer
            _softmax_minus_targets(grad, safe[rows], eps, vocab).mul_(weights[rows, None])
            if grad_bias is not None:
                grad_bias.add_(grad.sum(dim=0))
            grad = grad.to(matmul_dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight_mm, out=grad_hidden[rows])
            if grad_weight is not None:
                torch.mm(grad.T, h, out=grad_weight) if i == 0 else grad_weight.addmm_(grad.T, h)
        loss = torch.dot(_row_loss(lse, target_logits, mean, eps), weights)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The summed cross-entropy of the LM head ``hidden @ weightᵀ + bias`` against ``targets``, without logits."""
    safe, weights = _targets(targets.reshape(-1), ignore_index, torch.float32)
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, safe, weights,
                                    float(label_smoothing))


def causal_lm_loss_from_hidden(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                               num_items_in_batch: torch.Tensor | int | None = None,
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """``ForCausalLMLoss(head(hidden), labels)`` (or the ``Trainer``'s label-smoothed loss) without the logits."""
    check_labels_shape(labels, hidden.shape[:-1], "the hidden states (batch, tokens)")
    eps = check_label_smoothing(label_smoothing)
    safe, weights = _targets(shifted_labels(labels).reshape(-1).to(hidden.device), IGNORE_INDEX, torch.float32)
    hidden, labelled = hidden.reshape(-1, hidden.shape[-1]), weights.sum()  # exact in float32 below 2**24 rows
    if hidden.device.type in LABELLED_ROWS_ONLY_ON and not torch.compiler.is_compiling():
        rows = weights.nonzero().squeeze(1)
        if rows.numel():  # with no labelled row, every row goes through with weight 0 (the gradients are zeros)
            # rebinding ``hidden`` frees the full hidden states when the caller kept no reference to them
            hidden, safe, weights = hidden.index_select(0, rows), safe.index_select(0, rows), weights.index_select(0, rows)
    total = LinearCrossEntropy.apply(hidden, head.weight, head.bias, safe, weights, eps)
    return per_item(total, labelled, num_items_in_batch)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    **kwargs,
) -> torch.Tensor:
    """``transformers.loss.loss_utils.ForCausalLMLoss`` with :class:`CrossEntropyFromLogits` inside.

    Same signature and semantics: labels are shifted left by one (or ``shift_labels`` is used as given), the
    mean over labelled tokens, or the sum divided by ``num_items_in_batch`` when the ``Trainer`` passes it.
    """
    if shift_labels is None:
        check_labels_shape(labels, logits.shape[:-1], "the logits (batch, tokens)")
        shift_labels = shifted_labels(labels, ignore_index)
    flat_logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat_logits.device)
    rows = CrossEntropyFromLogits.apply(flat_logits, targets, ignore_index, check_label_smoothing(label_smoothing))
    return per_item(rows.sum(), targets.ne(ignore_index).sum(), num_items_in_batch)


def check_labels_shape(labels: torch.Tensor, tokens: tuple[int, ...], what: str) -> None:
    """One label per token: a ``ValueError`` naming both shapes, where the loss would otherwise fail deep in
    indexing (or, for some shapes, silently pair the wrong labels with the tokens)."""
    if tuple(labels.shape) != tuple(tokens):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but {what} have shape {tuple(tokens)}: a causal "
                         "LM needs one label per input token (-100 for tokens without a loss).")


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The next token's label at each position (``ignore_index`` at the last one), as ``ForCausalLMLoss``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def per_item(total: torch.Tensor, n_labelled, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """A summed loss as the Trainer expects it: over ``num_items_in_batch`` when given (gradient accumulation,
    several devices), else the mean over this batch's ``n_labelled`` tokens."""
    denominator = n_labelled if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def install_causal_lm_loss(model: torch.nn.Module) -> bool:
    """Use :func:`causal_lm_loss` for ``model`` if it computes the stock causal-LM loss; returns whether it did."""
    from .integrations.transformers_api import uses_stock_causal_lm_loss

    stock = uses_stock_causal_lm_loss(model)
    if stock:
        model.loss_function = causal_lm_loss  # transformers' public setter for a model's loss
    return stock
