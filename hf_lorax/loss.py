"""hf_lorax's one causal-LM loss, and the decision of where a causal LM uses it.

Why this exists: ``transformers``' ``ForCausalLMLoss`` runs ``F.cross_entropy`` on the ``n × vocab`` logits; autograd
keeps the log-softmax output and backward materialises two more vocabulary-sized buffers, which (GPT-2: 50,257
tokens, Llama 3: 128,256), not the adapters, set a LoRA step's peak memory. :func:`causal_lm_loss_from_hidden`
computes the same loss (the shifted labels, ``-100`` ignored, the mean or the sum over ``num_items_in_batch``; with
label smoothing the row loss ``(1 - eps)·NLL + eps·mean_j(-log p_j)`` of ``F.cross_entropy`` and the ``Trainer``'s
``LabelSmoother``) from the last hidden state: the LM head and the cross-entropy in a few row chunks, never holding
the logits. Where logits are formed anyway (evaluation, generation, models this loss does not support), the model
computes transformers' own loss, as without hf_lorax.

Masked rows (label ``-100``) go through the chunks with weight 0 (a boolean gather makes a device wait and breaks
``torch.compile`` graphs), except on a CPU in eager mode (:data:`LABELLED_ROWS_ONLY_ON`, docs/benchmarks.md).

The decision (:func:`prepare_loss`; :func:`training_loss` says it for ``describe``): the logits-free
forward (:class:`LogitsFreeCausalLM`) where :func:`logits_free_unsupported_reason`, reading the model itself, finds
its forward to be its decoder stack, a plain linear head and the stock loss; label smoothing as an option of it
(:func:`set_label_smoothing`); the ``Trainer`` hand-off (``TargetedLossTrainer``). Values and gradients equal
transformers' (tests/test_loss.py, test_logits_free.py)."""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .class_swap import register_mixin, swap_class
from .integrations.transformers_api import stock_causal_lm_loss

IGNORE_INDEX = -100
# A row chunk's float32 logits hold a quarter of all the logits, kept between 64 MiB and 256 MiB: few chunks (each
# reads the whole head weight) whose count does not grow with the vocabulary, and never more than 256 MiB at once.
MIN_CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS = 1 << 26  # the largest chunk
TARGET_CHUNKS = 4
HALF_PRECISION_GEMM_DEVICES = ("cuda", "xpu")  # where bf16/fp16 GEMMs outrun float32 ones
# Device types on which rows without a label skip the LM head (a masked prompt and padding can be most of a batch):
# elsewhere the gather would make the host wait for the device; under torch.compile it is a data-dependent shape.
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


def _targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather-safe targets as ``n × 1``, float32 row weights: 1.0 where labelled, 0.0 where :data:`IGNORE_INDEX`)."""
    valid = targets.ne(IGNORE_INDEX)
    # ``* valid``: 0 on ignored rows, one kernel; any other negative label still fails loudly in the gather
    return (targets * valid).unsqueeze(1), valid.float()


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` without a dispatcher call in the common case of equal dtypes."""
    return a if a == b else torch.promote_types(a, b)


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

    Row chunks through the head; each chunk's loss and its gradients for ``hidden``, ``weight`` and ``bias`` at once
    (Liger-Kernel's scheme in plain PyTorch, for CPU and CUDA; its Triton kernel is CUDA only and unmeasured here),
    so backward only scales them. ``safe`` targets (n × 1) index the vocabulary on every row; the row ``weights`` (n,)
    are 0 where there is no label (:func:`_targets` makes both).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, safe, weights, eps: float):
        # the head GEMMs' dtype (softmax and loss: at least float32): on GPUs the caller's autocast dtype, as the
        # stock head's ``F.linear``, else the inputs'; on CPUs at least float32 (without bf16 units a bf16 GEMM is
        # the slower)
        device, matmul_dtype = hidden.device.type, _wider(hidden.dtype, weight.dtype)
        if device not in HALF_PRECISION_GEMM_DEVICES:
            matmul_dtype = _wider(matmul_dtype, torch.float32)
        elif torch.is_autocast_enabled(device):
            matmul_dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device_type=device, enabled=False):
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
                logits = (torch.mm(h, weight_mm.T) if bias is None
                          else torch.addmm(bias.to(matmul_dtype), h, weight_mm.T))
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
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)  # None where no gradient is needed
            ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
            return torch.dot(_row_loss(lse, target_logits, mean, eps), weights)

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None


