"""hf_lorax's LoRA tuner layers, plugged into peft with ``LoraConfig._register_custom_module``.

They subclass peft's ``lora.Linear`` / ``lora.Embedding``, so merging, adapter switching, mixed-batch
inference and saving behave exactly as in peft, and parameter names stay peft's (``lora_A``, ``lora_B``,
``lora_magnitude_vector``). What they change:

* DoRA uses :mod:`hf_lorax.layers.dora` (norm from the factors, no d×k temporaries);
* ``Conv1D`` is recognised by type, not by the config's ``fan_in_fan_out`` flag;
* a layer on a fused projection can adapt only some slices (:class:`SlicedLoraB`);
* in eager mode the whole layer (LoRA or DoRA) is one autograd node (:mod:`hf_lorax.layers.fused`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..integrations.peft_api import VARIANT_KWARG_KEYS, init_lora_state, peft_lora
from ..slices import SliceSpec, fused_alpha, fused_rank
from .dora import FactorizedDoraEmbeddingVariant, FactorizedDoraLinearVariant
from .fused import FusedForwardMixin


class SlicedLoraB(nn.Module):
    """``B`` of a LoRA that adapts only some equal-width slices of a fused output (loralib ``MergedLinear``).

    Slice ``i`` gets its own (width × r) block ``B_i`` fed by rows ``i*r:(i+1)*r`` of ``A``. Only the blocks
    are parameters; :attr:`weight` is the equivalent dense (out × n·r) matrix, zero outside the blocks, and it
    is what the state dict holds, so checkpoints and saved adapters are standard peft LoRA.
    """

    def __init__(self, out_features: int, bounds: list[tuple[int, int]], r: int):
        super().__init__()
        self.out_features, self.bounds, self.r = out_features, list(bounds), r
        self.blocks = nn.ParameterList([nn.Parameter(torch.zeros(hi - lo, r)) for lo, hi in self.bounds])

    @property
    def weight(self) -> torch.Tensor:
        first = self.blocks[0]
        dense = first.new_zeros(self.out_features, len(self.blocks) * self.r)
        for i, ((lo, hi), block) in enumerate(zip(self.bounds, self.blocks)):
            dense[lo:hi, i * self.r : (i + 1) * self.r] = block
        return dense

    @property
    def bias(self):  # peft reads lora_B[...].bias when lora_bias is set; slices never carry one
        return None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pieces, pos = [], 0
        for i, ((lo, hi), block) in enumerate(zip(self.bounds, self.blocks)):
            if lo > pos:
                pieces.append(h.new_zeros(*h.shape[:-1], lo - pos))
            pieces.append(h[..., i * self.r : (i + 1) * self.r] @ block.T)
            pos = hi
        if pos < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - pos))
        return torch.cat(pieces, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        dense = state_dict[key]
        expected = (self.out_features, len(self.blocks) * self.r)
        if tuple(dense.shape) != expected:
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has shape {tuple(dense.shape)}, the fused-slice "
                f"layer expects {expected} ({len(self.blocks)} slices of rank {self.r})."
            )
            return
        off_block = dense.clone()
        for i, (lo, hi) in enumerate(self.bounds):
            off_block[lo:hi, i * self.r : (i + 1) * self.r] = 0
        if off_block.abs().max() > 0:
            error_msgs.append(
                f"{key} has non-zero entries outside the adapted slices, so it is not a fused-slice adapter "
                "of this layout; load it without fused_slices."
            )
            return
        with torch.no_grad():
            for i, ((lo, hi), block) in enumerate(zip(self.bounds, self.blocks)):
                block.copy_(dense[lo:hi, i * self.r : (i + 1) * self.r])
        for extra in [k for k in state_dict if k.startswith(prefix) and k != key]:
            unexpected_keys.append(extra)


class FusedSliceMixin:
    """``update_layer`` that takes the module's rank, alpha and slices from the config's resolved plan."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        target = kwargs.get("target_name", "")
        entry = module_plan(config, target)
        if entry is not None:
            r, lora_alpha = entry.r, entry.alpha
        if entry is None or entry.slices is None:
            super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
            return
        _check_slice_options(config, target)
        bounds = entry.slices.bounds(self.out_features, target)
        n = len(bounds)
        super().update_layer(adapter_name, fused_rank(r, n), fused_alpha(lora_alpha, n, config.use_rslora),
                             config=config, **kwargs)
        self._use_slices(adapter_name, entry.slices, bounds, r, config)

    def _use_slices(self, adapter: str, spec: SliceSpec, bounds, r: int, config) -> None:
        dense = self.lora_A[adapter].weight
        sliced = SlicedLoraB(self.out_features, bounds, r).to(device=dense.device, dtype=dense.dtype)
        if config.init_lora_weights is False:  # peft leaves B random in that case; do the same per block
            for block in sliced.blocks:
                nn.init.kaiming_uniform_(block, a=5**0.5)
        elif config.init_lora_weights == "gaussian":  # std 1/r of the per-slice rank, not of n*r
            nn.init.normal_(self.lora_A[adapter].weight, std=1 / r)
        self.lora_B[adapter] = sliced
        for p in sliced.parameters():
            p.requires_grad_(dense.requires_grad)
        self.slice_specs = {**getattr(self, "slice_specs", {}), adapter: spec}
        if adapter in self.lora_variant:  # the magnitude must see the sliced B
            self.lora_variant[adapter].init(self, adapter_name=adapter, config=config)


