"""Rank allocation to a parameter budget, from a short probe run.

A probe adapter trained with a uniform rank ``R`` gives, per module, the singular values ``σ_1 ≥ … ≥ σ_R`` of
its update ``ΔW``. The *value* of a module's k-th direction comes from one of two signals:

* ``"energy"``: its share of that module's update energy, ``σ_k² / Σ_j σ_j²``. Shares, not absolute energies,
  because absolute update norms differ between modules for reasons unrelated to how many directions they need
  (learning-rate dynamics, scaling, weight norms).
* ``"sensitivity"``: the k-th largest smoothed loss sensitivity of the module's directions
  (:mod:`hf_lorax.analysis.sensitivity`, recorded by the probe's ``RankUtilizationCallback``). Absolute, not
  shares: it estimates what the loss loses with the direction, which is comparable between modules.

A direction costs ``in_features + out_features`` parameters (one row of ``A``, one column of ``B``), so the k-th
directions of all modules are ranked by value per parameter. Every module gets rank 1; then the ordered (module, k) pairs
are taken while they fit. The *prefix* rule (stop at the first pair that does not fit, never skip ahead to a
cheaper one) makes the allocation monotone: a larger budget never lowers any module's rank. Ranks are capped
at the probe rank: the probe says nothing about directions beyond it.

A fused module (``fused_slices``) has one rank for all its slices; the value of its k-th direction is the mean
of its slices' shares (the sum of their sensitivities) and its cost is that of every slice's row and column.

The alpha policy says how each module's ``lora_alpha`` follows its new rank:

* ``"scaling"`` keeps the probe's scaling ``alpha / r`` per module (an ``alpha_map`` with ``alpha_m = s_m·r_m``),
  so a module trained at rank 1 steps as it did at rank ``R``;
* ``"alpha"`` keeps ``lora_alpha`` (no ``alpha_map``): a rank-1 module then trains with ``R``× the scaling;
* ``"rslora"`` sets ``alpha_m = lora_alpha·√r_m`` (the scaling ``alpha/√r`` of rsLoRA, Kalajdzievski 2023).

``"scaling"`` is the default: it changes the ranks and nothing else, so a map can be judged against the uniform
run it replaces (docs/rank_allocation.md: the three policies were not separable by measurement).
Every ``alpha_map`` assumes ``use_rslora=False`` in the config that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from .report import LowRankUpdate
from .spectra import factor_singular_values

ALPHA_POLICIES = ("scaling", "alpha", "rslora")
SIGNALS = ("energy", "sensitivity")
RULES = {"energy": "energy share per parameter", "sensitivity": "loss sensitivity per parameter"}


@dataclass(frozen=True)
class ModuleSpectrum:
    """What the allocation needs to know of one adapted module (all its fused slices together)."""

    module: str
    singular_values: tuple[tuple[float, ...], ...]  # one descending spectrum per slice (one for a plain module)
    cost_per_rank: int  # parameters one more rank adds: Σ over slices of in_features + out_features
    probe_rank: int
    scaling: float = 1.0  # the probe's alpha / r
    sensitivity: tuple[tuple[float, ...], ...] | None = None  # per slice, the score of each direction (σ order)

    def values(self, signal: str) -> list[float]:
        """Value of directions k = 1..probe_rank under ``signal``, descending: under ``"energy"`` the mean over
        slices of ``σ_k² / Σσ²`` (0 for a zero update), under ``"sensitivity"`` the sum over slices of the k-th
        largest score."""
        if signal == "energy":
            shares = [0.0] * self.probe_rank
            for sv in self.singular_values:
                total = sum(s * s for s in sv)
                for k, s in enumerate(sv[: self.probe_rank]):
                    shares[k] += (s * s / total if total > 0 else 0.0) / len(self.singular_values)
            return shares
        if self.sensitivity is None:
            raise ValueError(f"{self.module}: no loss sensitivity was recorded for this module; gather it with "
                             "RankUtilizationCallback during the probe run, or use signal 'energy'.")
        ranked = [sorted(scores, reverse=True)[: self.probe_rank] for scores in self.sensitivity]
        return [sum(scores[k] for scores in ranked if k < len(scores)) for k in range(self.probe_rank)]


@dataclass(frozen=True)
class Allocation:
    """A budgeted rank map: ``rank_map`` and ``alpha_map`` are ready for :class:`hf_lorax.LoRAConfig`."""

    rank_map: dict[str, int]
    alpha_map: dict[str, float] | None
    params: int  # LoRA parameters (lora_A + lora_B) of the rank map
    budget: int
    min_params: int  # the budget of rank 1 everywhere
    alpha_policy: str
    signal: str = "energy"

    def to_json(self) -> dict:
        return {**asdict(self), "rule": RULES[self.signal]}


def spectra_from_updates(updates: Iterable[LowRankUpdate],
                         sensitivity: dict[str, list[float]] | None = None) -> list[ModuleSpectrum]:
    """Group the updates of a probe adapter (``updates_from_model`` / ``updates_from_adapter_dir``) by module;
    ``sensitivity`` (``SensitivityTracker.scores()``: ``{module or module[slice]: scores}``) attaches each
    module's loss sensitivity."""
    grouped: dict[str, list[LowRankUpdate]] = {}
    for u in updates:
        grouped.setdefault(u.module, []).append(u)
    spectra = []
    for module, parts in grouped.items():
        recorded = sensitivity is not None and all(u.name in sensitivity for u in parts)  # every slice, or none
        spectra.append(ModuleSpectrum(
            module, tuple(tuple(factor_singular_values(u.lora_A, u.lora_B, u.scaling).tolist()) for u in parts),
            cost_per_rank=sum(u.lora_A.shape[1] + u.lora_B.shape[0] for u in parts), probe_rank=parts[0].r,
            scaling=parts[0].scaling, sensitivity=tuple(tuple(sensitivity[u.name]) for u in parts) if recorded else None,
        ))
    return spectra


