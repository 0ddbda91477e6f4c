"""transformers internals hf_lorax touches: the ``load_adapter`` it hooks, which loss a model computes, checkpoint names."""

from __future__ import annotations

import functools

from .guard import InternalAPI

TRANSFORMERS_RANGE = ("5.0.0", "5.24.0")
LOAD_ADAPTER = InternalAPI(
    path="transformers.integrations.peft:PeftAdapterMixin.load_adapter",
    params=("self", "peft_model_id", "adapter_name"), library="transformers", verified=TRANSFORMERS_RANGE,
    reason="transformers 5.x keeps freshly initialised DoRA magnitudes instead of the saved ones")
LOSS_MAPPING_API = InternalAPI(
    path="transformers.loss.loss_utils:ForCausalLMLoss", library="transformers", verified=TRANSFORMERS_RANGE,
    params=("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels"),
    reason="the logits-free loss replaces this one only where a model uses it unchanged")


@functools.cache  # checked once: the installed transformers does not change while the process runs
def stock_causal_lm_loss():
    """transformers' stock ``ForCausalLMLoss`` (what a causal LM's ``loss_function`` is unless a loss was set), or
    None with transformers outside the verified range (there a model keeps its own loss)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    return None if LOSS_MAPPING_API.problem() else LOSS_MAPPING.get("ForCausalLM")


def is_trainer_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is named as the ``Trainer`` names its periodic checkpoints (``checkpoint-<step>``)."""
    import os
    import re

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    name = os.path.basename(os.path.normpath(os.fspath(path)))
    return re.fullmatch(re.escape(PREFIX_CHECKPOINT_DIR) + r"-\d+", name) is not None
