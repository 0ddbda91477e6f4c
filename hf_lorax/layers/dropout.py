"""The one dropout mask source of hf_lorax's layers (the fused node, the plain LoRA and DoRA paths).

Every path draws its mask with ``torch.native_dropout``, the call ``F.dropout`` makes on CUDA, which on CPU draws
the same mask as ``F.dropout``'s decomposition: in eager mode one seed gives one mask on every path. Under
``torch.compile`` inductor would replace ``native_dropout`` with its own generator (unless
``torch._inductor.config.fallback_random`` is set), so there the same call is made through an opaque custom op,
``hf_lorax::native_dropout``: compiled code draws from the same generator, in the same order, as eager code.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("hf_lorax::native_dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def traced_native_dropout(x: torch.Tensor, p: float, reader: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.native_dropout(x, p, train=True)`` as an op inductor keeps.

    ``reader`` (the weight that reads the dropped input, unused) keeps two layers' draws on one input apart:
    AOTAutograd's common-subexpression pass merges equal calls of any op outside its own list of random ops.
    """
    out, mask = torch.native_dropout(x, p, True)
    return out, mask


@traced_native_dropout.register_fake
def _(x: torch.Tensor, p: float, reader: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _save_mask(ctx, inputs, output) -> None:
    ctx.scale = 1.0 / (1.0 - inputs[1])
    ctx.save_for_backward(output[1])


def _dropout_backward(ctx, grad: torch.Tensor, _grad_mask) -> tuple[torch.Tensor, None, None]:
    return torch.ops.aten.native_dropout_backward(grad, ctx.saved_tensors[0], ctx.scale), None, None


traced_native_dropout.register_autograd(_dropout_backward, setup_context=_save_mask)


def lora_dropout(x: torch.Tensor, p: float, reader: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dropout(x), bool mask)`` from ``native_dropout`` for the layer whose ``lora_A`` weight is ``reader``
    (``(x, None)`` when ``p`` is 0; see the module docstring)."""
    if not p:
        return x, None
    if torch.compiler.is_compiling():
        return traced_native_dropout(x, p, reader.detach())
    return torch.native_dropout(x, p, True)


def dropout_p(module: nn.Module) -> float:
    """The probability a layer's ``lora_dropout[adapter]`` module drops with now (0 for Identity or eval mode)."""
    return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0


def apply_dropout(module: nn.Module, x: torch.Tensor, reader: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a layer's dropout module, with the mask drawn by :func:`lora_dropout`."""
    return lora_dropout(x, dropout_p(module), reader)[0] if isinstance(module, nn.Dropout) else module(x)
