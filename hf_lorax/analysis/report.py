"""Per-module rank-utilization statistics, summaries and a suggested rank map.

Works on a live model (:func:`updates_from_model`) or a saved adapter (:func:`updates_from_adapter_dir`),
so the same numbers come out of the Trainer callback and of ``python -m hf_lorax.analysis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter_files import read_adapter_folder
from ..integrations.peft_api import LoraLayer, dequantize_module_weight
from ..integrations.sharding import full_params
from .spectra import effective_rank, energy, energy_rank, factor_singular_values, stable_rank


@dataclass
class _ModulePart:
    """A module, or one slice (``part``) of a fused module; ``part`` is empty for a plain module."""

    module: str
    part: str

    @property
    def name(self) -> str:
        return module_part_name(self.module, self.part)


@dataclass
class LowRankUpdate(_ModulePart):
    """One low-rank update ``s·B A`` (a module, or one slice of a fused module)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    weight_fro: float | None = None  # ‖W‖_F of the frozen weight (rows of this slice)
    magnitude: torch.Tensor | None = None  # DoRA m
    weight_row_norm: torch.Tensor | None = None  # ‖W‖ per output row, DoRA's initial m

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class ModuleStats(_ModulePart):
    r: int
    singular_values: list[float]
    effective_rank: float
    stable_rank: float
    utilization: float
    energy: list[float]
    rank_90: int
    rank_99: int
    relative_norm: float | None = None  # ‖ΔW‖_F / ‖W‖_F (LoRA paper §7.3)
    magnitude: dict | None = None  # DoRA: statistics of m and of its change from ‖W‖


def module_part_name(module: str, part: str) -> str:
    """``module`` or, for a slice of a fused module, ``module[part]``: the key of every per-slice report."""
    return f"{module}[{part}]" if part else module


def module_stats(update: LowRankUpdate) -> ModuleStats:
    sv = factor_singular_values(update.lora_A, update.lora_B, update.scaling)
    erank = effective_rank(sv)
    stats = ModuleStats(module=update.module, part=update.part, r=update.r, singular_values=sv.tolist(),
                        effective_rank=erank, stable_rank=stable_rank(sv), utilization=erank / update.r,
                        energy=energy(sv), rank_90=energy_rank(sv, 0.9), rank_99=energy_rank(sv, 0.99),
                        relative_norm=float(sv.norm()) / update.weight_fro if update.weight_fro else None)
    if update.magnitude is not None:
        m = update.magnitude.detach().double()
        stats.magnitude = {"mean": float(m.mean()), "std": float(m.std()) if m.numel() > 1 else 0.0,
                           "min": float(m.min()), "max": float(m.max())}
        if update.weight_row_norm is not None:
            change = (m - update.weight_row_norm.double()).abs() / update.weight_row_norm.double().clamp_min(1e-12)
            stats.magnitude.update(rel_change_mean=float(change.mean()), rel_change_max=float(change.max()))
    return stats


def analyze(updates: list[LowRankUpdate]) -> list[ModuleStats]:
    return [module_stats(u) for u in updates]


# -- extraction -----------------------------------------------------------------------------------------


def updates_from_model(model: torch.nn.Module, adapter: str | None = None) -> list[LowRankUpdate]:
    """The low-rank updates of every adapted linear/Conv1D layer (fused modules split into their slices).

    Sharded factors and weights (DeepSpeed ZeRO-3, FSDP2) are gathered one layer at a time, so under sharding
    this is a collective: every process must call it (:class:`~hf_lorax.analysis.RankUtilizationCallback` does).
    """
    updates = []
    for name, layer, adapter_name, spec in lora_layers(model, adapter):
        base = layer.get_base_layer()
        tensors = [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, base.weight]
        if adapter_name in layer.lora_magnitude_vector:
            tensors.append(layer.lora_magnitude_vector[adapter_name].weight)
        with full_params(tensors) as (A, B, W, *magnitude):
            if not W.is_floating_point():
                W = dequantize_module_weight(base)
            W = W.detach().T if getattr(layer, "fan_in_fan_out", False) else W.detach()
            # copies: the gathered tensors are released when the block ends; W is only read inside it
            updates += split_update(name, A.detach().clone(), B.detach().clone(), float(layer.scaling[adapter_name]),
                                    W, magnitude[0].detach().clone() if magnitude else None, spec)
    return updates