def adapter_params(spectra: Sequence[ModuleSpectrum], rank_map: dict[str, int]) -> int:
    """LoRA parameters of ``rank_map`` (``rank_m · cost_per_rank_m`` summed)."""
    return sum(rank_map[s.module] * s.cost_per_rank for s in spectra)


def direction_order(spectra: Sequence[ModuleSpectrum], signal: str = "energy") -> list[tuple[str, int, int]]:
    """``(module, k, cost)`` for every direction k ≥ 2, best value per parameter first.

    Ties keep module order and then k; values fall with k, so within a module directions come in order.
    """
    check_choice("signal", signal, SIGNALS)
    directions = [(s.module, k, s.cost_per_rank, value / s.cost_per_rank)
                  for s in spectra for k, value in enumerate(s.values(signal)[1:], start=2)]
    # a stable sort: ties stay in module order, then k
    return [d[:3] for d in sorted(directions, key=lambda d: -d[3])]


def allocate_ranks(spectra: Sequence[ModuleSpectrum], budget: int, signal: str = "energy") -> dict[str, int]:
    """``{module: rank}`` with at most ``budget`` LoRA parameters: rank 1 everywhere, then the longest prefix of
    :func:`direction_order` that fits. Raises ``ValueError`` when the budget is below rank 1 everywhere."""
    if not spectra:
        raise ValueError("No adapted modules to allocate ranks to.")
    ranks = {s.module: 1 for s in spectra}
    left = budget - adapter_params(spectra, ranks)
    if left < 0:
        raise ValueError(f"Budget {budget:,} parameters is below the minimum {budget - left:,} "
                         f"(rank 1 on each of the {len(spectra)} adapted modules).")
    for module, k, cost in direction_order(spectra, signal):
        if cost > left:
            break
        ranks[module], left = k, left - cost
    return ranks


def alpha_map(spectra: Sequence[ModuleSpectrum], rank_map: dict[str, int], lora_alpha: float,
              policy: str) -> dict[str, float] | None:
    """Each module's ``lora_alpha`` for its new rank under ``policy`` (see the module docstring; :func:`allocate`
    checks it)."""
    if policy == "alpha":
        return None
    if policy == "rslora":
        return {m: lora_alpha * math.sqrt(r) for m, r in rank_map.items()}
    return {s.module: s.scaling * rank_map[s.module] for s in spectra}


def allocate(spectra: Sequence[ModuleSpectrum], budget: int, lora_alpha: float,
             alpha_policy: str = "scaling", signal: str = "energy") -> Allocation:
    """The rank map for ``budget`` LoRA parameters under ``signal``, its alpha map and its size."""
    check_alpha_policy(alpha_policy)
    ranks = allocate_ranks(spectra, budget, signal)
    return Allocation(rank_map=ranks, alpha_map=alpha_map(spectra, ranks, lora_alpha, alpha_policy),
                      params=adapter_params(spectra, ranks), budget=budget,
                      min_params=sum(s.cost_per_rank for s in spectra), alpha_policy=alpha_policy, signal=signal)


def budget_from_ratio(spectra: Sequence[ModuleSpectrum], ratio: float) -> int:
    """``ratio`` × the probe adapter's LoRA parameters, rounded down."""
    if not 0 < ratio <= 1:
        raise ValueError(f"budget ratio {ratio} must be in (0, 1]: a fraction of the probe adapter's parameters.")
    return int(ratio * adapter_params(spectra, {s.module: s.probe_rank for s in spectra}))


def check_alpha_policy(policy: str) -> None:
    check_choice("alpha policy", policy, ALPHA_POLICIES)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} {value!r}: choose one of {list(choices)}.")
