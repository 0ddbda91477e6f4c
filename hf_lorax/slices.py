"""Slices of fused projections.

GPT-2's ``c_attn`` computes q, k and v with one ``Conv1D`` whose output is ``[q | k | v]``. The LoRA paper
adapts only q and v (loralib's ``MergedLinear(enable_lora=[True, False, True])``), which a module-level
LoRA cannot express. ``fused_slices={"c_attn": ["q", "v"]}`` adapts just those slices: each gets its own
rank-r block of ``B``, and ``A`` stacks the per-slice rows, so the adapter is the paper's.

Such an adapter *is* a standard LoRA on ``c_attn`` of rank ``n*r`` whose ``B`` is block-structured (slice ``i``'s
rows times columns ``i*r:(i+1)*r``, zeros elsewhere): the layer holds exactly that dense ``B`` and only keeps the
off-block entries from training (:class:`hf_lorax.layers.sliced.SlicedLoraB`), so peft, transformers and plain
peft loaders see ordinary LoRA state. A slice is a set of output rows (:meth:`SliceSpec.rows`), so interleaved
and grouped-query layouts are only a matter of computing those rows from the model config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Fused projections by module-name suffix: the slice names in output order. ``c_attn``: GPT-2 (contiguous),
# GPT-BigCode (multi-query widths); ``query_key_value``: GPT-NeoX / Bloom (interleaved per head), Falcon (grouped);
# ``qkv_proj``: Phi-3 (grouped-query widths); ``gate_up_proj``: Phi-3; ``Wqkv``: MPT. Which rows each slice owns can
# depend on the architecture (interleaved per head, multi-query widths): :func:`layout_for_model` computes that.
KNOWN_FUSED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "c_attn": ("q", "k", "v"), "query_key_value": ("q", "k", "v"), "qkv_proj": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"), "Wqkv": ("q", "k", "v")}


@dataclass(frozen=True)
class SliceSpec:
    """Which slices of a fused output to adapt.

    The output is ``groups`` equal groups (1 for ``[q | k | v]``, the head count for GPT-NeoX's per-head
    ``[q_h | k_h | v_h]``); each group is split into the ``layout`` parts in proportion to ``widths`` (all 1:
    equal parts; ``(heads, kv_heads, kv_heads)`` for grouped-query attention). :meth:`rows` gives each adapted
    slice's row indices of the fused output, which is all the layers and the analysis need.
    """

    layout: tuple[str, ...]
    adapt: tuple[str, ...]
    widths: tuple[int, ...] | None = None
    groups: int = 1

    def rows(self, out_features: int, module_name: str) -> list[list[int]]:
        """Row indices of the fused output owned by each adapted slice, in layout order."""
        widths = self.widths or (1,) * len(self.layout)
        unit, rest = divmod(out_features, self.groups * sum(widths))
        if rest or unit == 0:
            parts = (f"{len(self.layout)} equal slices {list(self.layout)}" if self.widths is None else
                     f"the slices {list(self.layout)} in proportion {list(widths)}")
            groups = f" in each of {self.groups} groups" if self.groups > 1 else ""
            raise ValueError(f"fused_slices: {module_name} has {out_features} outputs, which do not split into "
                             f"{parts}{groups}. It is not a fused projection with that layout.")
        group = unit * sum(widths)
        starts = [unit * sum(widths[:i]) for i in range(len(widths))]
        return [[g * group + starts[i] + t for g in range(self.groups) for t in range(unit * widths[i])]
                for i, name in enumerate(self.layout) if name in self.adapt]

    def as_dict(self) -> dict:
        return {"layout": list(self.layout), "adapt": list(self.adapt), "widths": list(self.widths or ()) or None,
                "groups": self.groups}


def layout_for_model(spec: SliceSpec, module_name: str, model_config) -> SliceSpec:
    """``spec`` with the row structure of ``module_name`` in a model of ``model_config`` (a transformers config).

    Explicit layouts (``{"layout": ..., "adapt": ...}`` with ``widths`` / ``groups``) are kept as given; the
    known fused projections get the structure their architecture's attention code splits them with.
    """
    suffix = module_name.split(".")[-1]
    if spec.widths is not None or spec.groups != 1 or KNOWN_FUSED_LAYOUTS.get(suffix) != spec.layout:
        return spec
    get = lambda key, default=None: getattr(model_config, key, default)  # noqa: E731
    model_type = get("model_type")
    heads = get("num_attention_heads") or get("n_head")
    kv_heads = get("num_key_value_heads") or get("num_kv_heads") or heads
    # (widths, groups) of a multi-query layout: [q | k | v] with one k/v head; without multi_query, per head
    multi_query = ((heads, 1, 1), 1) if get("multi_query", True) else (None, heads)
    widths, groups = None, 1
    if model_type in ("gpt_neox", "bloom") and suffix == "query_key_value":
        groups = heads  # the output viewed as (heads, 3 * head_dim): q, k, v of each head in turn
    elif model_type == "falcon" and suffix == "query_key_value":
        # the new decoder architecture: (kv_heads, heads/kv_heads + 2, head_dim), the queries, then k and v
        widths, groups = ((heads // kv_heads, 1, 1), kv_heads) if get("new_decoder_architecture") else multi_query
    elif model_type == "gpt_bigcode" and suffix == "c_attn":
        widths, groups = multi_query
    elif model_type == "phi3" and suffix == "qkv_proj":
        widths = (heads, kv_heads, kv_heads)
    elif model_type == "codegen" and suffix == "qkv_proj":  # CodeGenAttention: 4 groups (mp_num) of [q | v | k]
        order = ("q", "v", "k")
        return SliceSpec(layout=order, adapt=tuple(n for n in order if n in spec.adapt), groups=4)
    return SliceSpec(layout=spec.layout, adapt=spec.adapt, widths=widths, groups=groups)


def parse_fused_slices(value: Mapping | None) -> dict[str, SliceSpec]:
    """Validate ``fused_slices`` and turn each entry into a :class:`SliceSpec`.

    An entry is either ``"c_attn": ["q", "v"]`` for a module with a known layout, or
    ``"qkv": {"layout": ["q", "k", "v"], "adapt": ["q", "v"]}`` for any fused module of equal contiguous parts
    (``"widths"``: relative part widths; ``"groups"``: the output repeats the parts that many times, e.g. per head).
    """
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"fused_slices must be a dict of module name -> slice names, got {type(value).__name__}.")
    specs = {}
    for module, entry in value.items():
        if not isinstance(entry, Mapping):  # slice names of a known fused projection: spelled out with its layout
            suffix = module.split(".")[-1]
            if suffix not in KNOWN_FUSED_LAYOUTS:
                raise ValueError(f"fused_slices: {module!r} is not a known fused projection (known: "
                                 f"{sorted(KNOWN_FUSED_LAYOUTS)}). For another fused module pass "
                                 f'{{"layout": [...slice names in output order...], "adapt": [...]}}.')
            if isinstance(entry, str) or not isinstance(entry, Sequence):
                raise TypeError(f"fused_slices[{module!r}] must be a list of slice names such as ['q', 'v'], "
                                f"got {entry!r}.")
            entry = {"layout": KNOWN_FUSED_LAYOUTS[suffix], "adapt": entry}
        if set(entry) - {"layout", "adapt", "widths", "groups"} or "layout" not in entry or "adapt" not in entry:
            raise ValueError(f"fused_slices[{module!r}] must be a list of slice names or a dict with the keys "
                             f"'layout' and 'adapt' (and optionally 'widths', 'groups'), got keys {sorted(entry)}.")
        layout, adapt = tuple(entry["layout"]), tuple(entry["adapt"])
        widths, groups = entry.get("widths"), entry.get("groups", 1)
        if widths is not None:
            if (isinstance(widths, str) or not isinstance(widths, Sequence) or len(widths) != len(layout)
                    or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
                raise ValueError(f"fused_slices[{module!r}]['widths'] must be {len(layout)} positive integers "
                                 f"(one per layout part), got {widths!r}.")
            widths = tuple(widths)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"fused_slices[{module!r}]['groups'] must be a positive integer, got {groups!r}.")
        if len(set(layout)) != len(layout) or len(layout) < 2:
            raise ValueError(f"fused_slices[{module!r}]: layout {list(layout)} needs at least two distinct names.")
        bad = [n for n in adapt if n not in layout]
        if bad or not adapt:
            raise ValueError(f"fused_slices[{module!r}]: slice names {bad or adapt!r} are not valid; choose a "
                             f"non-empty subset of {list(layout)}.")
        if len(set(adapt)) != len(adapt):
            raise ValueError(f"fused_slices[{module!r}]: slice names {list(adapt)} repeat a name.")
        specs[str(module)] = SliceSpec(layout=layout, adapt=tuple(n for n in layout if n in adapt), widths=widths,
                                       groups=groups)
    return specs


def spec_for(module_name: str, specs: Mapping[str, SliceSpec]) -> SliceSpec | None:
    """The spec whose key is ``module_name`` or a ``.``-boundary suffix of it."""
    return next((spec for key, spec in specs.items() if module_name == key or module_name.endswith("." + key)), None)


# -- the fused-slice rule -----------------------------------------------------------------------------------
# A module adapted on n slices of rank r each is, exactly, a full-module LoRA of rank n*r whose B is
# block-structured. Keeping the per-slice scaling alpha/r (or alpha/sqrt(r) with rsLoRA) on that rank-n*r
# LoRA needs alpha*n (or alpha*sqrt(n)). Every place that converts between the two forms calls these (the rank
# ``n*r`` of the full-module LoRA is :attr:`hf_lorax.plan.ModulePlan.module_r`).


def module_alpha(alpha: float, n_slices: int, use_rslora: bool) -> float:
    """Alpha of the rank ``n*r`` LoRA that keeps the per-slice scaling ``alpha/r`` (or ``alpha/sqrt(r)``)."""
    return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)


def slice_rank(module_r: int, n_slices: int) -> int:
    """Per-slice rank of a full-module rank ``module_r`` (``module_r = n_slices * r``)."""
    return module_r // n_slices


def slice_alpha(fused: float, n_slices: int, use_rslora: bool) -> float:
    """Per-slice alpha of a full-module alpha (the inverse of :func:`module_alpha`)."""
    return fused / (math.sqrt(n_slices) if use_rslora else n_slices)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """peft's scaling of a rank-``r`` LoRA: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)
