"""Tuner layers and the type mapping that routes peft's layer creation to them."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .dora import DoraMagnitude, FactorizedDoraEmbeddingVariant, FactorizedDoraLinearVariant, dora_row_norm
from .lora import LoraEmbedding, LoraLinear, SlicedLoraB


def is_dense(module: nn.Module) -> bool:
    """An unquantized ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` (quantized linears subclass nn.Linear)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, (nn.Linear, Conv1D, nn.Embedding))
        and type(module).__module__.split(".")[0] != "bitsandbytes"
        and weight is not None
        and weight.is_floating_point()
    )


class _DenseMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return is_dense(obj) and isinstance(obj, cls.wraps)


class DenseLinear(metaclass=_DenseMeta):
    """Mapping key for peft's custom-module dispatch: unquantized ``nn.Linear`` or ``Conv1D``.

    peft picks the first key the target is an instance of; bitsandbytes' linears subclass ``nn.Linear`` but
    need their own layers, so a plain ``nn.Linear`` key would capture them.
    """

    wraps = (nn.Linear, Conv1D)


class DenseEmbedding(metaclass=_DenseMeta):
    """Mapping key for peft's custom-module dispatch: an unquantized ``nn.Embedding``."""

    wraps = (nn.Embedding,)


def custom_module_mapping() -> dict[type, type]:
    """``{layer type: hf_lorax tuner layer}`` for ``LoraConfig._register_custom_module``."""
    mapping: dict[type, type] = {DenseLinear: LoraLinear, DenseEmbedding: LoraEmbedding}
    try:  # 4-bit / 8-bit bases, when bitsandbytes is importable
        from .bnb import quantized_module_mapping
    except ImportError:
        return mapping
    return {**quantized_module_mapping(), **mapping}


SUPPORTED_LAYER_TYPES = ("torch.nn.Linear", "transformers Conv1D", "torch.nn.Embedding")

__all__ = [
    "DenseEmbedding",
    "DenseLinear",
    "DoraMagnitude",
    "FactorizedDoraEmbeddingVariant",
    "FactorizedDoraLinearVariant",
    "LoraEmbedding",
    "LoraLinear",
    "SUPPORTED_LAYER_TYPES",
    "SlicedLoraB",
    "custom_module_mapping",
    "dora_row_norm",
    "is_dense",
]
