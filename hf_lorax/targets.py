"""Resolve an hf_lorax config against a concrete model, before peft injects any layer.

peft matches ``target_modules`` and ``rank_pattern`` lazily and forgives mistakes: a target name or a
rank-pattern key that matches nothing is ignored or only warned about. Here every such mistake is a
``ValueError`` that names the culprit and the closest real module names, raised before the model is
touched. On success the config holds exact per-module ``rank_pattern`` / ``alpha_pattern`` entries and
the task head in ``modules_to_save``.
"""

from __future__ import annotations

from collections.abc import Callable

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import get_pattern_key
from torch import nn

from .layers import SUPPORTED_LAYER_TYPES, is_dense
from .rank_map import closest_names, resolve_module_map
from .slices import spec_for

HEAD_TASK_TYPES = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def adaptable_names(model: nn.Module) -> list[str]:
    """Names of the modules hf_lorax has layers for, skipping adapter internals."""
    return [name for name, module in _plain_modules(model) if is_dense(module)]


def _plain_modules(model: nn.Module):
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            skip.append(name + ".")
            yield name, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            continue
        yield name, module


def find_task_heads(model: nn.Module) -> list[str]:
    """Top-level modules outside the transformer body: the task head (RoBERTa ``classifier``, GPT-2 ``score``)."""
    body = getattr(model, "base_model_prefix", None)
    if not body or not hasattr(model, body):
        return []
    return [name for name, _ in model.named_children() if name != body]


def declare_mean_loss(model: nn.Module) -> None:
    """Tell the Trainer that this head's loss is a plain mean.

    transformers' classification / QA heads take ``**kwargs`` but compute a mean loss without
    ``num_items_in_batch``; seeing ``**kwargs``, the Trainer assumes a sum over the global batch and multiplies
    the loss by the number of processes, so under DDP the loss and gradients come out N times too large (and
    gradient clipping then changes the result). ``accepts_loss_kwargs = False`` is the Trainer's own switch.
    """
    if "accepts_loss_kwargs" not in vars(type(model)) and hasattr(model, "forward"):
        model.accepts_loss_kwargs = False


def prepare_injection(config, model: nn.Module, is_target: Callable[[str], object]) -> None:
    """Validate ``config`` against ``model`` and resolve its maps; ``is_target`` is peft's own matcher."""
    if config.task_type in HEAD_TASK_TYPES:
        if not config.modules_to_save:
            config.modules_to_save = find_task_heads(model) or None
        declare_mean_loss(model)
    _maybe_include_all_linear_layers(config, model)

    modules = dict(_plain_modules(model))
    head_prefixes = tuple(f"{h}." for h in (config.modules_to_save or []))
    targeted = []
    for name in modules:
        if name.startswith(head_prefixes) or name in (config.modules_to_save or []):
            continue
        hit = is_target(name)
        if hit and not isinstance(hit, _ExcludedModule):
            targeted.append(name)

    _check_target_names(config, targeted, list(modules))
    _check_layer_types(config, targeted, modules)
    _resolve_maps(config, targeted, list(modules))
    _resolve_slices(config, targeted, modules)


def _check_target_names(config, targeted: list[str], all_names: list[str]) -> None:
    candidates = adaptable_suffixes(all_names)
    if not targeted:
        raise ValueError(
            f"target_modules={_show(config.target_modules)} matched no module of the model. "
            f"Module names it could target (by suffix): {candidates[:12]}."
        )
    if isinstance(config.target_modules, str):
        return  # a regex; peft matches it as a whole
    for entry in config.target_modules:
        if not any(name == entry or name.endswith("." + entry) for name in targeted):
            raise ValueError(
                f"target_modules entry {entry!r} matches no module of the model. Closest names: "
                f"{closest_names(entry, candidates)}."
            )


def adaptable_suffixes(names: list[str]) -> list[str]:
    """Distinct last components of module names, e.g. ['query', 'value', 'dense', ...]."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.split(".")[-1], None)
    return [s for s in seen if not s.isdigit()]


def _check_layer_types(config, targeted: list[str], modules: dict[str, nn.Module]) -> None:
    for name in targeted:
        module = modules[name]
        if is_dense(module) or _is_quantized_linear(module):
            continue
        if config.use_dora or name in _slice_targets(config, [name]):
            raise ValueError(
                f"{config.method.upper()} cannot adapt {name} ({type(module).__name__}): hf_lorax supports "
                f"{', '.join(SUPPORTED_LAYER_TYPES)}. Remove it from target_modules."
            )


def _is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


def _resolve_maps(config, targeted: list[str], all_names: list[str]) -> None:
    ranks = resolve_module_map(config.rank_map, targeted, all_modules=all_names, what="rank_map")
    alphas = resolve_module_map(config.alpha_map, targeted, all_modules=all_names, what="alpha_map")
    if not (ranks or alphas):
        return
    if config.use_rslora and config.init_lora_weights in ("pissa", "olora"):
        raise ValueError("rank_map/alpha_map cannot be combined with use_rslora and PiSSA/OLoRA initialisation.")
    config.rank_pattern = {**ranks, **{k: v for k, v in (config.rank_pattern or {}).items() if k not in ranks}}
    config.alpha_pattern = {**alphas, **{k: v for k, v in (config.alpha_pattern or {}).items() if k not in alphas}}


def _slice_targets(config, targeted: list[str]) -> list[str]:
    specs = getattr(config, "_slice_specs", {}) or {}
    return [name for name in targeted if spec_for(name, specs) is not None]


def _resolve_slices(config, targeted: list[str], modules: dict[str, nn.Module]) -> None:
    specs = getattr(config, "_slice_specs", {}) or {}
    for key in specs:
        if not any(name == key or name.endswith("." + key) for name in targeted):
            raise ValueError(
                f"fused_slices key {key!r} matches no adapted module. Add it to target_modules; adapted modules "
                f"look like {closest_names(key, targeted)}."
            )
    sliced = {}
    for name in _slice_targets(config, targeted):
        spec = spec_for(name, specs)
        out_features = _out_features(modules[name])
        spec.bounds(out_features, name)  # raises if the output does not split into the layout
        sliced[name] = len(spec.adapt)
        # Exact per-slice entries, so saving can state the equivalent full-module rank for plain peft.
        config.rank_pattern = {**config.rank_pattern, name: _pattern_value(config.rank_pattern, name, config.r)}
        config.alpha_pattern = {
            **config.alpha_pattern,
            name: _pattern_value(config.alpha_pattern, name, config.lora_alpha),
        }
    config._sliced_modules = sliced


def _pattern_value(pattern: dict, name: str, default):
    """The value peft would pick for ``name`` (its first-match regex semantics)."""
    key = get_pattern_key(list(pattern), name)
    return pattern.get(key, default)


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "nf"):  # transformers Conv1D
        return module.nf
    return module.out_features


def _show(target_modules) -> str:
    return repr(sorted(target_modules) if isinstance(target_modules, set) else target_modules)
