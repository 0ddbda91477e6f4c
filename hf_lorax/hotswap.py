"""``hotswap_adapter``: peft's hotswap with each module's own scaling, so rank and alpha maps swap correctly.

peft 0.21's hotswap gives every module ``lora_alpha / r`` when an adapter has ``rank_pattern`` / ``alpha_pattern``
(:mod:`hf_lorax.hooks` holds the hook that fixes peft's own function for hf_lorax adapters). This
entry runs peft's hotswap and then sets each module's scaling from its module name, as peft does when it loads the
adapter directly: right for plain peft adapters with patterns too, and with the hook off.
"""

from __future__ import annotations

from typing import Any

from peft import PeftConfig
from torch import nn

from .integrations.peft_api import LoraLayer, pattern_value, peft_hotswap_adapter, set_scaling
from .slices import lora_scaling


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str = "default",
                    torch_device: str | None = None, **kwargs: Any) -> None:
    """Replace ``adapter_name``'s weights and scalings in ``model`` (a ``PeftModel``) by the adapter at
    ``model_name_or_path``, in place; the result equals loading that adapter directly.

    Same arguments as ``peft.utils.hotswap.hotswap_adapter`` (``subfolder``, ``revision``, ``token``, ... in
    ``kwargs``); works on ``torch.compile``-d models prepared with ``prepare_model_for_compiled_hotswap``.
    """
    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    check_hotswappable(config, model_name_or_path)
    peft_hotswap_adapter(model, model_name_or_path, adapter_name=adapter_name, torch_device=torch_device, **kwargs)
    set_module_scalings(model, config, adapter_name)


def check_hotswappable(config, source: str = "this adapter") -> None:
    """peft 0.21's hotswap swaps LoRA weights only: with ``modules_to_save`` it fails on a bare ``KeyError`` naming a
    head parameter, so refuse such an adapter by name first."""
    if config.modules_to_save:
        raise ValueError(f"{source} trains modules in full ({sorted(set(config.modules_to_save))}, e.g. a task "
                         "head); peft's hotswap swaps LoRA weights only. Load it with PeftModel.from_pretrained / "
                         "model.load_adapter instead, or hotswap adapters saved without modules_to_save.")


def set_module_scalings(model: nn.Module, config, adapter_name: str) -> None:
    """Set every LoRA layer's scaling of ``adapter_name`` from ``config``'s patterns by module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            key = name.removeprefix("_orig_mod.").removeprefix("base_model.model.")
            r = pattern_value(config.rank_pattern or {}, key, config.r)
            alpha = pattern_value(config.alpha_pattern or {}, key, config.lora_alpha)
            set_scaling(module, adapter_name, lora_scaling(alpha, r, config.use_rslora))
