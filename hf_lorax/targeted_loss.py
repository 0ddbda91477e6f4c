"""Causal-LM loss computed only where there are labels: the LM head runs on labelled positions alone.

Why this exists: for GPT-2 the LM head (a ``hidden x 50,257`` matmul), its log-softmax and their backward
dominate a training step's time and memory, and in E2E training about half of every sequence is the MR
prefix (label -100) plus padding. ``transformers``' recipe computes all ``batch x seq x 50,257`` logits
and then masks most of them out of the loss. Here a forward pre-hook on the model's output embeddings
(``lm_head``) hands it only the hidden states whose *next* token has a label, so the logits tensor is
``n_labelled x vocab``. The model is still called through its own ``forward`` (``PeftModel``, DDP,
accelerate wrappers, LoRA layers and dropout all behave as usual).

The value equals the Trainer's label-smoothed loss (``LabelSmoother(shift_labels=True)``, i.e.
``label_smoothing_factor``): ``(1 - eps) * NLL + eps * mean over the vocabulary of -log p``, averaged over
labelled tokens, or summed and divided by ``num_items_in_batch`` when the Trainer normalises over a whole
gradient-accumulation batch (tests/test_e2e.py checks value and gradients to 1e-5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .loss import check_labels_shape, linear_cross_entropy, per_item

IGNORE_INDEX = -100


def output_embeddings(model: nn.Module) -> nn.Module:
    """The LM head of a (possibly peft- or accelerate-wrapped) causal LM."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP / DataParallel
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PeftModel: LoRA layers are injected in place, the head is the base's
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head); targeted loss needs a causal LM.")
    return head


@contextlib.contextmanager
def head_on_positions(head: nn.Module, mask: torch.Tensor, capture: list | None = None) -> Iterator[None]:
    """While active, ``head`` receives ``hidden[:, :-1][mask]`` (shape ``n x hidden``) instead of ``hidden``.

    ``mask`` is ``batch x (seq - 1)``: position ``t`` is kept when the token at ``t + 1`` has a label. With
    ``capture``, those hidden states are appended to it and the head gets none of them (``0 x hidden``): the
    loss is then computed from the hidden states without any logits (:func:`hf_lorax.loss.linear_cross_entropy`);
    under ``torch.compile`` the captured tensor is ``hidden[:, :-1]`` whole (``batch x (seq - 1) x hidden``).
    """
    calls = []

    def gather(module, args):
        (hidden, *rest) = args
        expected = (mask.shape[0], mask.shape[1] + 1)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != expected:
            raise RuntimeError(f"lm_head got hidden states of shape {tuple(hidden.shape)}, expected {expected} x hidden: "
                               "the model must run its head once on every position (logits_to_keep=0).")
        calls.append(1)
        if capture is not None and torch.compiler.is_compiling():
            # a boolean gather has a data-dependent shape (a graph break under torch.compile): hand over every
            # position instead; the unlabelled ones carry ignore_index and add nothing to the loss
            capture.append(hidden[:, :-1])
            return (hidden[:, :0], *rest)
        selected = hidden[:, :-1][mask]
        if capture is not None:
            capture.append(selected)
            return (selected[:0], *rest)
        return (selected, *rest)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(f"lm_head ran {len(calls)} times in one forward; expected once.")


def targeted_causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, logits)`` of a causal LM with the head applied only where the shifted labels are not -100.

    ``inputs`` are the model's keyword inputs without ``labels``; ``logits`` is ``n_labelled x vocab``. With
    ``return_logits=False`` and a plain ``nn.Linear`` head (not itself adapted), no logits are formed at all:
    the head's matmul and the cross-entropy run in row chunks (:class:`hf_lorax.loss.LinearCrossEntropy`),
    and ``None`` is returned in their place.
    """
    if not 0 <= label_smoothing <= 1:  # ``not`` catches NaN
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1].")
    if inputs.get("input_ids") is not None:
        check_labels_shape(labels, inputs["input_ids"].shape, "input_ids")
    shifted = labels[:, 1:]
    mask = shifted.ne(IGNORE_INDEX)
    targets = shifted[mask]
    head = output_embeddings(model)
    logits_free = not return_logits and type(head) is nn.Linear
    captured: list[torch.Tensor] = []
    with head_on_positions(head, mask, captured if logits_free else None):
        outputs = model(**inputs, use_cache=False)
    if logits_free:
        logits = None
        hidden = captured[0]
        rows_targets = shifted if hidden.dim() == 3 else targets  # every position, captured under torch.compile
        loss_sum = linear_cross_entropy(hidden, head.weight, rows_targets, head.bias, label_smoothing, IGNORE_INDEX)
    else:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # fp32 log-softmax, as the LabelSmoother's smoothed term; the tensor is small now (n_labelled x vocab)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
    return per_item(loss_sum, targets.numel(), num_items_in_batch), logits


class TargetedLossTrainer(Trainer):
    """A ``Trainer`` whose causal-LM loss runs the LM head on labelled positions only (see module docstring).

    Label smoothing comes from ``TrainingArguments.label_smoothing_factor``; gradient accumulation and
    ``average_tokens_across_devices`` are handled as in ``Trainer.compute_loss``.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer then divides a per-batch mean by the accumulation steps
        loss, logits = targeted_causal_lm_loss(model, inputs, labels, self.args.label_smoothing_factor,
                                               num_items_in_batch, return_logits=return_outputs)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss
