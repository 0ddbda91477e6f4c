"""What a config means for one model: ``plan = resolve(config, model)``, a pure function.

peft matches ``target_modules`` and ``rank_pattern`` lazily and forgives mistakes: a target name or a
rank-pattern key that matches nothing is ignored or only warned about. :func:`resolve` turns every such
mistake into a ``ValueError`` that names the culprit and the closest real module names, and otherwise
returns an :class:`AdapterPlan`: per adapted module its rank, alpha, scaling, fused slices and method,
plus the task head to train. It reads the config and the model and changes neither.

Layers take their values from the plan (:meth:`~hf_lorax.config.LoRAConfig.with_plan` hands peft a config
copy whose ``rank_pattern`` / ``alpha_pattern`` state the rank and alpha peft builds for every module that
differs from ``r`` / ``lora_alpha``, and which carries the plan).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .base_init import CONVERTIBLE_INITS, base_changing_init, init_family, reload_problem
from .config import QLoRAConfig
from .integrations.peft_api import (
    ADAPTER_CHILD_NAMES,
    BaseTunerLayer,
    ExcludedModule,
    LoraModel,
    include_all_linear_layers,
    is_wrapped_head,
    pattern_value,
    target_module_exists,
)
from .layers.types import SUPPORTED_LAYER_TYPES, is_dense, is_quantized_linear, out_features
from .rank_map import closest_names, resolve_module_map
from .slices import SliceSpec, layout_for_model, lora_scaling, module_alpha, slice_alpha, slice_rank, spec_for
from .task_types import HEAD_TASK_TYPES, PEFT_ADDED_HEADS, task_name


class ReadOnlyDict(dict):
    """A dict that refuses changes (a plan is a result, not a scratchpad); copies and pickles as a dict does."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("an AdapterPlan is read-only: resolve the config again to change it")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):
        return (type(self), (dict(self),))


@dataclass(frozen=True)
class ModulePlan:
    """One adapted module: per-slice ``r`` and ``alpha`` (the module's own when not sliced)."""

    name: str
    r: int
    alpha: float
    scaling: float
    method: str  # "lora" or "dora"
    slices: SliceSpec | None = None
    use_rslora: bool = False

    @property
    def n_slices(self) -> int:
        return len(self.slices.adapt) if self.slices else 1

    @property
    def module_r(self) -> int:
        """Rank of the full-module LoRA the module is (``n·r`` for a fused-slice module): what peft builds."""
        return self.n_slices * self.r

    @property
    def module_alpha(self) -> float:
        """Alpha of that full-module LoRA (keeps the per-slice scaling): what peft reads from ``alpha_pattern``."""
        return module_alpha(self.alpha, self.n_slices, self.use_rslora)


@dataclass(frozen=True)
class AdapterPlan:
    """The resolved adapter: every adapted module by exact name, and the modules trained in full."""

    modules: Mapping[str, ModulePlan]
    modules_to_save: tuple[str, ...] | None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: object = None  # the expanded list ("all-linear") or peft's default (no targets given), else None
    default_targets_for: str | None = None  # the model_type whose peft default target_modules were used
    fan_in_fan_out: bool = False  # a targeted layer stores its weight as (in, out) (GPT-2's Conv1D), as peft records

    @property
    def sliced_modules(self) -> dict[str, int]:
        return {name: m.n_slices for name, m in self.modules.items() if m.slices is not None}


