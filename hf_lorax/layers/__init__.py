"""Tuner layers, and the type mapping that routes peft's layer creation to them.

``layer_mapping()`` is registered on a config at injection time (by :func:`hf_lorax.get_model` or the
peft hook), never on import: importing hf_lorax changes no peft config.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .dora import DoraMagnitude, FactorizedDoraEmbeddingVariant, FactorizedDoraLinearVariant, dora_row_norm
from .fused import FusedLoraLinear, fused_lora_linear, set_fused_path
from .lora import LoraEmbedding, LoraLinear
from .sliced import SlicedLoraB, trained_parameter_count
from .types import SUPPORTED_LAYER_TYPES, is_dense, is_quantized_linear, out_features


def layer_mapping() -> dict[type, type]:
    """``{layer type: hf_lorax tuner layer}`` in dispatch order (peft takes the first ``isinstance`` match).

    bitsandbytes' linears subclass ``nn.Linear``, so their entries come first.
    """
    try:  # 4-bit / 8-bit bases, when bitsandbytes is importable
        from .bnb import QUANTIZED_LAYERS as quantized
    except ImportError:
        quantized = {}
    return {**quantized, nn.Linear: LoraLinear, Conv1D: LoraLinear, nn.Embedding: LoraEmbedding}


__all__ = ["DoraMagnitude", "FactorizedDoraEmbeddingVariant", "FactorizedDoraLinearVariant", "FusedLoraLinear",
           "LoraEmbedding", "LoraLinear", "SUPPORTED_LAYER_TYPES", "SlicedLoraB", "dora_row_norm",
           "fused_lora_linear", "is_dense", "is_quantized_linear", "layer_mapping", "out_features",
           "set_fused_path", "trained_parameter_count"]
