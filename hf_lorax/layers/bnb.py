"""LoRA / DoRA on bitsandbytes 4-bit and 8-bit linears (QLoRA, QDoRA).

peft's bnb layers, with four changes:

* DoRA is hf_lorax's factorized variant; its ``W Aᵀ`` runs through the quantized kernel;
* fused slices and ``target_name`` work as on dense layers;
* in eager mode a 4-bit layer is one autograd node, its weight dequantised and freed inside it
  (:mod:`hf_lorax.layers.fused`);
* merging de-quantizes: the merged layer becomes a dense ``nn.Linear`` in the compute dtype, and
  unmerging restores the original quantized layer bit for bit. peft instead re-quantizes the merged weight
  (lossy every time, peft#2321).

A model hf_lorax injects into has bitsandbytes' in-place CPU repacking switched off on every quantized layer
(:func:`hf_lorax.quantization.disable_cpu_repacking`, by :mod:`hf_lorax.base_model`), so ``Trainer`` with
``eval_strategy="steps"`` trains on after evaluating.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from ..integrations.peft_api import check_adapters_to_merge, dequantize_module_weight, peft_bnb_module
from .dora import FactorizedDoraLinearVariant
from .fused import LinearForwardMixin
from .lora import PlannedLayerMixin, TunerLayerMixin

peft_bnb = peft_bnb_module()


class _QuantizedLora(LinearForwardMixin, PlannedLayerMixin, TunerLayerMixin):
    """What the 4-bit and 8-bit layers share (``__init__`` is :class:`PlannedLayerMixin`'s). Its merge and unmerge
    replace :class:`TunerLayerMixin`'s: they swap the base layer for a dense copy and back instead of rewriting the
    weight."""

    def _fused_weight(self):
        """A 4-bit weight is dequantised inside the fused node (LLM.int8() keeps its own int8 matmul)."""
        base = self.get_base_layer()
        return (lambda: dequantize_module_weight(base)) if isinstance(base, bnb.nn.Linear4bit) else None

    def resolve_lora_variant(self, *, config, **kwargs):
        if config.use_dora:
            return FactorizedDoraLinearVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Merge into a dense copy of the weight (compute dtype); the quantized layer is kept for unmerge."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        # a dense nn.Linear in the compute dtype with the de-quantized weight and bias
        quantized = self.get_base_layer()
        weight = dequantize_module_weight(quantized)
        dtype = getattr(quantized, "compute_dtype", None) or torch.float32
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=quantized.bias is not None, device=weight.device,
                          dtype=dtype).requires_grad_(False)
        dense.source_cls = getattr(quantized, "source_cls", nn.Linear)  # as transformers marks its 4-bit layers
        if quantized.bias is not None:
            dense.bias.data.copy_(quantized.bias.to(dtype))
        weight = weight.to(dtype).float()
        merged = [name for name in adapter_names if name in self.lora_A]
        for name in merged:
            weight = weight + self.get_delta_weight(name).float()
            if name in self.lora_variant:  # DoRA: the norm comes from the quantized (unmerged) base
                weight = self.lora_variant[name]._dora_factor(self, name) * weight
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights; adapters {merged} seem to be broken.")
        self.merged_adapters.extend(merged)
        dense.weight.data = weight.to(dense.weight.dtype)
        self._quantized_base = getattr(self, "_quantized_base", None) or quantized
        self.base_layer = dense

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer, self._quantized_base = self._quantized_base, None
        self.merged_adapters = []
        self._caches.clear()


class LoraLinear4bit(_QuantizedLora, peft_bnb.Linear4bit):
    """LoRA / DoRA on ``bnb.nn.Linear4bit`` (NF4 / FP4)."""


class LoraLinear8bit(_QuantizedLora, peft_bnb.Linear8bitLt):
    """LoRA / DoRA on ``bnb.nn.Linear8bitLt``."""


QUANTIZED_LAYERS = {bnb.nn.Linear4bit: LoraLinear4bit, bnb.nn.Linear8bitLt: LoraLinear8bit}
