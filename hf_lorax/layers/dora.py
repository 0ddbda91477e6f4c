"""DoRA as a peft ``LoraVariant`` whose weight norm never forms the d×k matrix ``BA``.

DoRA (Liu et al. 2024) rescales each output row of the adapted weight ``W' = W + s·BA`` to a learned
magnitude ``m``: ``y = (m / ‖W'‖_row) ⊙ (W x + s·B A x) + bias``, with the norm detached (DoRA §4.3).
peft computes ``‖W'‖_row`` by materialising ``BA`` (and ``W + s·BA``): two extra d×k tensors per layer
per step. Expanding the square needs only the factors::

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ

so one ``W Aᵀ`` product (d×r) and an r×r Gram matrix suffice; ``‖W_i‖²`` is cached while ``W`` is
unchanged. On a 4-bit / 8-bit base, ``W Aᵀ`` comes from the quantized kernel applied to the r rows of
``A``, so the full weight is dequantized only when ``‖W‖²`` must be refreshed. Outputs equal peft's to
float32 round-off.

One deliberate difference from peft in *training with dropout*: peft feeds the dropped-out input
through the frozen weight a second time (an extra full matmul) so the magnitude rescaling also sees
dropout; here dropout applies to the low-rank path only, as in plain LoRA, and the base output is
reused. In eval mode (or without dropout) the two are the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.peft_api import LoraLayer, LoraVariant, dequantize_module_weight
from ..integrations.sharding import full_params, is_zero3_param


class DoraMagnitude(nn.Module):
    """Holds DoRA's per-output magnitude ``m`` as ``.weight`` (peft's ``lora_magnitude_vector`` layout).

    Its forward is DoRA's scale ``m / ‖W + s·BA‖``: reading ``m`` inside the module's own call is what lets
    DeepSpeed ZeRO-3 gather the partitioned magnitude and reduce its gradient, as for any other module.
    """

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def forward(self, weight_norm: torch.Tensor) -> torch.Tensor:
        return self.weight / weight_norm.to(self.weight.dtype)


def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  weight_sq: torch.Tensor) -> torch.Tensor:
    """Row norms of ``weight + scaling * lora_B @ lora_A`` from the factors, in float32.

    ``weight`` is (out, in), ``lora_A`` (r, in), ``lora_B`` (out, r), ``weight_sq`` the (out,) squared
    row norms of ``weight``.
    """
    return row_norm_from_products(weight @ lora_A.to(weight.dtype).T, weight_sq, lora_A, lora_B, scaling)


def row_norm_from_products(weight_At: torch.Tensor, weight_sq: torch.Tensor, lora_A: torch.Tensor,
                           lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same norm given ``W Aᵀ`` (out, r) and ``‖W_i‖²`` (out,): no (out, in) tensor is needed.

    ``‖W_i‖² + B_i · (2s·(W Aᵀ)_i + s²·(A Aᵀ) B_iᵀ)``: the bracket is one ``addmm``, the row-wise dot products
    plus ``‖W_i‖²`` one ``baddbmm`` (a batch of 1×r by r×1 products): five small kernels, ``‖W‖²`` cached. No
    clamp before the root: round-off makes the square negative only where the row's norm is ~0, and there
    ``m / ‖W + s·BA‖`` is not finite with or without one.
    """
    A32, B32 = lora_A.float(), lora_B.float()
    mixed = torch.addmm(weight_At.float(), B32, A32 @ A32.T, beta=2 * scaling, alpha=scaling * scaling)
    return torch.baddbmm(weight_sq.view(-1, 1, 1), mixed.unsqueeze(1), B32.unsqueeze(2)).view(-1).sqrt()


