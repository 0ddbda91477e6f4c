"""Slices of fused projections.

GPT-2's ``c_attn`` computes q, k and v with one ``Conv1D`` whose output is ``[q | k | v]``. The LoRA paper
adapts only q and v (loralib's ``MergedLinear(enable_lora=[True, False, True])``), which a module-level
LoRA cannot express. ``fused_slices={"c_attn": ["q", "v"]}`` adapts just those slices: each gets its own
rank-r ``B`` block, and ``A`` stacks the per-slice rows, so the trainable parameter count is the paper's.

Saved, such an adapter is an exactly equivalent standard LoRA on ``c_attn`` of rank ``n*r`` whose ``B``
is block-structured (zeros outside the adapted slices); plain peft loads it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Fused projections whose output is an equal-width concatenation, keyed by module-name suffix.
KNOWN_FUSED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "c_attn": ("q", "k", "v"),  # GPT-2, DistilGPT-2, GPT-2 medium/large/xl
}


@dataclass(frozen=True)
class SliceSpec:
    """Which slices of a fused output to adapt: ``layout`` names the equal-width parts in order."""

    layout: tuple[str, ...]
    adapt: tuple[str, ...]

    def bounds(self, out_features: int, module_name: str) -> list[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` of the adapted slices, in layout order."""
        n = len(self.layout)
        if out_features % n:
            raise ValueError(
                f"fused_slices: {module_name} has {out_features} outputs, which do not split into "
                f"{n} equal slices {list(self.layout)}. It is not a fused projection with that layout."
            )
        width = out_features // n
        return [(i * width, (i + 1) * width) for i, name in enumerate(self.layout) if name in self.adapt]


def parse_fused_slices(value: Mapping | None) -> dict[str, SliceSpec]:
    """Validate ``fused_slices`` and turn each entry into a :class:`SliceSpec`.

    An entry is either ``"c_attn": ["q", "v"]`` for a module with a known layout, or
    ``"qkv": {"layout": ["q", "k", "v"], "adapt": ["q", "v"]}`` for any equal-width fused module.
    """
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"fused_slices must be a dict of module name -> slice names, got {type(value).__name__}.")
    specs = {}
    for module, entry in value.items():
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"layout", "adapt"}
            if unknown or "layout" not in entry or "adapt" not in entry:
                raise ValueError(
                    f"fused_slices[{module!r}] must be a list of slice names or a dict with exactly the keys "
                    f"'layout' and 'adapt', got keys {sorted(entry)}."
                )
            layout, adapt = tuple(entry["layout"]), tuple(entry["adapt"])
        else:
            suffix = module.split(".")[-1]
            if suffix not in KNOWN_FUSED_LAYOUTS:
                raise ValueError(
                    f"fused_slices: {module!r} is not a known fused projection (known: "
                    f"{sorted(KNOWN_FUSED_LAYOUTS)}). For another fused module pass "
                    f'{{"layout": [...slice names in output order...], "adapt": [...]}}.'
                )
            layout, adapt = KNOWN_FUSED_LAYOUTS[suffix], tuple(_as_names(entry, module))
        _check_names(module, layout, adapt)
        specs[str(module)] = SliceSpec(layout=layout, adapt=tuple(n for n in layout if n in adapt))
    return specs


def _as_names(entry, module: str) -> Sequence[str]:
    if isinstance(entry, str) or not isinstance(entry, Sequence):
        raise TypeError(f"fused_slices[{module!r}] must be a list of slice names such as ['q', 'v'], got {entry!r}.")
    return entry


def _check_names(module: str, layout: tuple, adapt: tuple) -> None:
    if len(set(layout)) != len(layout) or len(layout) < 2:
        raise ValueError(f"fused_slices[{module!r}]: layout {list(layout)} needs at least two distinct names.")
    bad = [n for n in adapt if n not in layout]
    if bad or not adapt:
        raise ValueError(
            f"fused_slices[{module!r}]: slice names {bad or adapt!r} are not valid; choose a non-empty subset "
            f"of {list(layout)}."
        )
    if len(set(adapt)) != len(adapt):
        raise ValueError(f"fused_slices[{module!r}]: slice names {list(adapt)} repeat a name.")


def spec_for(module_name: str, specs: Mapping[str, SliceSpec]) -> SliceSpec | None:
    """The spec whose key is ``module_name`` or a ``.``-boundary suffix of it."""
    for key, spec in specs.items():
        if module_name == key or module_name.endswith("." + key):
            return spec
    return None


# -- the fused-slice rule -----------------------------------------------------------------------------------
# A module adapted on n slices of rank r each is, exactly, a full-module LoRA of rank n*r whose B is
# block-structured. Keeping the per-slice scaling alpha/r (or alpha/sqrt(r) with rsLoRA) on that rank-n*r
# LoRA needs alpha*n (or alpha*sqrt(n)). Every place that converts between the two forms calls these.


def fused_rank(r: int, n_slices: int) -> int:
    """Rank of the full-module LoRA equivalent to ``n_slices`` slices of rank ``r``."""
    return n_slices * r


def fused_alpha(alpha: float, n_slices: int, use_rslora: bool) -> float:
    """Alpha of the rank ``n*r`` LoRA that keeps the per-slice scaling ``alpha/r`` (or ``alpha/sqrt(r)``)."""
    return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)


def slice_rank(fused_r: int, n_slices: int) -> int:
    """Per-slice rank of a full-module rank ``fused_r`` (the inverse of :func:`fused_rank`)."""
    return fused_r // n_slices


def slice_alpha(fused: float, n_slices: int, use_rslora: bool) -> float:
    """Per-slice alpha of a full-module alpha (the inverse of :func:`fused_alpha`)."""
    return fused / (math.sqrt(n_slices) if use_rslora else n_slices)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """peft's scaling of a rank-``r`` LoRA: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)
