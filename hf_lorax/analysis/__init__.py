"""Rank utilization of LoRA / DoRA adapters: how much of each adapter's rank is really used.

Pure functions (no Trainer needed)::

    from hf_lorax.analysis import analyze, updates_from_model, suggest_rank_map
    stats = analyze(updates_from_model(model))       # one ModuleStats per module (or fused slice)
    suggest_rank_map(stats, threshold=0.9)           # {module: power-of-two rank}
    allocate(spectra_from_updates(updates), budget=20_000, lora_alpha=16)  # a rank map to a parameter budget
    allocate(spectra_from_updates(updates, tracker.scores()), 20_000, 16, signal="sensitivity")  # by loss

During training: :class:`RankUtilizationCallback`. From the shell: ``python -m hf_lorax.analysis ADAPTER_DIR``.
"""

from .allocation import Allocation, ModuleSpectrum, allocate, spectra_from_updates
from .callback import RankUtilizationCallback
from .report import (
    LowRankUpdate,
    ModuleStats,
    analyze,
    module_stats,
    suggest_rank_map,
    summarize,
    updates_from_adapter_dir,
    updates_from_model,
)
from .sensitivity import SensitivityTracker, direction_sensitivity
from .spectra import (
    effective_rank,
    energy,
    energy_rank,
    factor_singular_values,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
)

__all__ = [  # in the order of the imports above
    "Allocation", "ModuleSpectrum", "allocate", "spectra_from_updates", "RankUtilizationCallback", "LowRankUpdate",
    "ModuleStats", "analyze", "module_stats", "suggest_rank_map", "summarize", "updates_from_adapter_dir",
    "updates_from_model", "SensitivityTracker", "direction_sensitivity", "effective_rank", "energy", "energy_rank",
    "factor_singular_values", "stable_rank", "subspace_similarity", "subspace_similarity_grid",
]
