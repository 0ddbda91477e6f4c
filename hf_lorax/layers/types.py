"""Which layer types hf_lorax adapts, decided one way everywhere."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quantization import is_quantized_linear

__all__ = ["SUPPORTED_LAYER_TYPES", "is_dense", "is_quantized_linear", "out_features"]

SUPPORTED_LAYER_TYPES = ("torch.nn.Linear", "transformers Conv1D", "torch.nn.Embedding",
                         "bitsandbytes Linear4bit / Linear8bitLt")


def is_dense(module: nn.Module) -> bool:
    """An unquantized ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` (quantized linears subclass nn.Linear)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and weight is not None and weight.is_floating_point()
            and type(module).__module__.split(".")[0] != "bitsandbytes")


def out_features(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features
