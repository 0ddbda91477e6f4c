"""Which layers a task script adapts: the LoRA paper's choice found in the model that runs, or the user's flags.

The paper adapts the attention's query and value projections (Hu et al. 2021, Section 7.1). A script resolves
that choice for whatever ``--model_name_or_path`` it is given, from the model's structure (built on the meta
device from its config, no weights read):

1. a query and a value projection side by side in one module (``q_proj``/``v_proj``, ``query``/``value``,
   ``q_lin``/``v_lin``, ``query_proj``/``value_proj``, ``q``/``v``);
2. else the q and v slices of a fused projection whose layout hf_lorax knows
   (:data:`hf_lorax.slices.KNOWN_FUSED_LAYOUTS`: GPT-2's ``c_attn``, GPT-NeoX / Bloom / Falcon
   ``query_key_value``, Phi-3 ``qkv_proj``, MPT ``Wqkv``; hf_lorax derives each one's rows from the config),
   or of one whose split only its attention code states (:data:`OWN_LAYOUTS`);
3. else peft's default targets for the model type (RWKV: no query at all), said so;
4. else one line naming the model's linear layers and the flag to use.

``--target_modules``, ``--fused_slices`` and ``--modules_to_save`` replace the resolved fields, as in a config
(``--target_modules`` alone drops the resolved slices: they belong to the resolved modules).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

PAPER_CHOICE = "the attention's query and value (the LoRA paper's choice)"
QUERY = re.compile(r"(?P<q>q|query|wq)(?P<tail>_proj|_lin)?", re.IGNORECASE)
VALUE_OF = {"q": "v", "query": "value", "wq": "wv"}
# Fused projections hf_lorax's table does not know (DeBERTa's in_proj, split per head by its attention's forward):
# model_type -> (suffix, output order, groups).
OWN_LAYOUTS = {
    "deberta": ("in_proj", ("q", "k", "v"), lambda config: config.num_attention_heads),  # per head [q_h|k_h|v_h]
}
FLAGS = ("target_modules", "fused_slices", "modules_to_save")


@dataclass
class TargetArguments:
    """The target flags of the task scripts (mixed into :class:`hf_lorax_paper.experiment.MethodArguments`)."""

    target_modules: list[str] | None = field(default=None, metadata={
        "help": "layers to adapt (default: the attention's query and value, found in the model; or all-linear)"})
    fused_slices: str | None = field(default=None, metadata={
        "help": 'slices of fused projections, JSON (inline or a file), e.g. \'{"c_attn": ["q", "v"]}\''})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained in full and saved with the adapter (default: the task head hf_lorax finds)"})


@dataclass(frozen=True)
class Targets:
    """The adapter's targets (hf_lorax config fields) and why they were chosen."""

    target_modules: tuple[str, ...] | str
    fused_slices: dict[str, Any] | None
    modules_to_save: tuple[str, ...] | None
    why: str  # "q_proj, v_proj: the attention's query and value (the LoRA paper's choice)"

    def config_fields(self) -> dict[str, Any]:
        modules = self.target_modules
        return {"target_modules": modules if isinstance(modules, str) else list(modules),
                "fused_slices": self.fused_slices,
                "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None}

    def record(self) -> dict[str, Any]:
        return {**self.config_fields(), "why": self.why}


def describe_targets(target_modules, fused_slices) -> str:
    """``c_attn (q, v slices), ...``: the targets as a log line states them."""
    if isinstance(target_modules, str):
        return target_modules
    slices = {k.split(".")[-1]: v for k, v in (fused_slices or {}).items()}

    def one(name: str) -> str:
        spec = slices.get(name.split(".")[-1])
        adapt = spec.get("adapt") if isinstance(spec, dict) else spec
        return f"{name} ({', '.join(adapt)} slices)" if adapt else name

    return ", ".join(one(name) for name in target_modules)


def preset_targets(target_modules, fused_slices=None) -> Targets:
    """A preset's own targets (the paper's model), for callers that build an adapter without a resolved model."""
    why = f"{describe_targets(target_modules, fused_slices)}: {PAPER_CHOICE}"
    return Targets(tuple(target_modules), fused_slices, None, why)


# -- the flags ---------------------------------------------------------------------------------------------


def fused_slices_argument(value: str | None) -> dict | None:
    """``--fused_slices``: inline JSON or a JSON file, validated as hf_lorax's ``fused_slices`` field."""
    from hf_lorax.slices import parse_fused_slices

    if value is None:
        return None
    example = '\'{"c_attn": ["q", "v"]}\''
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                parsed = json.load(f)
        else:
            parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--fused_slices {value!r} is not valid JSON ({exc.msg}, column {exc.colno}); "
                         f"pass a module -> slices object, e.g. {example}.") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--fused_slices {value!r}: expected a JSON object of module -> slice names, e.g. {example}.")
    try:
        parse_fused_slices(parsed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--fused_slices: {exc}") from None
    return parsed or None


def check_flags(method, adapter_methods: tuple[str, ...]) -> None:
    """The target flags before anything runs: valid JSON, and an adapter to apply them to."""
    given = [f"--{name}" for name in FLAGS if getattr(method, name) is not None]
    if given and method.method not in adapter_methods:
        raise ValueError(f"{given[0]} chooses what an adapter adapts; --method {method.method} trains no adapter.")
    fused_slices_argument(method.fused_slices)


def with_targets(plugin, preset, method, log: bool):
    """``preset`` with the run's :class:`Targets` (``preset.targets``), said on stdout when ``log``."""
    targets, model_type = resolve_targets(preset.model_name_or_path, plugin.task_type(), plugin.num_labels(preset), method)
    if log:
        print(f"[{plugin.name}] {preset.model_name_or_path} ({model_type}): adapting {targets.why}", flush=True)
    return replace(preset, targets=targets)


def targets_record(model, preset) -> dict | None:
    """What the adapter adapted and why, with the modules it trained in full (the task head hf_lorax found)."""
    from hf_lorax import describe

    if getattr(preset, "targets", None) is None:
        return None
    return {**preset.targets.record(), "modules_to_save": sorted(describe(model).heads) or None}


def resolve_targets(model_name_or_path: str, task_type: str, num_labels: int | None, method) -> tuple[Targets, str]:
    """The run's targets: the flags where given, the rest found in the model. Returns them and the model_type."""
    model = model_skeleton(model_name_or_path, task_type, num_labels)
    fused = fused_slices_argument(method.fused_slices)
    if method.target_modules:
        modules = "all-linear" if method.target_modules == ["all-linear"] else tuple(method.target_modules)
        targets = Targets(modules, fused, None, f"{describe_targets(modules, fused)}: --target_modules"
                                                + (" and --fused_slices" if fused else ""))
    else:
        targets = find_targets(model, model_name_or_path)
        if method.fused_slices is not None:
            why = (f"{describe_targets(targets.target_modules, fused)}: the modules found in the model, slices from "
                   "--fused_slices")
            targets = replace(targets, fused_slices=fused, why=why)
    if method.modules_to_save:
        heads = tuple(method.modules_to_save)
        targets = replace(targets, modules_to_save=heads, why=f"{targets.why}; trained in full: {', '.join(heads)} "
                                                            "(--modules_to_save)")
    from hf_lorax import LoRAConfig, resolve

    # the library's own checks (a name matching nothing, slices that do not fit), before any weight is read
    resolve(LoRAConfig(task_type=task_type, num_labels=num_labels, **targets.config_fields()), model)
    return targets, model.config.model_type


def model_skeleton(model_name_or_path: str, task_type: str, num_labels: int | None):
    """The model built from its config on the meta device: its module tree and config, no weights read.

    The class is called directly: ``from_config`` would partition the skeleton under DeepSpeed ZeRO-3."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path, **({"num_labels": num_labels} if num_labels else {}))
    mapping = {"CAUSAL_LM": transformers.MODEL_FOR_CAUSAL_LM_MAPPING,
               "SEQ_CLS": transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}[task_type]
    if type(config) not in mapping:
        raise ValueError(f"{model_name_or_path} (model_type {config.model_type!r}) has no {task_type} class in "
                         f"transformers {transformers.__version__}.")
    with torch.device("meta"):
        return mapping[type(config)](config)


# -- the paper's choice, found in a model ------------------------------------------------------------------


def linear_layers(model) -> dict[str, Any]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def find_targets(model, label: str | None = None) -> Targets:
    """The LoRA paper's targets in ``model`` (a transformers model; see the module docstring for the order)."""
    from hf_lorax.slices import KNOWN_FUSED_LAYOUTS

    layers = linear_layers(model)
    suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
    pairs = query_value_pairs(layers)
    if pairs:
        names = sorted({name.rsplit(".", 1)[-1] for pair in pairs for name in pair})
        paired = {name for pair in pairs for name in pair}
        if {n for n in layers if n.rsplit(".", 1)[-1] in names} != paired:  # a suffix also names other layers
            names = sorted(paired)
        return Targets(tuple(names), None, None, f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}: "
                                                 f"{PAPER_CHOICE}")
    config = model.config
    own = OWN_LAYOUTS.get(config.model_type)
    if own and own[0] in suffixes:
        suffix, layout, groups = own
        fused = {suffix: {"layout": list(layout), "adapt": ["q", "v"], "groups": groups(config)}}
    else:
        known = [s for s in suffixes if {"q", "v"} <= set(KNOWN_FUSED_LAYOUTS.get(s, ()))]
        fused = {s: ["q", "v"] for s in known}
    if fused:
        return Targets(tuple(fused), fused, None, f"{describe_targets(tuple(fused), fused)} of the fused projection: "
                                                  f"{PAPER_CHOICE}")
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    default = [s for s in PEFT_DEFAULTS.get(config.model_type) or () if s in suffixes]
    if default:
        return Targets(tuple(default), None, None,
                       f"{', '.join(default)}: peft's default targets for model_type {config.model_type!r}, which has "
                       "no attention query and value layers")
    raise ValueError(
        f"found no attention query/value layers in {label or config.model_type} (model_type {config.model_type!r}); "
        f"its linear layers (by suffix): {suffixes[:16]}. Choose with --target_modules NAME [NAME ...] (a fused q/k/v "
        "projection also needs --fused_slices '{\"NAME\": {\"layout\": [\"q\", \"k\", \"v\"], \"adapt\": [\"q\", \"v\"]}}')."
    )


