"""What :func:`hf_lorax.get_model` does to a base model before adapters go in (small, explicit steps)."""

from __future__ import annotations

from torch import nn

from .config import LoRAConfig, QLoRAConfig
from .integrations.peft_api import register_layers
from .layers import layer_mapping
from .plan import resolve


def declare_mean_loss(model: nn.Module) -> None:
    """Tell the Trainer that this head's loss is a plain mean.

    transformers' classification / QA heads take ``**kwargs`` but compute a mean loss without
    ``num_items_in_batch``; seeing ``**kwargs``, the Trainer assumes a sum over the global batch and multiplies
    the loss by the number of processes, so under DDP the loss and gradients come out N times too large (and
    gradient clipping then changes the result). ``accepts_loss_kwargs = False`` is the Trainer's own switch.
    """
    if "accepts_loss_kwargs" not in vars(type(model)) and hasattr(model, "forward"):
        model.accepts_loss_kwargs = False


def prepare_injection(config: LoRAConfig, model: nn.Module) -> LoRAConfig:
    """The config peft should inject into ``model``: ``config`` itself when it carries a plan already, else its
    resolved copy (:meth:`~hf_lorax.config.LoRAConfig.with_plan`); ``config`` is never changed. Also tells the
    Trainer the head's loss is a mean and registers hf_lorax's layers on the returned config.

    :func:`hf_lorax.get_model` and the peft hook (for ``peft.get_peft_model``, ``add_adapter``,
    ``PeftModel.from_pretrained``, ...) both call it before peft injects.
    """
    check_quantized_base(config, model)
    resolved = config if config.resolved_plan is not None else config.with_plan(resolve(config, model))
    if resolved.resolved_plan.modules_to_save:
        declare_mean_loss(model)
    register_layers(resolved, layer_mapping())
    return resolved


def check_quantized_base(config: LoRAConfig, model: nn.Module) -> None:
    """A :class:`QLoRAConfig` the user built needs a bitsandbytes-quantized base: refuse an unquantized one.

    Why an error and not quantizing: ``peft.get_peft_model`` / ``SFTTrainer(peft_config=...)`` receive a model the
    user already built and placed; replacing its weights in place by 4-bit copies would change that object (and
    its device and dtype) behind their back. A saved QLoRA adapter (a resolved config) may load onto an
    unquantized base, as with plain peft (e.g. to serve it in bf16).
    """
    if not isinstance(config, QLoRAConfig) or config.is_resolved:
        return
    from .quantization import is_quantized

    if not is_quantized(model):
        raise ValueError(
            f"QLoRAConfig needs a quantized base, but this {type(model).__name__} has no bitsandbytes-quantized linear "
            "layers (4-bit or 8-bit), so its quant_type/compute_dtype would be ignored. Load the base with "
            "quantization_config=config.bnb_config() (for TRL: model_init_kwargs={'quantization_config': ...}), or "
            "let hf_lorax.get_model(config) load it; for an unquantized base use LoRAConfig / DoRAConfig."
        )


def prepare_base_model(config: LoRAConfig, model: nn.Module, logits_free_loss: bool = True) -> nn.Module:
    """Causal LMs train without logits (:mod:`hf_lorax.logits_free`, unless ``logits_free_loss=False``) and get
    the one-buffer loss of :mod:`hf_lorax.loss` wherever logits are formed; quantized bases k-bit preparation."""
    if config.task_type == "CAUSAL_LM":
        from .logits_free import enable_logits_free_loss
        from .loss import install_causal_lm_loss

        if logits_free_loss:
            enable_logits_free_loss(model)  # first: it checks that the model computes the stock loss
        install_causal_lm_loss(model)
    if isinstance(config, QLoRAConfig):
        from .quantization import prepare_for_kbit_training

        prepare_for_kbit_training(model)
    return model