def resolve(config, model: nn.Module) -> AdapterPlan:
    """Validate ``config`` against ``model`` and resolve its maps, slices and task head."""
    modules = dict(plain_modules(model))
    _check_quantized_base(config, model, modules)
    heads = tuple(config.modules_to_save or ())
    found_heads = task_name(config.task_type) in HEAD_TASK_TYPES and not heads
    if found_heads:
        heads = tuple(find_task_heads(model))
    body = [name for name in modules if not (name in heads or name.startswith(tuple(f"{h}." for h in heads)))]
    target_modules, default_for, targeted = _peft_targets(config, model, body)
    # the values peft picks from the config's own rank_pattern / alpha_pattern (rank_map / alpha_map override them)
    peft_r = {name: pattern_value(config.rank_pattern or {}, name, config.r) for name in targeted}
    peft_alpha = {name: pattern_value(config.alpha_pattern or {}, name, config.lora_alpha) for name in targeted}

    specs = config.slice_specs
    _check_target_names(model, target_modules, targeted, modules, default_for)
    check_modules_to_save(list(modules), list(heads), targeted, task_name(config.task_type), found_heads)
    _check_layer_types(config, targeted, modules, specs)
    ranks = resolve_module_map(config.rank_map, targeted, all_modules=list(modules), what="rank_map")
    alphas = resolve_module_map(config.alpha_map, targeted, all_modules=list(modules), what="alpha_map")
    init = base_changing_init(config.init_lora_weights)
    per_module = ranks or alphas or config.rank_pattern or config.alpha_pattern
    if per_module and config.use_rslora and init and init_family(init) in CONVERTIBLE_INITS and not getattr(config, "is_resolved", False):
        # what serving it needs: peft's conversion refuses rsLoRA with rank_pattern / alpha_pattern
        raise ValueError(f"init_lora_weights={init!r} with use_rslora and per-module ranks or alphas (rank_map, "
                         "alpha_map, rank_pattern, alpha_pattern): the adapter trains against a changed base, and "
                         "peft's conversion to a LoRA of the original base (save_pretrained(path_initial_model_for_"
                         "weight_conversion=...)), which serving it needs, refuses rsLoRA with per-module ranks or "
                         "alphas. Drop use_rslora or the maps, or use init_lora_weights=True.")
    if not getattr(config, "is_resolved", False) and (problem := reload_problem(init, config.use_dora)):
        warnings.warn(problem, stacklevel=3)  # now, before training, while the way out is open

    plans = {}
    for name in targeted:
        r, alpha = ranks.get(name, peft_r[name]), alphas.get(name, peft_alpha[name])
        spec = spec_for(name, specs)
        if spec is not None:
            spec = layout_for_model(spec, name, getattr(model, "config", None))
            spec.rows(out_features(modules[name]), name)  # raises if the output does not split into the layout
            # a resolved config (a copy peft held, a saved folder's) states every rank and alpha as peft reads
            # them: fused-slice modules with their full-module values, turned back into per-slice ones here
            if getattr(config, "is_resolved", False):
                n = len(spec.adapt)
                r, alpha = slice_rank(r, n), slice_alpha(alpha, n, config.use_rslora)
        plans[name] = ModulePlan(name=name, r=r, alpha=alpha, scaling=lora_scaling(alpha, r, config.use_rslora),
                                 method="dora" if config.use_dora else "lora", slices=spec,
                                 use_rslora=bool(config.use_rslora))
    # peft takes the first key that matches, and writes adapter_config.json with its keys sorted: a short key the
    # user wrote ("c_attn") would then come before an exact one and win on reload. So the patterns peft receives
    # name each module whose value differs from r / lora_alpha exactly (for a fused-slice module: the full-module
    # LoRA peft builds and plain peft loads), and nothing else.
    return AdapterPlan(modules=ReadOnlyDict(plans), modules_to_save=heads or None, default_targets_for=default_for,
                       rank_pattern=ReadOnlyDict({n: m.module_r for n, m in plans.items() if m.module_r != config.r}),
                       alpha_pattern=ReadOnlyDict({n: m.module_alpha for n, m in plans.items()
                                                   if m.module_alpha != config.lora_alpha}),
                       target_modules=target_modules if target_modules != config.target_modules else None,
                       fan_in_fan_out=any(isinstance(modules[name], Conv1D) for name in targeted))