def query_value_pairs(layers: dict[str, Any]) -> list[tuple[str, str]]:
    """(query, value) layer names that are children of one module, e.g. ``...self_attn.q_proj`` / ``...v_proj``."""
    children = {(name.rpartition(".")[0], name.rpartition(".")[2].lower()): name for name in layers}
    pairs = []
    for name in layers:
        parent, _, suffix = name.rpartition(".")
        match = QUERY.fullmatch(suffix)
        value = match and children.get((parent, VALUE_OF[match["q"].lower()] + (match["tail"] or "").lower()))
        if value:
            pairs.append((name, value))
    return pairs


# -- which model ran ---------------------------------------------------------------------------------------


def same_model(model_name_or_path: str, paper_model: str | None) -> bool:
    """Whether the run's model is the paper's (``roberta-base``, ``FacebookAI/roberta-base``, ``dir/roberta-base``)."""
    name = model_name_or_path.rstrip("/\\")
    return bool(paper_model) and (name == paper_model or name.replace("\\", "/").endswith("/" + paper_model))


def model_label(model_name_or_path: str) -> str:
    """A model as a table names it: a Hub id as is, a local folder by its name."""
    name = model_name_or_path.rstrip("/\\")
    return os.path.basename(name) if os.path.isabs(name) or name.startswith(".") else name
