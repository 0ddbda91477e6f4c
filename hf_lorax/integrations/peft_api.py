"""peft internals hf_lorax uses, each wrapped in a small function or re-exported under one name.

Nothing else in hf_lorax imports a private peft name. :data:`PEFT_INTERNALS` declares them with the
signatures ``tests/test_integrations.py`` checks.
"""

from __future__ import annotations

from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.tuners.tuners_utils import _ExcludedModule as ExcludedModule
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers as include_all_linear_layers
from peft.utils import ModulesToSaveWrapper, hotswap
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter  # peft's public hotswap_adapter
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import get_pattern_key
from torch import nn

from .guard import InternalAPI, require_signatures

PEFT_RANGE = ("0.21.0", "0.22.0")  # 0.22 reorganises LoRA layer construction (upstream changelog)
# Names of the submodules peft's LoRA layers add under an adapted module (``lora_A``, ``lora_dropout``, ...): peft
# matches ``modules_to_save`` by name suffix, so an entry must not be a suffix of these.
ADAPTER_CHILD_NAMES = (*LoraLayer.adapter_layer_names, "lora_dropout", "base_layer")


def _api(path: str, params: tuple[str, ...], reason: str, hooked_on: str = "") -> InternalAPI:
    return InternalAPI(path, params, "peft", PEFT_RANGE, reason, hooked_on)


# hooked on LoraModel only, not on BaseTuner (every peft tuner)
INJECT_ADAPTER = _api("peft.tuners.tuners_utils:BaseTuner.inject_adapter", ("self", "model", "adapter_name"),
                      "hand peft a resolved copy of an hf_lorax config before it injects layers (it reads "
                      "self.peft_config[adapter_name] first thing)", hooked_on="peft.tuners.lora:LoraModel")
CONFIG_FROM_PRETRAINED = _api("peft.config:PeftConfigMixin.from_pretrained",
                              ("cls", "pretrained_model_name_or_path", "subfolder"),
                              "read hf_lorax.json beside adapter_config.json")
HOTSWAP_FROM_STATE_DICT = _api(
    "peft.utils.hotswap:hotswap_adapter_from_state_dict", ("model", "state_dict", "adapter_name", "config"),
    "peft's hotswap_adapter gives every module of a rank- or alpha-mapped adapter lora_alpha / r")
HOTSWAP_UPDATE_SCALING = _api("peft.utils.hotswap:_update_scaling", ("lora_module", "adapter_name", "scaling"),
                              "hf_lorax.hotswap_adapter sets each module's scaling as peft's hotswap does "
                              "(a tensor under torch.compile), from the module's own rank and alpha")
PEFT_INTERNALS = [
    INJECT_ADAPTER,
    CONFIG_FROM_PRETRAINED,
    _api("peft.tuners.tuners_utils:BaseTuner._check_target_module_exists", ("peft_config", "key"),
         "peft's own target matcher, so hf_lorax validates exactly what peft will adapt"),
    _api("peft.tuners.tuners_utils:_maybe_include_all_linear_layers", ("peft_config", "model"),
         "expand target_modules='all-linear' the way peft does"),
    _api("peft.utils.other:get_pattern_key", ("pattern_keys", "key_to_match"),
         "peft's rank_pattern matching, so a resolved rank is the rank peft builds"),
    _api("peft.tuners.lora.config:LoraConfig._register_custom_module", ("self", "mapping"),
         "route layer creation to hf_lorax's layers (peft's documented experimental API)"),
    _api("peft.tuners.lora.layer:LoraLayer.__init__", ("self", "base_layer", "ephemeral_gpu_offload"),
         "hf_lorax's layers initialise peft's LoRA state without peft's Linear.__init__"),
    _api("peft.tuners.lora.layer:LoraLayer.update_layer", ("self", "adapter_name", "r", "lora_alpha", "config"),
         "fused-slice layers create a rank n*r LoRA and then split its B"),
    _api("peft.tuners.lora.layer:LoraLayer._cache_store", ("self", "key", "value"),
         "DoRA merge/unmerge keep the weight norm as peft's DoRA does"),
    _api("peft.tuners.lora.layer:LoraLayer._unmerged_base_weight", ("self",),
         "DoRA's norm for merging comes from the weight without other merged adapters"),
    _api("peft.tuners.tuners_utils:check_adapters_to_merge", ("module", "adapter_names"),
         "quantized layers merge into a dense copy with peft's adapter selection"),
    HOTSWAP_UPDATE_SCALING,
]

__all__ = ["ADAPTER_CHILD_NAMES", "BaseTunerLayer", "ExcludedModule", "LoraLayer", "LoraModel", "LoraVariant",
           "PEFT_INTERNALS", "check_adapters_to_merge", "dequantize_module_weight", "init_lora_state",
           "include_all_linear_layers", "is_wrapped_head", "pattern_value", "peft_bnb_module", "peft_hotswap_adapter",
           "peft_lora", "register_layers", "set_scaling", "target_module_exists"]

# peft's own target matcher (a static method): True, an ``ExcludedModule`` or None for a module name
target_module_exists = LoraModel._check_target_module_exists


def pattern_value(pattern, name: str, default):
    """The value peft picks for ``name`` from a ``rank_pattern`` / ``alpha_pattern`` (first regex match)."""
    return pattern.get(get_pattern_key(list(pattern), name), default)


def set_scaling(module: nn.Module, adapter_name: str, scaling: float) -> None:
    """Set a LoRA layer's scaling in place as peft's hotswap does (a tensor scaling keeps its identity)."""
    require_signatures([HOTSWAP_UPDATE_SCALING], "hotswap adapters")
    hotswap._update_scaling(module, adapter_name=adapter_name, scaling=scaling)


def is_wrapped_head(module: nn.Module) -> bool:
    return isinstance(module, ModulesToSaveWrapper)


def register_layers(config, mapping: dict) -> None:
    """Make peft build ``mapping[type(target)]`` for targets of that type (first matching key wins).

    First checks that every peft internal the layers build on still has the verified signature: on a peft
    that changed one, this stops with an error naming it instead of building layers that may misbehave.
    """
    require_signatures(PEFT_INTERNALS[2:], "build its LoRA layers")
    config._register_custom_module(mapping)


def peft_bnb_module():
    """peft's bitsandbytes LoRA layers (imported on demand: it needs bitsandbytes)."""
    from peft.tuners.lora import bnb

    return bnb


def init_lora_state(layer: nn.Module, base_layer: nn.Module, **kwargs) -> None:
    """Initialise peft's LoRA bookkeeping on ``layer`` without running a peft layer class's ``__init__``.

    peft's ``Linear.__init__`` decides Conv1D handling from ``config.fan_in_fan_out``; hf_lorax's layers decide
    it from the layer type, so they call the shared ``LoraLayer.__init__`` directly.
    """
    nn.Module.__init__(layer)
    LoraLayer.__init__(layer, base_layer, **kwargs)