def updates_from_adapter_dir(path: str, base_weights: dict[str, torch.Tensor] | None = None) -> list[LowRankUpdate]:
    """The updates of a saved adapter folder; ``base_weights`` ({module: (out, in) weight}) adds ‖W‖ figures."""
    folder = read_adapter_folder(path)
    state, weights, updates = folder.load_tensors(), base_weights or {}, []
    for module in folder.modules:
        A, B = state[f"{module.key}.lora_A.weight"], state[f"{module.key}.lora_B.weight"]
        magnitude = state.get(f"{module.key}.lora_magnitude_vector")
        # the base weight, tolerating a task-model prefix on either side (``transformer.h.0`` vs ``h.0``)
        W = weights[module.name] if module.name in weights else next(
            (w for k, w in weights.items() if module.name.endswith("." + k) or k.endswith("." + module.name)), None)
        if base_weights and W is None:  # else its ‖ΔW‖/‖W‖ would silently read "-"
            raise ValueError(f"the base weights hold no weight for {module.name}; the adapter was not trained on "
                             "this base model.")
        if W is not None and tuple(W.shape) != (B.shape[0], A.shape[1]):
            raise ValueError(f"the base weight of {module.name} has shape {tuple(W.shape)}, the adapter's update "
                             f"{(B.shape[0], A.shape[1])}: the adapter was not trained on this base model.")
        updates += split_update(module.name, A, B, module.scaling, W, magnitude, module.slices)
    return updates


def lora_layers(model: torch.nn.Module, adapter: str | None = None):
    """``(module name, LoRA layer, adapter name, its fused-slice spec or None)`` of every layer holding ``adapter``
    (default: its active one)."""
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            adapter_name = adapter or (layer.active_adapters or ["default"])[0]
            if adapter_name in layer.lora_A:
                spec = getattr(layer, "slice_specs", {}).get(adapter_name)
                yield name.removeprefix("base_model.model."), layer, adapter_name, spec


def split_update(module, A, B, scaling, W, magnitude, spec) -> list[LowRankUpdate]:
    """One :class:`LowRankUpdate` per slice of a fused module (``spec``), or one for a plain module."""
    def make(part, a, b, rows):
        w = None if W is None else W[rows].double()
        return LowRankUpdate(module, part, a, b, scaling, weight_fro=None if w is None else float(w.norm()),
                             magnitude=None if magnitude is None else magnitude[rows],
                             weight_row_norm=None if w is None else w.norm(dim=1))

    if spec is None:
        return [make("", A, B, slice(None))]
    r = A.shape[0] // len(spec.adapt)
    rows = [torch.as_tensor(idx, dtype=torch.long) for idx in spec.rows(B.shape[0], module)]
    return [make(part, A[i * r : (i + 1) * r], B[idx, i * r : (i + 1) * r], idx)
            for i, (part, idx) in enumerate(zip(spec.adapt, rows))]


# -- summaries -----------------------------------------------------------------------------------------


def layer_index(module: str) -> int | None:
    """The first integer component of a module name (``encoder.layer.3.attention`` -> 3)."""
    return next((int(p) for p in module.split(".") if p.isdigit()), None)


def module_type(stats: ModuleStats) -> str:
    return module_part_name(stats.module.split(".")[-1], stats.part)


def summarize(stats: list[ModuleStats], prefix: str = "rank_utilization") -> dict[str, float]:
    """Mean/min utilization overall, per module type and per layer, as flat metric names for a logger."""
    groups = {"": [s.utilization for s in stats]} if stats else {}
    for what, key in (("type", module_type), ("layer", lambda s: layer_index(s.module))):
        for value in sorted({key(s) for s in stats} - {None}):  # modules outside any layer are in no layer group
            groups[f"{what}/{value}/"] = [s.utilization for s in stats if key(s) == value]
    return {f"{prefix}/{name}{stat}": value for name, values in groups.items()
            for stat, value in (("mean", sum(values) / len(values)), ("min", min(values)))}


def suggest_rank_map(stats: list[ModuleStats], threshold: float = 0.9, max_rank: int | None = None) -> dict[str, int]:
    """Per module, the smallest power of two ≥ the rank holding ``threshold`` of the update's energy.

    Fused slices share one rank per module, so the largest slice decides. Modules whose update is still zero
    get rank 1. The result is a ``rank_map`` that :class:`hf_lorax.LoRAConfig` accepts as is.
    """
    suggestion: dict[str, int] = {}
    for s in stats:
        rank = 1 << (max(energy_rank(torch.tensor(s.singular_values), threshold), 1) - 1).bit_length()  # next 2^k
        rank = min(rank, max_rank) if max_rank is not None else rank
        suggestion[s.module] = max(suggestion.get(s.module, 1), rank)
    return suggestion