def scale_and_shift(combined: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``scale ⊙ combined + bias`` (``bias`` may be None): DoRA's rescaling, in ``combined``'s dtype."""
    return combined * scale if bias is None else torch.addcmul(bias.to(combined.dtype), combined, scale)


class ScaleAndShift(torch.autograd.Function):
    """:func:`scale_and_shift` that keeps ``y = n ⊙ c + b`` for backward instead of ``c``.

    When the next operation keeps ``y`` for its own backward (RoBERTa's attention keeps the q/k/v projections'
    outputs), saving it costs no activation memory; saving ``c`` would add one (batch, seq, out) tensor per
    layer (docs/benchmarks.md, "DoRA's saved activations"). Backward recovers ``c = (y - b) / n``; ``n`` is a
    ratio of norms, never zero for a trained layer. The subtraction loses precision when ``|b| ≫ |n·c|`` in
    bf16/fp16, so DoRA's forward uses it for float32 only.
    """

    @staticmethod
    def forward(ctx, combined: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = scale_and_shift(combined, scale, bias)
        ctx.save_for_backward(out, scale, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, scale, bias = ctx.saved_tensors
        grad_combined = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            shifted = out if bias is None else out - bias.to(out.dtype)
            grad_scale = (grad * shifted).reshape(-1, scale.numel()).sum(0) / scale
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_combined, grad_scale, grad_bias


class FactorizedDoraLinearVariant(LoraVariant):
    """DoRA for ``nn.Linear`` and GPT-2 ``Conv1D`` (and fused-slice) layers."""

    @staticmethod
    def stored_transposed(module: LoraLayer) -> bool:
        """Whether the layer stores its weight as (in, out) (GPT-2's ``Conv1D``) rather than (out, in)."""
        return module.fan_in_fan_out

    @classmethod
    def base_weight(cls, module: LoraLayer) -> torch.Tensor:
        """The frozen weight as (out, in), dequantized if needed (a dense weight is used as it is, which
        keeps ``torch.compile`` graphs whole: peft's dequantize helper inspects type names)."""
        weight = module.get_base_layer().weight
        if not weight.is_floating_point():
            weight = dequantize_module_weight(module.get_base_layer())
        return weight.T if cls.stored_transposed(module) else weight

    @staticmethod
    def factors(module: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight

    @classmethod
    def weight_sq(cls, module: LoraLayer) -> torch.Tensor:
        """Squared row norms of the frozen weight, recomputed only when the stored weight changes.

        Under ``torch.compile`` they are recomputed every step instead: the cache's data-pointer check
        would break the graph, and inductor fuses the square-and-sum into one pass over the weight
        (1/tokens of the layer's matmul work) without a weight-sized temporary.
        """
        param = module.get_base_layer().weight
        cached = getattr(module, "_hf_lorax_weight_sq", None)
        if torch.compiler.is_compiling():
            if not param.is_floating_point() and cached is not None:
                return cached[1]  # a quantized weight is never written in place; the norm from init stands
            return cls.base_weight(module).float().pow(2).sum(dim=1)
        # A ZeRO-3 partition is re-materialised at every gather (a new data pointer each time) and the frozen
        # weight it holds never changes outside merge/unmerge, which drop the cache: key it by its id.
        key = ("zero3", param.ds_id) if is_zero3_param(param) else (param.data_ptr(), param._version, param.dtype,
                                                                    param.device)
        if cached is None or cached[0] != key:
            with full_params([param]):
                cached = (key, cls.base_weight(module).float().pow(2).sum(dim=1))
            module._hf_lorax_weight_sq = cached
        return cached[1]

    @classmethod
    def weight_times_At(cls, module: LoraLayer, lora_A: torch.Tensor) -> torch.Tensor:
        """``W Aᵀ`` (out, r). A quantized base computes it with its own kernel on the r rows of ``A``."""
        base = module.get_base_layer()
        if base.weight.is_floating_point():
            with full_params([base.weight]):  # ZeRO-3: the base layer's own forward has released its weight
                weight = cls.base_weight(module)
                return weight @ lora_A.to(weight.dtype).T
        out = base(lora_A.to(getattr(base, "compute_dtype", None) or lora_A.dtype))
        bias = getattr(base, "bias", None)
        return (out if bias is None else out - bias.to(out.dtype)).T

    @classmethod
    def weight_norm(cls, module: LoraLayer, adapter: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad(), full_params(cls.factors(module, adapter)) as (A, B):
            if weight is not None:  # merging: the norm of an explicitly given (unmerged) weight
                return dora_row_norm(weight, A, B, module.scaling[adapter], weight.float().pow(2).sum(dim=1))
            return row_norm_from_products(cls.weight_times_At(module, A), cls.weight_sq(module), A, B,
                                          module.scaling[adapter])

    @classmethod
    def norm_scale(cls, module: LoraLayer, adapter: str) -> torch.Tensor:
        """DoRA's ``m / ‖W + s·BA‖`` (the norm from the factors, detached): the one place every path reads it."""
        return module.lora_magnitude_vector[adapter](cls.weight_norm(module, adapter))

    @classmethod
    def init(cls, module: LoraLayer, adapter_name: str, **kwargs) -> None:
        # peft's LoraLayer.adapter_layer_names already lists lora_magnitude_vector: it trains and saves as peft's
        A, B = cls.factors(module, adapter_name)
        # low_cpu_mem_usage (meta factors): the saved magnitude is assigned when the weights load
        magnitude = torch.empty(B.shape[0], dtype=A.dtype, device="meta")
        if not (A.is_meta or B.is_meta):
            magnitude = cls.weight_norm(module, adapter_name).to(A.dtype)
        module.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    @classmethod
    def forward(cls, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        norm_scale, bias = cls.norm_scale(module, active_adapter).to(result.dtype), module.get_base_layer().bias
        # the scaling on the r-wide A x, not on the output
        lora = lora_B(lora_A(module.lora_dropout[active_adapter](x)) * module.scaling[active_adapter])
        combined = result + lora.to(result.dtype) if bias is None else result - bias + lora.to(result.dtype)
        # ScaleAndShift saves no extra activation, but recovering c from y is exact enough only in float32
        rescale = ScaleAndShift.apply if combined.dtype == torch.float32 else scale_and_shift
        return rescale(combined, norm_scale, bias)

    @classmethod
    def _dora_factor(cls, module: LoraLayer, adapter: str, norm: torch.Tensor | None = None) -> torch.Tensor:
        """``m / norm`` shaped to scale the stored weight's output rows (columns when it is stored transposed).

        Without ``norm`` (merging) the norm is computed and cached for unmerge: from the weight without other merged
        adapters, as forward sees it."""
        if norm is None:
            with module._unmerged_base_weight() as weight:
                norm = cls.weight_norm(module, adapter, weight.T if cls.stored_transposed(module) else weight)
            module._cache_store(f"{adapter}-weight_norm", norm)
        factor = module.lora_magnitude_vector[adapter].weight.float() / norm
        return factor.view(1, -1) if cls.stored_transposed(module) else factor.view(-1, 1)

    @classmethod
    def merge_safe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, delta = cls._dora_factor(module, active_adapter), module.get_delta_weight(active_adapter)
        current = dequantize_module_weight(module.get_base_layer())
        return (factor * (current.float() + delta.float())).to(orig_weight.dtype)

    @classmethod
    def merge_unsafe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = cls.merge_safe(module, active_adapter, orig_weight)

    @classmethod
    def unmerge(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor = cls._dora_factor(module, active_adapter, module._cache_pop(f"{active_adapter}-weight_norm"))
        delta = module.get_delta_weight(active_adapter)
        return (orig_weight.data.float() / factor - delta.float()).to(orig_weight.dtype)


class FactorizedDoraEmbeddingVariant(FactorizedDoraLinearVariant):
    """DoRA for ``nn.Embedding``: the adapted matrix is ``Wᵀ`` (dim × vocab) with factors ``B_e A_e``."""

    @staticmethod
    def stored_transposed(module: LoraLayer) -> bool:
        return True  # the embedding table is (vocab, dim): the adapted matrix's transpose

    @staticmethod
    def factors(module: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]

    @classmethod
    def forward(cls, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        A, B = cls.factors(module, active_adapter)
        norm_scale = cls.norm_scale(module, active_adapter).to(result.dtype)
        lora = (module._embed(x, A.T) @ B.T) * module.scaling[active_adapter]
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            lora = lora * embed_scale.to(lora.dtype)
        return norm_scale * (result + lora.to(result.dtype))
