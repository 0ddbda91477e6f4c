"""Causal-LM training steps that never hold the ``batch × seq × vocab`` logits, with a plain ``Trainer``.

Why this exists: in a LoRA step of a causal LM the logits (8 × 512 × 50,257 for GPT-2 medium, 128,256 wide
for Llama 3) and their gradient are the largest tensors, larger than all adapter activations together. A
training forward that gets ``labels`` does not need them: only the loss leaves the model. So for the causal
LMs :func:`hf_lorax.get_model` builds, a training-mode forward with labels calls the decoder stack the model's
own forward calls (``base_model``: ``self.model``, ``self.transformer``, ...) with the same arguments, and
computes the loss from its last hidden state with :func:`hf_lorax.loss.causal_lm_loss_from_hidden` (the LM head
and the cross-entropy in a few row chunks). Everything else is the model's own ``forward``: evaluation, generation,
calls without labels and calls with extra options (``logits_to_keep``, positional arguments) return logits as
before. In training the output's ``logits`` is ``None``, as with Liger-Kernel's fused loss; the ``Trainer``
only reads ``loss``.

The loss equals transformers' ``ForCausalLMLoss`` (labels shifted left, ``-100`` ignored, mean over labelled
tokens or the sum over ``num_items_in_batch``), value and gradients, for models whose forward is exactly
``base_model``, then a plain linear LM head on its last hidden state, then that loss. Support is read from the
model itself (:func:`logits_free_unsupported_reason`), never from a list of names: transformers' own class,
its stock causal-LM loss, no configured logit soft-capping, logit scaling or router auxiliary loss, and exactly
two children that hold parameters, the decoder stack and an ``nn.Linear`` output embedding (a head with a
transform before its projection, as BERT's, is not). tests/test_zoo_*.py check loss and gradients against
transformers' own forward for every causal LM in the zoo. Others keep their own forward, with the one-buffer
loss of :mod:`hf_lorax.loss`; :func:`hf_lorax.describe` says which loss a model trains with and why.

Label smoothing: a ``Trainer`` with ``label_smoothing_factor > 0`` removes the labels before calling the model
(its ``LabelSmoother`` then needs the logits), which would form the full logits. Set the smoothing on the model
instead (:func:`set_label_smoothing`, with ``label_smoothing_factor=0``) or train with
:class:`hf_lorax.TargetedLossTrainer`, which does that with ``label_smoothing_factor``; a training forward that
gets no labels warns once.

It is switched per model instance, before any other loss is installed: ``get_model(config,
logits_free_loss=False)`` or :func:`disable_logits_free_loss` leave the model's forward as transformers wrote it.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .loss import causal_lm_loss, causal_lm_loss_from_hidden, check_label_smoothing

# Config fields that change the logits after the LM head (soft-capping, scaling), matched by name: Gemma 2/3's
# ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, Falcon-H1's
# ``lm_head_multiplier``, ... A value of None (or 1 for a scale) leaves the logits as the head computes them.
_LOGIT_TRANSFORM = re.compile(r"(logit|lm_head).*(scal|cap|multiplier)|(scal|cap|multiplier).*(logit|lm_head)")
_NEUTRAL = (None, False, 1, 1.0)


def logits_free_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s training loss cannot be computed without logits (None: it can), read from the model."""
    from .integrations.transformers_api import uses_stock_causal_lm_loss

    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.models."):
        return f"{type(model).__qualname__} is not transformers' own class (its forward may compute more than the loss)"
    # hf_lorax's own one-buffer loss (installed after this check by get_model) is the stock loss, computed leaner
    if getattr(model, "loss_function", None) is not causal_lm_loss and not uses_stock_causal_lm_loss(model):
        return "the model does not compute transformers' stock causal-LM loss (a custom loss_function is set)"
    if not _forward_calls_loss_function(type(model)):
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
    if others:
        return f"its forward uses {others} besides the decoder stack and the LM head"
    return None


def _forward_calls_loss_function(cls: type) -> bool:
    """Whether ``cls.forward`` computes its loss with ``self.loss_function`` (BART's causal LM, for one, calls an
    unshifted ``CrossEntropyLoss`` inline, whatever ``loss_function`` says)."""
    try:
        return "self.loss_function(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source to read: not known to use the stock loss
        return False


