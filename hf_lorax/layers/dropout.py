"""The one dropout mask source of hf_lorax's layers (the fused node, the plain LoRA and DoRA paths)."""

from __future__ import annotations

import torch
from torch import nn


def lora_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dropout(x), bool mask)`` from ``torch.native_dropout`` (``(x, None)`` when ``p`` is 0).

    ``native_dropout`` is the call ``F.dropout`` makes on CUDA, and on CPU it draws the same mask as ``F.dropout``'s
    decomposition, so in eager mode one seed gives one mask on every path. (Under ``torch.compile``, inductor
    draws with its own generator unless ``torch._inductor.config.fallback_random`` is set.)
    """
    if not p:
        return x, None
    return torch.native_dropout(x, p, True)


def dropout_p(module: nn.Module) -> float:
    """The probability a layer's ``lora_dropout[adapter]`` module drops with now (0 for Identity or eval mode)."""
    return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0


def apply_dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a layer's dropout module, with the mask drawn by :func:`lora_dropout`."""
    return lora_dropout(x, dropout_p(module))[0] if isinstance(module, nn.Dropout) else module(x)
