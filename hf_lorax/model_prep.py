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


def prepare_injection(config: LoRAConfig, model: nn.Module) -> None:
    """Make ``config`` ready for peft to inject into ``model``: resolved (in place, unless it already carries a
    plan), the Trainer told the head's loss is a mean, hf_lorax's layers registered.

    :func:`hf_lorax.get_model` calls it on the resolved copy it hands peft; the peft hook on the config object
    peft already holds (``peft.get_peft_model`` keeps the object it is given and edits it itself).
    """
    if config.resolved_plan is None:
        config.adopt_plan(resolve(config, model))
    if config.resolved_plan.modules_to_save:
        declare_mean_loss(model)
    register_layers(config, layer_mapping())


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