def causal_lm_loss_from_hidden(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                               num_items_in_batch: torch.Tensor | int | None = None,
                               label_smoothing: float = 0.0) -> torch.Tensor:
    """``ForCausalLMLoss(head(hidden), labels)`` (or the ``Trainer``'s label-smoothed loss) without the logits."""
    check_labels_shape(labels, hidden.shape[:-1], "the hidden states (batch, tokens)")
    eps = check_label_smoothing(label_smoothing)
    safe, weights = _targets(shifted_labels(labels).reshape(-1).to(hidden.device))
    hidden, labelled = hidden.reshape(-1, hidden.shape[-1]), weights.sum()  # exact in float32 below 2**24 rows
    if hidden.device.type in LABELLED_ROWS_ONLY_ON and not torch.compiler.is_compiling():
        rows = weights.nonzero().squeeze(1)
        if rows.numel():  # with no labelled row, every row goes through with weight 0 (the gradients are zeros)
            # rebinding ``hidden`` frees the full hidden states when the caller kept no reference to them
            hidden, safe, weights = (t.index_select(0, rows) for t in (hidden, safe, weights))
    total = LinearCrossEntropy.apply(hidden, head.weight, head.bias, safe, weights, eps)
    return per_item(total, labelled, num_items_in_batch)


def check_labels_shape(labels: torch.Tensor, tokens: tuple[int, ...], what: str) -> None:
    """One label per token, else a ``ValueError`` naming both shapes (not a failure deep in indexing)."""
    if tuple(labels.shape) != tuple(tokens):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but {what} have shape {tuple(tokens)}: a causal "
                         "LM needs one label per input token (-100 for tokens without a loss).")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The next token's label at each position (:data:`IGNORE_INDEX` at the last one), as ``ForCausalLMLoss``."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def per_item(total: torch.Tensor, n_labelled, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """A summed loss over ``num_items_in_batch`` when the Trainer gives it, else the mean over ``n_labelled``."""
    denominator = n_labelled if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


# Config fields that change the logits after the LM head, matched by name (Gemma's final_logit_softcapping, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, ...); None or 1 leaves them as they are.
_LOGIT_TRANSFORM = re.compile(r"(logit|lm_head).*(scal|cap|multiplier)|(scal|cap|multiplier).*(logit|lm_head)")
_NEUTRAL = (None, False, 1, 1.0)
_SMOOTHING = "_hf_lorax_label_smoothing"
_WARNED = "_hf_lorax_warned_no_labels"


def logits_free_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s training loss cannot be computed without logits (None: it can), read from the model."""
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.models."):
        return f"{type(model).__qualname__} is not transformers' own class (its forward may compute more than the loss)"
    stock = stock_causal_lm_loss()  # (``loss_function`` is the loss the user set, if any)
    if stock is None or getattr(model, "loss_function", None) is not stock:
        return "the model does not compute transformers' stock causal-LM loss (a custom loss_function is set)"
    try:  # whether forward computes its loss with ``self.loss_function`` (BART's causal LM does not)
        calls_loss_function = "self.loss_function(" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source to read: not known to use the stock loss
        calls_loss_function = False
    if not calls_loss_function:
        return f"{type(model).__name__}.forward computes its loss itself, not with transformers' loss_function"
    if getattr(config, "output_router_logits", False):
        return "the model adds a router auxiliary loss (output_router_logits=True)"
    for key, value in sorted((config.to_dict() if config is not None else {}).items()):
        if _LOGIT_TRANSFORM.search(key) and "attn" not in key and not isinstance(value, dict) and value not in _NEUTRAL:
            return f"the model transforms its logits after the LM head ({key}={value!r})"
    head, body = model.get_output_embeddings(), getattr(model, "base_model", model)
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain nn.Linear"
    children = {name: child for name, child in model.named_children() if next(child.parameters(), None) is not None}
    if body is model or body not in children.values():
        return "it has no separate decoder stack (base_model) to call"
    if head not in children.values():
        return "its LM head applies a transform before the output projection"
    others = sorted(name for name, child in children.items() if child is not body and child is not head)
    return f"its forward uses {others} besides the decoder stack and the LM head" if others else None


def prepare_loss(model: nn.Module, task: str | None, logits_free: bool = True) -> None:
    """The one decision, made once per model instance by :func:`hf_lorax.get_model`: for a causal LM (``task``
    ``"CAUSAL_LM"``) that :func:`logits_free_unsupported_reason` supports, the training forward becomes logits-free
    (:class:`LogitsFreeCausalLM`); every other forward keeps the model's own loss. (A model whose task head trains
    declares its loss a plain mean, :func:`declare_mean_loss`, wherever hf_lorax injects.)
    """
    if task == "CAUSAL_LM" and logits_free and logits_free_unsupported_reason(model) is None:
        swap_class(model, LogitsFreeCausalLM)


def declare_mean_loss(model: nn.Module) -> None:
    """Tell the Trainer that a task head's loss is a plain mean.

    transformers' classification / QA heads take ``**kwargs`` but compute a mean loss without
    ``num_items_in_batch``; seeing ``**kwargs``, the Trainer assumes a sum over the global batch and multiplies
    the loss by the number of processes, so under DDP the loss and gradients come out N times too large (and
    gradient clipping then changes the result). ``accepts_loss_kwargs = False`` is the Trainer's own switch.
    """
    if "accepts_loss_kwargs" not in vars(type(model)) and hasattr(model, "forward"):
        model.accepts_loss_kwargs = False


def training_loss(model: nn.Module) -> str:
    """What :func:`prepare_loss` decided for ``model`` (a base model or its ``PeftModel``), in words."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, LogitsFreeCausalLM):
        return "logits-free (LM head and cross-entropy in row chunks from the hidden states)"
    reason = logits_free_unsupported_reason(inner) or "not built by hf_lorax.get_model, or with logits_free_loss=False"
    return f"the model's own ({reason})"