def _peft_targets(config, model: nn.Module, names: list[str]) -> tuple[object, str | None, list[str]]:
    """What peft adapts in ``model`` for ``config``, decided by peft's own code.

    Returns ``(target_modules, default_for, adapted)``: the config's ``target_modules`` as peft completes them before
    injecting (its default for the architecture when unset, ``"all-linear"`` expanded; None when unset and peft has
    no default), the ``model_type`` whose default was looked up (None when the config sets targets) and the entries
    of ``names`` peft's matcher adapts. ``config`` is not changed (peft writes its completions into a copy).
    """
    probe, default_for = copy.deepcopy(config), None
    if probe.target_modules is None and not getattr(probe, "target_parameters", None):
        # as LoraModel._prepare_adapter_config does when a config sets no targets
        default_for = LoraModel.get_model_config(model).get("model_type") or "unknown"
        default = LoraModel.target_module_mapping.get(default_for)
        if default is None:
            return None, default_for, []
        probe.target_modules = default if isinstance(default, str) else set(default)
    include_all_linear_layers(probe, model)
    hits = ((name, target_module_exists(probe, name)) for name in names)
    return probe.target_modules, default_for, [name for name, hit in hits if hit and not isinstance(hit, ExcludedModule)]


def plain_modules(model: nn.Module):
    """``(name, module)`` of the model as the user built it: adapter wrappers stand for their base layer."""
    inside: tuple[str, ...] = ()  # the wrappers' own children (peft's layers, the head's copies) are left out
    for name, module in model.named_modules():
        if name and not name.startswith(inside):
            if isinstance(module, BaseTunerLayer) or is_wrapped_head(module):
                inside += (name + ".",)
            yield name, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def find_task_heads(model: nn.Module) -> list[str]:
    """The task head: the top-level modules outside the transformer body that hold parameters.

    BERT's ``classifier`` (not its parameter-free ``dropout``), DistilBERT's ``pre_classifier`` and
    ``classifier``, DeBERTa's ``pooler`` and ``classifier``, GPT-2's ``score``, ``qa_outputs``. The body is the
    child transformers names ``base_model_prefix``; a task class without one (T5's question answering keeps
    ``shared``, ``encoder`` and ``decoder`` on itself) has as body the children of the architecture's bare model.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix:
        return []
    if isinstance(getattr(model, prefix, None), nn.Module):
        body = {prefix}
    else:
        try:  # the bare model's children, built on the meta device (no memory, no weights)
            import torch
            from transformers import AutoModel

            with torch.device("meta"):
                bare = AutoModel.from_config(model.config)
        except Exception:  # noqa: BLE001 - no bare counterpart (not a transformers model): no head is known
            return []
        body = {name for name, _ in bare.named_children()}
    return [name for name, child in model.named_children()
            if name not in body and next(child.parameters(), None) is not None]


def check_modules_to_save(names: list[str], entries: list[str], targeted: list[str], task: str | None,
                          found: bool) -> None:
    """Check that each ``modules_to_save`` entry selects exactly the modules meant, under peft's rule.

    peft wraps every module whose name (in the ``PeftModel``, after the adapter layers are in) ends with an
    entry, as a plain string: ``dropout`` also hits each ``lora_dropout``, ``classifier`` also ``pre_classifier``.
    Found heads (``found``) may hit only the heads; a user's entries must hit some module and no adapter layer
    internals. peft's task classes add names of their own (``classifier``, ``score``, ``qa_outputs``); they
    are checked the same way.
    """
    keys = [*names, *(f"{t}.{child}" for t in targeted for child in ADAPTER_CHILD_NAMES)]
    prefixed = {f"base_model.model.{k}": k for k in keys} | {p: p for p in ("base_model", "base_model.model")}
    heads = set(entries)
    found = found and bool(heads)  # no head found (not a transformers task model): nothing more is known
    for entry in [*entries, *PEFT_ADDED_HEADS.get(task, ())]:
        hits = [short for key, short in prefixed.items() if key.endswith(entry)]
        if entry in entries and not hits and entry not in PEFT_ADDED_HEADS.get(task, ()):  # peft saves its own
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model. Top-level modules: "
                             f"{sorted({n.split('.')[0] for n in names})}.")
        wrong = [h for h in hits if (h not in heads if found else h.rsplit(".", 1)[-1] in ADAPTER_CHILD_NAMES)]
        if wrong:
            raise ValueError(f"{'task head' if found else 'modules_to_save'} entry {entry!r} would also train "
                             f"{wrong[:3]}: peft matches modules_to_save by name suffix (a module is wrapped when its "
                             f"name ends with the entry). Name the module by a longer, unique dotted name, or set "
                             f"modules_to_save explicitly; intended: {sorted(heads)}.")


def _check_quantized_base(config, model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """A :class:`~hf_lorax.config.QLoRAConfig` the user built needs a bitsandbytes-quantized base.

    Why an error and not quantizing: ``peft.get_peft_model`` / ``SFTTrainer(peft_config=...)`` receive a model the
    user already built and placed; replacing its weights in place by 4-bit copies would change that object (and
    its device and dtype) behind their back. A saved QLoRA adapter (a resolved config) may load onto an
    unquantized base, as with plain peft (e.g. to serve it in bf16).
    """
    quantized = any(is_quantized_linear(m) for m in modules.values())
    if isinstance(config, QLoRAConfig) and not config.is_resolved and not quantized:
        raise ValueError(f"QLoRAConfig needs a quantized base, but this {type(model).__name__} has no "
                         "bitsandbytes-quantized linear layers (4-bit or 8-bit), so its quant_type/compute_dtype "
                         "would be ignored. Load the base with quantization_config=config.bnb_config() (for TRL: "
                         "model_init_kwargs={'quantization_config': ...}), or let hf_lorax.get_model(config) load "
                         "it; for an unquantized base use LoRAConfig / DoRAConfig.")


def _supported(modules: dict[str, nn.Module]) -> list[str]:
    """The modules of a layer type hf_lorax adapts (:data:`~hf_lorax.layers.types.SUPPORTED_LAYER_TYPES`)."""
    return [n for n, m in modules.items() if is_dense(m) or is_quantized_linear(m)]


def _check_target_names(model: nn.Module, target_modules, targeted: list[str], modules: dict[str, nn.Module],
                        default_for: str | None) -> None:
    """``target_modules`` as peft completed them (:func:`_peft_targets`)."""
    # the distinct last components of the module names (a dict keeps them in order): ['query', 'value', ...]
    suffixes = dict.fromkeys(name.split(".")[-1] for name in _supported(modules) or modules)
    candidates = [s for s in suffixes if not s.isdigit()]
    if default_for is not None and target_modules is None:
        raise ValueError(f"target_modules is not set and peft has no default LoRA targets for model_type "
                         f"{default_for!r} ({type(model).__name__}). Set target_modules to some of its linear "
                         f"layers, e.g. {candidates[:12]}, or to 'all-linear'.")
    shown = "target_modules=" + repr(sorted(target_modules) if isinstance(target_modules, set) else target_modules)
    shown += f" (peft's default for model_type {default_for!r})" if default_for is not None else ""
    if not targeted:
        raise ValueError(f"{shown} matched no module of the model. Layer names it could target (by suffix): "
                         f"{candidates[:12]}.")
    if isinstance(target_modules, str):
        return  # a regex; peft matches it as a whole
    for entry in sorted(target_modules):
        if not any(name == entry or name.endswith("." + entry) for name in targeted):
            raise ValueError(f"target_modules entry {entry!r} matches no module of the model ({shown}). "
                             f"Closest layer names: {closest_names(entry, candidates)}.")


def _check_layer_types(config, targeted: list[str], modules: dict[str, nn.Module], specs: dict) -> None:
    """Each slice key names an adapted module; DoRA and slices adapt only the layer types hf_lorax supports."""
    # a key selects a module as spec_for does: the name or a ``.``-boundary suffix of it
    sliced = {name for name in targeted if any(name == key or name.endswith("." + key) for key in specs)}
    for key in specs:
        if not any(name == key or name.endswith("." + key) for name in targeted):
            raise ValueError(f"fused_slices key {key!r} matches no adapted module. Add it to target_modules; "
                             f"adapted modules look like {closest_names(key, targeted)}.")
    supported = set(_supported(modules))
    for name in targeted:
        if name not in supported and (config.use_dora or name in sliced):
            raise ValueError(f"{config.method.upper()} cannot adapt {name} ({type(modules[name]).__name__}): "
                             f"hf_lorax supports {', '.join(SUPPORTED_LAYER_TYPES)}. Remove it from target_modules.")
