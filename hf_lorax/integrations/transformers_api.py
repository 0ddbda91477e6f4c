"""transformers internals hf_lorax reads (no hooks): which loss a model computes."""

from __future__ import annotations

from torch import nn

from .guard import InternalAPI

LOSS_MAPPING_API = InternalAPI(
    path="transformers.loss.loss_utils:ForCausalLMLoss",
    params=("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels"),
    library="transformers", verified=("5.0.0", "5.24.0"),
    reason="hf_lorax's causal-LM loss replaces this one only where a model uses it unchanged",
)


def uses_stock_causal_lm_loss(model: nn.Module) -> bool:
    """Whether ``model`` computes transformers' stock ``ForCausalLMLoss`` (not a loss the user or a subclass set)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if getattr(model, "_loss_function", None) is not None or not hasattr(type(model), "loss_function"):
        return False  # a custom loss the user set, or not a transformers model
    try:
        return model.loss_function is LOSS_MAPPING["ForCausalLM"]
    except (AttributeError, KeyError):
        return False


def is_trainer_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is named as the ``Trainer`` names its periodic checkpoints (``checkpoint-<step>``)."""
    import os
    import re

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    name = os.path.basename(os.path.normpath(os.fspath(path)))
    return re.fullmatch(re.escape(PREFIX_CHECKPOINT_DIR) + r"-\d+", name) is not None