class LogitsFreeCausalLM:
    """A training forward with ``labels`` calls the decoder stack (``base_model``) as the model's own forward does and
    computes the loss from its last hidden state; ``logits`` is then ``None`` (the ``Trainer`` reads only ``loss``).
    Evaluation, generation, calls without labels or with extra options take the model's own forward."""

    def forward(self, *args, labels=None, **kwargs):
        head = self.get_output_embeddings()
        if labels is None and self.training and torch.is_grad_enabled() and not getattr(self, _WARNED, False):
            setattr(self, _WARNED, True)  # once per model
            warnings.warn("hf_lorax: a training forward without labels forms the full logits. If a Trainer with "
                          "label_smoothing_factor > 0 removed them, set label_smoothing_factor=0 and call "
                          "hf_lorax.loss.set_label_smoothing(model, epsilon) (or use hf_lorax.TargetedLossTrainer) "
                          "to keep the loss logits-free.", UserWarning, stacklevel=2)
        # (``_hf_hook``: an accelerate-dispatched head)
        if (labels is None or args or not self.training or not torch.is_grad_enabled()
                or kwargs.get("logits_to_keep", 0) != 0 or kwargs.get("shift_labels") is not None
                or kwargs.get("return_dict") is False or type(head) is not nn.Linear or hasattr(head, "_hf_hook")):
            return super().forward(*args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = dict(self.base_model(**kwargs))
        # the key/value cache is dropped before the loss unless use_cache=True was passed (use_cache=False without an
        # attention mask would make transformers check the position ids for packed sequences: a device sync)
        if kwargs.get("use_cache") is not True:
            outputs.pop("past_key_values", None)
        # the loss holds the only reference to the last hidden state (freed once the labelled rows are kept)
        loss = causal_lm_loss_from_hidden(outputs.pop("last_hidden_state").to(head.weight.device), head, labels,
                                          kwargs.get("num_items_in_batch"), getattr(self, _SMOOTHING, 0.0))
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.get("past_key_values"),
                                      hidden_states=outputs.get("hidden_states"), attentions=outputs.get("attentions"))


register_mixin("LogitsFree", LogitsFreeCausalLM, "transformers")


def set_label_smoothing(model: nn.Module, epsilon: float) -> None:
    """Label smoothing ``epsilon`` for the logits-free training loss of ``model`` (a base model or its ``PeftModel``):
    with it (and ``label_smoothing_factor=0``) the loss equals the ``Trainer``'s label-smoothed one, without logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, LogitsFreeCausalLM):
        raise ValueError(f"{type(inner).__name__} does not compute a logits-free loss (see "
                         "logits_free_unsupported_reason); use the Trainer's label_smoothing_factor instead (it forms "
                         "the logits).")
    setattr(inner, _SMOOTHING, check_label_smoothing(epsilon))


@functools.cache  # one class, made on first use
def __getattr__(name: str) -> type:
    if name != "TargetedLossTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import Trainer  # seconds to import: only when the class is first used

    class TargetedLossTrainer(Trainer):
        """A ``Trainer`` whose ``label_smoothing_factor`` goes to the model's logits-free loss (the labels stay with
        the model): the same value as the ``Trainer``'s smoothed loss, no logits. Evaluation, and a model the
        logits-free loss does not support, take the ``Trainer``'s own path."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            check_label_smoothing(self.args.label_smoothing_factor, "label_smoothing_factor")
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            if logits_free_unsupported_reason(inner) is None:
                swap_class(inner, LogitsFreeCausalLM)
            self.logits_free = isinstance(inner, LogitsFreeCausalLM)
            if self.logits_free:
                set_label_smoothing(inner, self.args.label_smoothing_factor)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            smoother = self.label_smoother
            if self.logits_free and model.training:
                self.label_smoother = None  # the labels stay: the model smooths its loss
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.label_smoother = smoother

    return TargetedLossTrainer