class WeightNormCacheMixin:
    """Drops DoRA's cached ‖W‖² when merging or unmerging rewrites the frozen weight."""

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.__dict__.pop("_hf_lorax_weight_sq", None)

    def unmerge(self) -> None:
        super().unmerge()
        self.__dict__.pop("_hf_lorax_weight_sq", None)


class LoraLinear(FusedForwardMixin, FusedSliceMixin, WeightNormCacheMixin, peft_lora.Linear):
    """LoRA / DoRA on ``nn.Linear`` or GPT-2 ``Conv1D``, optionally on slices of a fused projection."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: float = 1, **kwargs):
        init_lora_state(self, base_layer, **kwargs)
        # Conv1D stores its weight as (in, out); decide from the layer, not the config flag.
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.is_target_conv_1d_layer = self.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): FactorizedDoraLinearVariant}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W x + B (s · A dropout(x))``: the scaling multiplies the r-wide ``A x``, not the output.

        Eager calls go through the fused node (:class:`~hf_lorax.layers.fused.FusedForwardMixin`). Otherwise
        (``torch.compile`` traces this code): peft scales ``B A x`` (batch × seq × out) and then adds it, one
        more output-sized tensor and pass per layer. Merged layers, disabled adapters, mixed-adapter batches,
        variants (DoRA) and ``lora_bias`` take peft's path.
        """
        fused = self._fused_forward(x, *args, **kwargs)
        if fused is not None:
            return fused
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
                or any(a in self.lora_variant or self.lora_bias.get(a, False) for a in active)):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        for key in ("adapter_names", *VARIANT_KWARG_KEYS):  # never passed to the base layer
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in active:
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype)))
            result = result + lora_B(h * self.scaling[adapter])
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "hf_lorax." + super().__repr__()


class LoraEmbedding(WeightNormCacheMixin, peft_lora.Embedding):
    """LoRA / DoRA on ``nn.Embedding`` (peft's layer with hf_lorax's factorized DoRA)."""

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): FactorizedDoraEmbeddingVariant}

    def __repr__(self) -> str:
        return "hf_lorax." + super().__repr__()


def module_plan(config, target: str):
    """The :class:`~hf_lorax.plan.ModulePlan` of ``target`` in ``config``'s resolved plan (None: not planned).

    A config with rank/alpha maps or fused slices that reaches a layer unresolved would be built wrong, so it
    raises instead (this happens only when hf_lorax's peft hook is disabled, see hf_lorax.integrations).
    """
    plan = getattr(config, "resolved_plan", None)
    if plan is not None:
        return plan.modules.get(target)
    if getattr(config, "rank_map", None) or getattr(config, "alpha_map", None) or getattr(config, "fused_slices", None):
        raise RuntimeError(
            f"{type(config).__name__} with rank_map/alpha_map/fused_slices reached peft unresolved (module {target}). "
            "Build the model with hf_lorax.get_model(config, model=...), which resolves the config itself."
        )
    return None


def _check_slice_options(config, target: str) -> None:
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        raise ValueError(
            f"init_lora_weights={init!r} cannot be used with fused_slices on {target}: it derives A and B from "
            "the full weight. Use True or 'gaussian', or drop fused_slices for this module."
        )
    if config.lora_bias:
        raise ValueError(f"lora_bias=True is not supported with fused_slices (module {target}).")