class LogitsFreeCausalLM:
    """The training forward described in the module docstring, placed on one model instance."""

    def forward(self, *args, labels=None, **kwargs):
        head = self.get_output_embeddings()
        if labels is None and self.training and torch.is_grad_enabled():
            _warn_no_labels(self)
        if (labels is None or args or not self.training or not torch.is_grad_enabled()
                or kwargs.get("logits_to_keep", 0) != 0 or kwargs.get("shift_labels") is not None
                or kwargs.get("return_dict") is False
                or type(head) is not nn.Linear or hasattr(head, "_hf_hook")):  # accelerate-dispatched head
            return super().forward(*args, labels=labels, **kwargs)
        # the decoder stack the model's own forward calls (``self.model``, ``self.transformer``, ...), with the
        # same arguments; the LM head and the loss are replaced by the chunked linear cross-entropy
        kwargs.pop("logits_to_keep", None)
        outputs = dict(self.base_model(**kwargs))
        # A training step never reads the key/value cache: unless use_cache=True was passed, its copies of every
        # layer's k and v are dropped before the loss. (use_cache=False would skip them, but without an attention
        # mask it makes transformers check the position ids for packed sequences: a device sync.)
        if kwargs.get("use_cache") is not True:
            outputs.pop("past_key_values", None)
        # the loss holds the only reference to the last hidden state: on a CPU, once it has kept the labelled rows,
        # the rest is freed (nothing saves it for backward)
        loss = causal_lm_loss_from_hidden(outputs.pop("last_hidden_state").to(head.weight.device), head, labels,
                                          kwargs.get("num_items_in_batch"), getattr(self, _SMOOTHING, 0.0))
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.get("past_key_values"),
                                      hidden_states=outputs.get("hidden_states"), attentions=outputs.get("attentions"))


_SMOOTHING = "_hf_lorax_label_smoothing"


def set_label_smoothing(model: nn.Module, epsilon: float) -> None:
    """Label smoothing ``epsilon`` for the logits-free training loss of ``model`` (a base model or its ``PeftModel``).

    The ``Trainer``'s ``label_smoothing_factor`` takes the labels away from the model; with this set instead (and
    ``label_smoothing_factor=0``) the loss equals the ``Trainer``'s label-smoothed one and no logits are formed.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, LogitsFreeCausalLM):
        raise ValueError(f"{type(inner).__name__} does not compute a logits-free loss (see logits_free_unsupported_reason)"
                         "; use the Trainer's label_smoothing_factor instead (it forms the logits).")
    setattr(inner, _SMOOTHING, check_label_smoothing(epsilon))


def _warn_no_labels(model: nn.Module) -> None:
    if not getattr(model, "_hf_lorax_warned_no_labels", False):
        model._hf_lorax_warned_no_labels = True
        warnings.warn("hf_lorax: a training forward without labels forms the full logits. If a Trainer with "
                      "label_smoothing_factor > 0 removed them, set label_smoothing_factor=0 and call "
                      "hf_lorax.logits_free.set_label_smoothing(model, epsilon) (or use hf_lorax.TargetedLossTrainer) "
                      "to keep the loss logits-free.", UserWarning, stacklevel=3)


_CLASSES: dict[type, type] = {}
_PREFIX = "LogitsFree"


def logits_free_class(cls: type) -> type:
    """The subclass of ``cls`` with :class:`LogitsFreeCausalLM`'s forward (made once per class).

    Its ``__qualname__`` is ``LogitsFree<name>`` in this module, which :func:`__getattr__` rebuilds on demand, so a
    model pickled in one process loads in a fresh one (``torch.save(model)``, spawned DataLoader workers).
    """
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            return LogitsFreeCausalLM.forward(self, *args, **kwargs)

        # the model's own signature and docstring: the Trainer picks dataset columns and loss kwargs from it
        functools.update_wrapper(forward, cls.forward)
        # ``__name__`` stays the model's: the Trainer and others look model classes up by it (the Trainer's
        # label smoother shifts labels only for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        _CLASSES[cls] = type(cls.__name__, (LogitsFreeCausalLM, cls),
                             {"__module__": __name__, "__qualname__": _PREFIX + cls.__name__, "forward": forward})
    return _CLASSES[cls]


def __getattr__(name: str) -> type:
    """``LogitsFree<transformers class name>``: the class pickle asks for by name (see :func:`logits_free_class`)."""
    if name.startswith(_PREFIX):
        import transformers

        base = getattr(transformers, name[len(_PREFIX):], None)
        if isinstance(base, type):
            return logits_free_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_logits_free_loss(model: nn.Module) -> bool:
    """Give ``model`` (this instance) :class:`LogitsFreeCausalLM`'s forward if it supports it; returns whether it did."""
    if isinstance(model, LogitsFreeCausalLM):
        return True
    if logits_free_unsupported_reason(model) is not None:
        return False
    model.__class__ = logits_free_class(type(model))
    return True


def disable_logits_free_loss(model: nn.Module) -> None:
    """Give ``model`` (a base model, or the ``PeftModel`` around it) its own class's forward back."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, LogitsFreeCausalLM):
        inner.__class__ = next(c for c in type(inner).__mro__[1:] if not issubclass(c, LogitsFreeCausalLM))
