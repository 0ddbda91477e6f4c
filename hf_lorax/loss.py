"""A causal-LM loss that keeps one vocabulary-sized buffer for backward instead of three.

Why this exists: ``transformers``' ``ForCausalLMLoss`` calls ``F.cross_entropy`` on the ``n × vocab``
logits. Autograd keeps the log-softmax output (``n × vocab``) for backward, and backward materialises two
more (the gradient of that output, then the logits' gradient); ``logits.float()`` adds a fourth for bf16/fp16
models. With GPT-2's 50,257-token vocabulary these buffers, not the adapters, set a LoRA step's peak memory.
:class:`CrossEntropyFromLogits` keeps only the logits (alive anyway: the model returns them) and one float32
log-sum-exp per row, and writes the logits' gradient once, in chunks whose float32 temporaries stay small.

:func:`get_model <hf_lorax.model.get_model>` installs :func:`causal_lm_loss` as the ``loss_function`` of
causal LMs that use the stock loss, so ``model(input_ids, labels=labels).loss`` and the ``Trainer`` use it.
The value equals ``ForCausalLMLoss``'s to float32 round-off, gradients too (tests/test_loss.py). To go back
to the stock loss: ``del model.get_base_model()._loss_function``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # float32 temporaries of at most 64 MiB
HALF_PRECISION_GEMM_DEVICES = ("cuda", "xpu")  # where bf16/fp16 GEMMs outrun float32 ones


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits (as ``ForCausalLMLoss``'s upcast), else the logits' own dtype."""
    return torch.promote_types(logits.dtype, torch.float32)


class CrossEntropyFromLogits(torch.autograd.Function):
    """Per-row ``logsumexp(logits) - logits[target]`` (0 where the target is ``ignore_index``), at least float32.

    Saves the logits, the targets and the per-row log-sum-exp; backward recomputes the softmax chunk by
    chunk straight into the gradient buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets.ne(ignore_index)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        dtype = _compute_dtype(logits)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for rows in _row_chunks(logits.shape[0], logits.shape[1]):
            lse[rows] = torch.logsumexp(logits[rows].to(dtype), dim=-1)
        target_logits = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, safe_targets, valid, lse)
        return (lse - target_logits) * valid

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        logits, safe_targets, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_rows.to(lse.dtype) * valid
        in_place = logits.dtype == lse.dtype  # else a chunk-sized float32 buffer, cast into ``grad``
        for rows in _row_chunks(logits.shape[0], logits.shape[1]):
            probs = grad[rows] if in_place else torch.empty_like(logits[rows], dtype=lse.dtype)
            torch.sub(logits[rows].to(lse.dtype), lse[rows, None], out=probs)
            probs.exp_().scatter_add_(1, safe_targets[rows, None], probs.new_full((probs.shape[0], 1), -1.0))
            probs.mul_(scale[rows, None])
            if not in_place:
                grad[rows] = probs
        return grad, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """``sum over rows of CE(hidden @ weightᵀ + bias, target)`` with label smoothing, never holding ``n × vocab``.

    Why this exists: even on labelled positions only, the ``n × vocab`` logits (50,257 or 128,256 wide) and
    their gradient are the largest tensors of a causal-LM step. Here the rows go through the head in chunks
    whose float32 logits stay under ``CHUNK_ELEMENTS``; each chunk's loss and its gradients with respect to
    ``hidden``, ``weight`` and ``bias`` are computed at once (Liger-Kernel's fused-linear-cross-entropy
    scheme, in plain PyTorch so it runs on CPU and CUDA), so backward only scales them. Rows whose target is
    ``ignore_index`` contribute nothing. Smoothing follows ``F.cross_entropy(label_smoothing=eps)``:
    ``(1 - eps)·NLL + eps·mean_j(-log p_j)``.

    liger-kernel's Triton ``LigerFusedLinearCrossEntropyFunction`` is not used: it runs on CUDA only, and whether
    it beats this on a GPU is unmeasured (no GPU was available; docs/benchmarks_gpu.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing: float, ignore_index: int):
        matmul_dtype = LinearCrossEntropy.matmul_dtype(hidden, weight)  # reads the caller's autocast state
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return LinearCrossEntropy._forward(ctx, hidden, weight, bias, targets, label_smoothing, ignore_index,
                                               matmul_dtype)

    @staticmethod
    def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        """The dtype of the head's GEMMs; the softmax and the loss always run in at least float32.

        On GPUs the autocast dtype when autocast is on (as the stock head's ``F.linear``), else the inputs' dtype:
        a float32 head GEMM costs a GPU several times the bf16 one. On CPUs at least float32: without bf16 GEMM
        units a bf16 GEMM is the slower one (measured on this project's 2-core CPU, 333 × 768 by 768 × 50,257:
        3.1 s in bf16 against 0.8 s in float32, and 80 s for the bf16 ``grad @ W``).
        """
        device = hidden.device.type
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        if device in HALF_PRECISION_GEMM_DEVICES:
            return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        return torch.promote_types(dtype, torch.float32)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, label_smoothing: float, ignore_index: int, matmul_dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.promote_types(matmul_dtype, torch.float32)
        weight_mm = weight.to(matmul_dtype)
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(vocab, dtype=dtype, device=hidden.device) if bias is not None and ctx.needs_input_grad[2] else None
        keep = 1.0 - label_smoothing
        for rows in _row_chunks(n, vocab):
            h = hidden[rows].to(matmul_dtype)
            logits = (h @ weight_mm.T).to(dtype)
            if bias is not None:
                logits = logits + bias.to(dtype)
            target = targets[rows]
            valid = target.ne(ignore_index)
            safe = torch.where(valid, target, torch.zeros_like(target))
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            row_loss = keep * nll + label_smoothing * (lse - logits.mean(dim=-1)) if label_smoothing else nll
            loss = loss + (row_loss * valid).sum()
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' buffer
            grad.scatter_add_(1, safe.unsqueeze(1), grad.new_full((grad.shape[0], 1), -keep))
            if label_smoothing:
                grad.sub_(label_smoothing / vocab)
            grad.mul_(valid.unsqueeze(1).to(grad.dtype))
            if grad_bias is not None:
                grad_bias.add_(grad.sum(dim=0))
            grad = grad.to(matmul_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight_mm
            if grad_weight is not None:
                grad_weight.add_(grad.T @ h)
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
                         ignore_index: int = -100) -> torch.Tensor:
    """The summed cross-entropy of the LM head ``hidden @ weightᵀ + bias`` against ``targets``, without logits."""
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                    float(label_smoothing), ignore_index)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
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
    total = CrossEntropyFromLogits.apply(flat_logits, targets, ignore_index).sum()
    return per_item(total, targets.ne(ignore_index).sum(), num_items_in_batch)


def check_labels_shape(labels: torch.Tensor, tokens: tuple[int, ...], what: str) -> None:
    """One label per token: a ``ValueError`` naming both shapes, where the loss would otherwise fail deep in
    indexing (or, for some shapes, silently pair the wrong labels with the tokens)."""
    if tuple(labels.shape) != tuple(tokens):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but {what} have shape {tuple(tokens)}: a causal "
                         "LM needs one label per input token (-100 for tokens without a loss).")


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
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
