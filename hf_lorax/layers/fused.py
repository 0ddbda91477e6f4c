"""One autograd node per adapted linear: base GEMM, low-rank update and (DoRA) rescaling in a single pass.

Why this exists: in eager mode a peft LoRA linear is six to nine autograd nodes (input cast, base linear,
dropout, ``lora_A``, scaling, ``lora_B``, add, output cast; DoRA adds its rescale). Each keeps its own copy
of what it needs — the base linear a cast ``x``, dropout its mask and output, ``lora_A`` the dropped ``x``
again — and each launches its own kernels, which is what makes a small-batch LoRA step on a GPU cost as much
as full fine-tuning. :class:`FusedLoraLinear` (Unsloth's ``fast_lora`` scheme, in plain PyTorch so it runs
on CPU and CUDA alike) computes::

    c = x Wᵀ + s · B (A drop(x))            out = c + bias          (LoRA)
                                            out = n ⊙ c + bias      (DoRA, n = m / ‖W + s·BA‖ detached)

with the update added into the base GEMM's output buffer, and keeps for backward only what ``lora_A`` read
(``x`` once, or ``drop(x)``), the boolean dropout mask, the r-wide ``A drop(x)`` and, for DoRA, ``c``.
Backward forms ``dx = g W + (s · (g B) A) ⊙ mask/(1-p)``, ``dA``, ``dB`` (and the bias and magnitude
gradients when they train); the frozen ``W`` gets no gradient. A 4-bit weight is dequantised in forward and
again in backward, and freed right after each use (what bitsandbytes' own ``matmul_4bit`` does).

Dropout, biases, rank maps, fused slices and DoRA all stay on this path. :class:`LinearForwardMixin` is the one
rule that chooses, per call, between it and peft's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..integrations.sharding import is_zero3_param
from .dora import FactorizedDoraLinearVariant, scale_and_shift
from .sliced import b_weight

WeightSource = Callable[[], torch.Tensor]  # returns the frozen weight as (out, in) in the base compute dtype


class FusedLoraLinear(torch.autograd.Function):
    """``out = [n ⊙] (x Wᵀ + s · B (A drop(x))) + bias`` as one autograd node (see the module docstring).

    Inputs: ``x`` (..., in); ``weight`` the frozen (out, in) weight, or a callable that materialises it
    (quantized bases); ``bias`` (out,) or None; ``lora_A`` (r, in); ``lora_B`` (out, r); ``scaling``;
    ``dropout_p``; ``norm_scale`` DoRA's (out,) ``m / ‖W + s·BA‖`` or None; ``base_dtype`` / ``lora_dtype`` the
    dtypes the base and low-rank GEMMs run in (the autocast dtype under autocast); ``out_dtype`` the dtype the
    stock layer would return. The frozen weight gets no gradient: callers must not pass one that requires it.

    Kernels: the bias rides in the base GEMM (``addmm``), the scaling ``s`` is the ``alpha`` of the GEMMs that
    touch ``B`` (no r-wide multiply), dropout is one ``native_dropout`` whose bool mask is kept with ``x``, and its
    ``1/(1-p)`` is the ``alpha`` of ``dA``'s GEMM and the value of ``dx``'s ``addcmul``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, norm_scale,
                base_dtype: torch.dtype, lora_dtype: torch.dtype, out_dtype: torch.dtype):
        # promote_types is a dispatched call: skipped in the common case of one dtype
        wide = base_dtype if base_dtype == lora_dtype else torch.promote_types(base_dtype, lora_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1])
            x_base = rows.to(base_dtype)
            w = (weight() if callable(weight) else weight).to(base_dtype).T
            in_epilogue = bias is not None and norm_scale is None  # the bias in the base GEMM's epilogue
            combined = torch.addmm(bias.to(base_dtype), x_base, w) if in_epilogue else x_base @ w
            del w  # a dequantised weight is freed here
            x_lora = x_base if lora_dtype == base_dtype else rows.to(lora_dtype)
            # native_dropout is the call F.dropout makes on CUDA, and on CPU it draws F.dropout's mask: one seed gives
            # the fused node and peft's forward the same mask
            dropped, mask = torch.native_dropout(x_lora, dropout_p, True) if dropout_p else (x_lora, None)
            h = dropped @ lora_A.to(lora_dtype).T  # (N, r); the scaling is the next GEMM's alpha
            # The update lands in the base GEMM's buffer (the casts are no-ops when the dtypes agree). Without autocast
            # and with mixed dtypes the sum is in the wider one: peft adds a float32 update to the output.
            combined = combined.to(wide).addmm_(h.to(wide), lora_B.to(wide).T, alpha=scaling)
            # combined itself is kept for DoRA's backward, never shifted
            out = combined if norm_scale is None else scale_and_shift(combined, norm_scale.to(combined.dtype), bias)
        ctx.weight_source = weight if callable(weight) else None
        ctx.scaling, ctx.dropout_p, ctx.wide, ctx.x_shape, ctx.x_dtype = scaling, dropout_p, wide, x.shape, x.dtype
        ctx.base_dtype, ctx.lora_dtype = base_dtype, lora_dtype
        # x once, not drop(x): inputs that several layers read (q/k/v, gate/up) are then kept once. None for what
        # this call lacks (no mask, bias or DoRA scale; a quantized weight is dequantised again instead).
        ctx.save_for_backward(x_lora if lora_dtype == base_dtype else rows, h, lora_A, lora_B,
                              None if callable(weight) else weight, mask, None if norm_scale is None else combined,
                              norm_scale, bias)
        return out.to(out_dtype).reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_saved, h, lora_A, lora_B, weight, mask, combined, norm_scale, bias = ctx.saved_tensors
        needs, s = ctx.needs_input_grad, ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = g.sum(0).to(bias.dtype) if needs[2] else None
        grad_norm_scale = None
        if norm_scale is not None:
            if needs[7]:  # as autograd's backward of ``combined * n``: per column, the dot product over the rows
                gc = g.to(combined.dtype)
                grad_norm_scale = torch.bmm(gc.T.unsqueeze(1), combined.T.unsqueeze(2)).view(-1).to(norm_scale.dtype)
            g = g * norm_scale.to(g.dtype)
        g_lora = g.to(ctx.lora_dtype)
        B = lora_B.to(ctx.lora_dtype)
        # s · gᵀ h and s · g B as the GEMMs' alpha (beta=0: the first argument only gives the shape)
        grad_B = torch.addmm(B, g_lora.T, h, beta=0, alpha=s).to(lora_B.dtype) if needs[4] else None
        grad_A = grad_x = None
        if needs[3] or needs[0]:
            dh = torch.addmm(h, g_lora, B, beta=0, alpha=s)  # (N, r)
            if needs[3]:  # dhᵀ drop(x), with dropout's 1/(1-p) as the GEMM's alpha
                x_lora = x_saved.to(ctx.lora_dtype)
                kept = x_lora if mask is None else x_lora * mask
                grad_A = torch.addmm(lora_A.to(ctx.lora_dtype), dh.T, kept, beta=0,
                                     alpha=1.0 / (1.0 - ctx.dropout_p)).to(lora_A.dtype)
                del x_lora, kept
            if needs[0]:
                w = ctx.weight_source() if weight is None else weight
                grad_x = (g.to(ctx.base_dtype) @ w.to(ctx.base_dtype)).to(ctx.wide)
                del w
                if mask is not None:  # dropout's backward: the mask and 1/(1-p) in one pass
                    grad_x.addcmul_((dh @ lora_A.to(ctx.lora_dtype)).to(grad_x.dtype), mask,
                                    value=1.0 / (1.0 - ctx.dropout_p))
                else:
                    grad_x.addmm_(dh.to(grad_x.dtype), lora_A.to(grad_x.dtype))
                grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, grad_norm_scale, None, None, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor | WeightSource, bias: torch.Tensor | None,
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                      norm_scale: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Apply :class:`FusedLoraLinear` with the dtypes the stock layers use.

    Dense weight (a tensor): the base GEMM runs in the autocast dtype, else the weight's, and so does the output.
    Quantized weight (a callable): it runs in the autocast dtype, else ``compute_dtype``, and the output has
    ``x``'s dtype (as bitsandbytes' ``Linear4bit`` returns it). The low-rank GEMMs run in the autocast dtype,
    else ``lora_A``'s.
    """
    dense = torch.is_tensor(weight)
    if dense and weight.requires_grad:
        raise ValueError("fused_lora_linear computes no gradient for the base weight, which requires one here.")
    cast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    base = cast or (weight.dtype if dense else compute_dtype or x.dtype)
    return FusedLoraLinear.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), norm_scale,
                                 base, cast or lora_A.dtype, base if dense else x.dtype)


class LinearForwardMixin:
    """The forward of hf_lorax's linear tuner layers: the fused node when switched on, else peft's own forward.

    The fused node (:class:`FusedLoraLinear`) computes a call when :func:`set_fused_path` turned it on for the layer,
    the call is not being traced by ``torch.compile`` (inductor fuses peft's code and chooses what to save; an opaque
    node would stop it), one hf_lorax LoRA/DoRA adapter is active and unmerged, and the frozen weight allows it (not
    trained, not a ZeRO-3 partition, not LLM.int8()). Every other call is peft's forward (with hf_lorax's DoRA
    variant). It is off by default until a GPU run shows it faster: ``scripts/bench_gpu.py`` times both paths (CPU
    figures: docs/benchmarks.md).
    """

    use_fused_path: bool = False

    def _fused_weight(self) -> torch.Tensor | WeightSource | None:
        """The frozen weight as (out, in), a callable that dequantises it, or None (not fusable)."""
        weight = self.get_base_layer().weight
        if not weight.is_floating_point() or weight.requires_grad or is_zero3_param(weight):
            return None  # a ZeRO-3 partition is whole only inside the base layer's own call
        return weight.T if self.fan_in_fan_out else weight

    def _single_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one adapter a fused call computes with, or None for peft's forward."""
        if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or self.lora_bias.get(active[0], False):
            return None
        variant = self.lora_variant.get(active[0])
        return active[0] if variant is None or isinstance(variant, FactorizedDoraLinearVariant) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = self.use_fused_path and not torch.compiler.is_compiling()
        adapter = self._single_adapter(args, kwargs) if fused else None
        weight = self._fused_weight() if adapter is not None else None
        if weight is None:
            return super().forward(x, *args, **kwargs)
        variant, base, dropout = self.lora_variant.get(adapter), self.get_base_layer(), self.lora_dropout[adapter]
        norm_scale = None if variant is None else variant.norm_scale(self, adapter)
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0  # 0: Identity or eval
        return fused_lora_linear(x, weight, base.bias, self.lora_A[adapter].weight, b_weight(self.lora_B[adapter]),
                                 self.scaling[adapter], p, norm_scale, getattr(base, "compute_dtype", None))


def set_fused_path(model: torch.nn.Module, enabled: bool) -> int:
    """Turn the fused node of every hf_lorax linear in ``model`` on (True) or off (False, the default); returns how
    many layers."""
    if not isinstance(enabled, bool):  # bool("false") would turn it on
        raise TypeError(f"set_fused_path: enabled must be True or False, got {enabled!r}.")
    layers = [m for m in model.modules() if isinstance(m, LinearForwardMixin)]
    for layer in layers:
        layer.use_fused_path = enabled
    return len(layers)
