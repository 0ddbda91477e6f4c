"""``TargetedLossTrainer``: a ``Trainer`` whose ``label_smoothing_factor`` is an option of the logits-free loss.

With ``label_smoothing_factor > 0`` a plain ``Trainer`` takes the labels away from the model and computes its
``LabelSmoother`` loss from the full ``batch × seq × vocab`` logits. This ``Trainer`` instead gives the model's
logits-free training loss (:mod:`hf_lorax.logits_free`, which it switches on for a model that supports it) the
smoothing and leaves the labels with the model, so the training loss is computed from the hidden states in row
chunks: one loss, no logits. The value equals the ``Trainer``'s label-smoothed loss, averaged over labelled tokens
or summed and divided by ``num_items_in_batch`` (tests/test_e2e.py checks value and gradients). Evaluation, and
a model the logits-free loss does not support, take the ``Trainer``'s own path.
"""

from __future__ import annotations

from transformers import Trainer

from .logits_free import enable_logits_free_loss, set_label_smoothing
from .loss import check_label_smoothing


class TargetedLossTrainer(Trainer):
    """A ``Trainer`` whose label-smoothed causal-LM training loss never forms the logits (see module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_label_smoothing(self.args.label_smoothing_factor, "label_smoothing_factor")
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.logits_free = enable_logits_free_loss(inner)
        if self.logits_free:
            set_label_smoothing(inner, self.args.label_smoothing_factor)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.logits_free and model.training and self.label_smoother is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        smoother, self.label_smoother = self.label_smoother, None  # the labels stay: the model smooths its loss
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.label_smoother = smoother
