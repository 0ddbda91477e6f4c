"""``TargetedLossTrainer``: a ``Trainer`` that hands ``label_smoothing_factor`` to hf_lorax's one causal-LM loss.

Why this exists: with ``label_smoothing_factor > 0`` a plain ``Trainer`` takes the labels away from the model and
computes its ``LabelSmoother`` loss from the full ``batch × seq × vocab`` logits. This ``Trainer`` instead captures
the hidden states that enter the model's LM head (a forward pre-hook on ``lm_head``; the head then runs on zero
positions) and computes the label-smoothed loss from them with :func:`hf_lorax.loss.causal_lm_loss_from_hidden`,
the loss a logits-free model computes itself: no logits, and rows without a label weigh 0 (no boolean gather).
The model is still called through its own ``forward`` (``PeftModel``, DDP, accelerate wrappers, LoRA layers and
dropout behave as usual), so any causal LM with a plain ``nn.Linear`` head works, not only the architectures
:mod:`hf_lorax.logits_free` verifies; with another head (or when logits are asked for) the model's logits go to
:func:`hf_lorax.loss.causal_lm_loss` with the same smoothing.

The value equals the Trainer's label-smoothed loss (``LabelSmoother(shift_labels=True)``), averaged over labelled
tokens or summed and divided by ``num_items_in_batch`` (tests/test_e2e.py checks value and gradients to 1e-5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import Trainer

from .loss import causal_lm_loss, causal_lm_loss_from_hidden, check_label_smoothing, check_labels_shape


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
def captured_head_input(head: nn.Module, tokens: tuple[int, int]) -> Iterator[list[torch.Tensor]]:
    """While active, what enters ``head`` (``batch × tokens × hidden``) is appended to the yielded list and the
    head runs on zero positions instead, so the model forms no logits."""
    captured: list[torch.Tensor] = []

    def capture(module, args):
        (hidden, *rest) = args
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(tokens):
            raise RuntimeError(f"lm_head got hidden states of shape {tuple(hidden.shape)}, expected {tuple(tokens)} x "
                               "hidden: the model must run its head once on every position (logits_to_keep=0).")
        captured.append(hidden)
        return (hidden[:, :0], *rest)

    handle = head.register_forward_pre_hook(capture)
    head._hf_lorax_loss_from_input = True  # a logits-free model then does not warn that it got no labels
    try:
        yield captured
    finally:
        handle.remove()
        del head._hf_lorax_loss_from_input
    if len(captured) != 1:
        raise RuntimeError(f"lm_head ran {len(captured)} times in one forward; expected once.")


def targeted_causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    return_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss, logits)`` of a causal LM: the label-smoothed causal-LM loss of ``model(**inputs)`` against ``labels``.

    ``inputs`` are the model's keyword inputs without ``labels``. With ``return_logits=False`` and a plain
    ``nn.Linear`` head no logits are formed (``None`` is returned in their place); else ``logits`` are the model's.
    """
    label_smoothing = check_label_smoothing(label_smoothing)
    if inputs.get("input_ids") is not None:
        check_labels_shape(labels, inputs["input_ids"].shape, "input_ids")
    head = output_embeddings(model)
    if not return_logits and type(head) is nn.Linear:
        with captured_head_input(head, tuple(labels.shape)) as captured:
            model(**inputs, use_cache=False)
        return causal_lm_loss_from_hidden(captured[0], head, labels, num_items_in_batch, label_smoothing), None
    outputs = model(**inputs, use_cache=False)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return causal_lm_loss(logits, labels, logits.shape[-1], num_items_in_batch,
                          label_smoothing=label_smoothing), logits


class TargetedLossTrainer(Trainer):
    """A ``Trainer`` whose causal-LM loss never forms the logits, label smoothing included (see module docstring).

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
