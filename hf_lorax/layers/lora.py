"""hf_lorax's LoRA tuner layers, plugged into peft with ``LoraConfig._register_custom_module``.

They subclass peft's ``lora.Linear`` / ``lora.Embedding``, so merging, adapter switching, mixed-batch
inference and saving behave exactly as in peft, and parameter names stay peft's (``lora_A``, ``lora_B``,
``lora_magnitude_vector``). What they change:

* DoRA uses :mod:`hf_lorax.layers.dora` (norm from the factors, no d×k temporaries);
* ``Conv1D`` is recognised by type, not by the config's ``fan_in_fan_out`` flag;
* a layer on a fused projection can adapt only some slices (:class:`~hf_lorax.layers.sliced.SlicedLoraB`: a
  dense block-structured ``B`` whose off-slice entries get no gradient);
* one forward rule (:class:`~hf_lorax.layers.fused.LinearForwardMixin`): the fused node or the plain maths,
  the same function with the same dropout mask; peft's forward only for what only it covers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..integrations.peft_api import init_lora_state, peft_lora
from .dora import FactorizedDoraEmbeddingVariant, FactorizedDoraLinearVariant
from .fused import LinearForwardMixin
from .sliced import SlicedLoraB


class PlannedLayerMixin:
    """``__init__`` and ``update_layer`` of hf_lorax's linear layers, dense and quantized: the module's rank, alpha
    and slices come from the config's resolved plan."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1, **kwargs):
        init_lora_state(self, base_layer, **kwargs)
        # Conv1D stores its weight as (in, out); decide from the layer, not the config flag (the plan set
        # config.fan_in_fan_out, as peft would)
        self.fan_in_fan_out = self.is_target_conv_1d_layer = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        target = kwargs.get("target_name", "")
        # A config with rank/alpha maps or fused slices that reaches a layer unresolved would be built wrong, so it
        # raises instead (this happens only when hf_lorax's peft hook is disabled, see hf_lorax.integrations).
        plan = getattr(config, "resolved_plan", None)
        if plan is None and any(getattr(config, name, None) for name in ("rank_map", "alpha_map", "fused_slices")):
            raise RuntimeError(f"{type(config).__name__} with rank_map/alpha_map/fused_slices reached peft "
                               f"unresolved (module {target}). Build the model with hf_lorax.get_model(config, "
                               "model=...), which resolves the config itself.")
        entry = None if plan is None else plan.modules.get(target)  # the module's ModulePlan (None: not planned)
        sliced = entry is not None and entry.slices is not None
        if entry is not None:  # the plan's values are the ones peft read from rank_pattern / alpha_pattern
            r, lora_alpha = entry.module_r, entry.module_alpha
        init = config.init_lora_weights
        if sliced and not (init is True or init is False or init == "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} cannot be used with fused_slices on {target}: it "
                             "derives A and B from the full weight. Use True or 'gaussian', or drop fused_slices "
                             "for this module.")
        if sliced and config.lora_bias:
            raise ValueError(f"lora_bias=True is not supported with fused_slices (module {target}).")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        if sliced:
            self._use_slices(adapter_name, entry, config)
        elif adapter_name in getattr(self, "slice_specs", {}):  # a plain adapter re-created under this name
            self.slice_specs = {k: v for k, v in self.slice_specs.items() if k != adapter_name}

    def _use_slices(self, adapter: str, entry, config) -> None:
        """Swap peft's dense ``B`` for a :class:`SlicedLoraB` with the same values off-block-zeroed."""
        dense = self.lora_B[adapter].weight
        rows = entry.slices.rows(self.out_features, entry.name)
        # the mask on the base weight's device: under low_cpu_mem_usage peft builds the adapter on meta and assigns
        # the weights later, but the mask is no saved state and must be real from the start
        sliced = SlicedLoraB(self.out_features, rows, entry.r, device=self.get_base_layer().weight.device)
        # zero init stays zero; init_lora_weights=False keeps its blocks. low_cpu_mem_usage (meta): peft assigns the
        # loaded weight later
        values = torch.empty_like(dense) if dense.is_meta else dense.detach() * sliced.slice_mask
        sliced.weight = nn.Parameter(values, requires_grad=dense.requires_grad)
        if config.init_lora_weights == "gaussian":  # std 1/r of the per-slice rank, not of n*r
            nn.init.normal_(self.lora_A[adapter].weight, std=1 / entry.r)
        self.lora_B[adapter] = sliced
        self.slice_specs = {**getattr(self, "slice_specs", {}), adapter: entry.slices}
        if adapter in self.lora_variant:  # the magnitude must see the sliced B
            self.lora_variant[adapter].init(self, adapter_name=adapter, config=config)


class TunerLayerMixin:
    """What every hf_lorax tuner layer adds to peft's: a repr that says hf_lorax, and merge / unmerge that drop
    DoRA's cached ‖W‖² when they rewrite the frozen weight (the quantized layers merge into a dense copy instead)."""

    def __repr__(self) -> str:
        return "hf_lorax." + super().__repr__()

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.__dict__.pop("_hf_lorax_weight_sq", None)

    def unmerge(self) -> None:
        super().unmerge()
        self.__dict__.pop("_hf_lorax_weight_sq", None)


class LoraLinear(LinearForwardMixin, PlannedLayerMixin, TunerLayerMixin, peft_lora.Linear):
    """LoRA / DoRA on ``nn.Linear`` or GPT-2 ``Conv1D``, optionally on slices of a fused projection."""

    lora_variants = {(): None, ("use_dora",): FactorizedDoraLinearVariant}  # peft's property, read-only there


class LoraEmbedding(TunerLayerMixin, peft_lora.Embedding):
    """LoRA / DoRA on ``nn.Embedding`` (peft's layer with hf_lorax's factorized DoRA)."""

    lora_variants = {(): None, ("use_dora",): FactorizedDoraEmbeddingVariant}
