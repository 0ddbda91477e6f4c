"""Everything :func:`hf_lorax.get_model` checks and changes on a base model before peft injects, in one place.

:func:`prepare` runs once per model: first every check that can reject the config for this model (the plan, the
head's label count, a quantized base for QLoRA), so nothing is changed before a typo is reported; then every change
(a pad token for GPT-2-style classification heads, the Trainer's loss normalisation, the causal-LM loss, k-bit
preparation); then hf_lorax's layers are registered on the resolved copy that peft receives. The user's config is
never changed. :func:`injection_config` is the part the peft hook needs when a user hands an hf_lorax config to
peft or transformers directly (their model is theirs: only what injecting needs).
"""

from __future__ import annotations

import logging

from torch import nn

from .config import LoRAConfig, QLoRAConfig
from .integrations.peft_api import register_layers
from .layers import layer_mapping
from .loss import prepare_causal_lm_loss
from .plan import resolve
from .quantization import is_quantized, prepare_for_kbit_training
from .task_types import LABELLED_TASK_TYPES, task_name

logger = logging.getLogger(__name__)


def prepare(config: LoRAConfig, model: nn.Module, logits_free_loss: bool = True) -> LoRAConfig:
    """Check ``config`` against ``model``, prepare ``model`` and return the resolved config peft injects."""
    resolved = config if config.resolved_plan is not None else config.with_plan(resolve(config, model))
    _check_num_labels(config, model)
    check_quantized_base(config, model)
    _fill_pad_token(config, model)
    if resolved.resolved_plan.modules_to_save:
        declare_mean_loss(model)
    if task_name(config.task_type) == "CAUSAL_LM":
        prepare_causal_lm_loss(model, logits_free_loss)
    if isinstance(config, QLoRAConfig):
        prepare_for_kbit_training(model)
    register_layers(resolved, layer_mapping())
    return resolved


def injection_config(config: LoRAConfig, model: nn.Module) -> LoRAConfig:
    """The config peft should inject into ``model`` (the peft hook's one call): ``config`` itself when it carries a
    plan already (:func:`prepare` made it), else its resolved copy; hf_lorax's layers registered on it."""
    if config.resolved_plan is None:
        check_quantized_base(config, model)
        config = config.with_plan(resolve(config, model))
        if config.resolved_plan.modules_to_save:
            declare_mean_loss(model)
    register_layers(config, layer_mapping())
    return config


def declare_mean_loss(model: nn.Module) -> None:
    """Tell the Trainer that this head's loss is a plain mean.

    transformers' classification / QA heads take ``**kwargs`` but compute a mean loss without
    ``num_items_in_batch``; seeing ``**kwargs``, the Trainer assumes a sum over the global batch and multiplies
    the loss by the number of processes, so under DDP the loss and gradients come out N times too large (and
    gradient clipping then changes the result). ``accepts_loss_kwargs = False`` is the Trainer's own switch.
    """
    if "accepts_loss_kwargs" not in vars(type(model)) and hasattr(model, "forward"):
        model.accepts_loss_kwargs = False


def check_quantized_base(config: LoRAConfig, model: nn.Module) -> None:
    """A :class:`QLoRAConfig` the user built needs a bitsandbytes-quantized base: refuse an unquantized one.

    Why an error and not quantizing: ``peft.get_peft_model`` / ``SFTTrainer(peft_config=...)`` receive a model the
    user already built and placed; replacing its weights in place by 4-bit copies would change that object (and
    its device and dtype) behind their back. A saved QLoRA adapter (a resolved config) may load onto an
    unquantized base, as with plain peft (e.g. to serve it in bf16).
    """
    if not isinstance(config, QLoRAConfig) or config.is_resolved:
        return
    if not is_quantized(model):
        raise ValueError(
            f"QLoRAConfig needs a quantized base, but this {type(model).__name__} has no bitsandbytes-quantized linear "
            "layers (4-bit or 8-bit), so its quant_type/compute_dtype would be ignored. Load the base with "
            "quantization_config=config.bnb_config() (for TRL: model_init_kwargs={'quantization_config': ...}), or "
            "let hf_lorax.get_model(config) load it; for an unquantized base use LoRAConfig / DoRAConfig."
        )


def _check_num_labels(config: LoRAConfig, model: nn.Module) -> None:
    model_config = getattr(model, "config", None)
    if model_config is None or not config.num_labels or task_name(config.task_type) not in LABELLED_TASK_TYPES:
        return
    if model_config.num_labels != config.num_labels:
        raise ValueError(
            f"config.num_labels={config.num_labels} but the model's head has {model_config.num_labels} labels. "
            "Load the model with the same num_labels, or let get_model load it."
        )


def _fill_pad_token(config: LoRAConfig, model: nn.Module) -> None:
    model_config = getattr(model, "config", None)
    if model_config is None or task_name(config.task_type) != "SEQ_CLS":
        return
    eos = getattr(model_config, "eos_token_id", None)
    if getattr(model_config, "pad_token_id", None) is None and eos is not None:
        # GPT-2-style heads need a pad id to find the last token of each row
        model_config.pad_token_id = eos if isinstance(eos, int) else eos[0]
        logger.info("pad_token_id was unset; using eos_token_id=%s for the classification head.", eos)
