"""Where a saved adapter can be served, and what each serving engine would refuse or silently change.

Each engine's LoRA loader reads only some ``adapter_config.json`` keys and applies its own scaling. The rules
below are written from the engines' loading code (vLLM ``vllm/lora/peft_helper.py`` and
``LoRALayerWeights.from_config``; LoRAX's adapter loader, whose punica kernels TGI's multi-LoRA support
shares; peft's ``LoraModel``):

===========  ==========================================  ==================================================
engine       reads                                       scaling / limits / refusals
===========  ==========================================  ==================================================
vllm         r, lora_alpha, use_rslora, target_modules,  one ``lora_alpha/r`` (``/√r`` with rsLoRA) for
             bias, modules_to_save, use_dora             every module; refuses a config without ``r``,
                                                         ``lora_alpha`` or ``target_modules`` (``PEFTHelper``
                                                         has no defaults for them), DoRA, ``modules_to_save``,
                                                         biases, ranks above ``max_lora_rank`` (≤ 512);
                                                         GPT-2 has no LoRA support
lorax, tgi   r, lora_alpha, use_rslora, target_modules,  one scaling for every module; A/B stacked across
             fan_in_fan_out (through peft's LoraConfig,  layers (needs one rank); fast kernels for r ≤ 128;
             so a missing key has peft's default)        DoRA, heads and biases are not read (dropped)
peft         every peft key                              per-module ``rank_pattern`` / ``alpha_pattern``,
                                                         DoRA, heads: loads hf_lorax adapters as they are
===========  ==========================================  ==================================================

:func:`check_serving` lists per module what an engine would do with an adapter as saved;
:func:`hf_lorax.export.export_adapter` writes the form each engine computes exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .adapter_files import CONFIG_FILE, AdapterFolder, read_adapter_folder, read_json
from .base_init import CONVERTIBLE_INITS, PEFT_REBUILT_INITS, base_change_reason, init_family
from .slices import lora_scaling

# vLLM's accepted ``--max-lora-rank`` values (``vllm/config``: MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class EngineSpec:
    """What one engine's LoRA loader does with a peft adapter folder."""

    name: str
    label: str
    # DoRA magnitudes, task heads (modules_to_save) and trained biases (every engine treats the three alike):
    # "supported", "refused" or "ignored" (silently dropped)
    extras: str
    reads_patterns: bool = False  # rank_pattern / alpha_pattern honoured (else one scaling for all modules)
    uniform_rank: bool = False  # needs every module at one rank
    max_rank: int | None = None
    fast_rank: int | None = None  # above this, slower kernels
    rank_values: tuple[int, ...] | None = None  # accepted max-rank settings
    unsupported_model_types: frozenset = field(default_factory=frozenset)
    serve_hint: str = ""
    required_keys: tuple[str, ...] = ()  # adapter_config.json keys the loader has no default for


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec("vllm", "vLLM", extras="refused", max_rank=max(VLLM_MAX_LORA_RANKS),
                       rank_values=VLLM_MAX_LORA_RANKS, unsupported_model_types=frozenset({"gpt2"}),
                       serve_hint="vllm serve BASE --enable-lora --max-lora-rank {rank} --lora-modules NAME=DIR",
                       required_keys=("r", "lora_alpha", "target_modules")),
    "lorax": EngineSpec("lorax", "LoRAX", extras="ignored", uniform_rank=True, fast_rank=128,
                        serve_hint="lorax-launcher --model-id BASE, then request with adapter_id=DIR "
                                   "(adapter_source local)"),
    "tgi": EngineSpec("tgi", "TGI", extras="ignored", uniform_rank=True, fast_rank=128,
                      serve_hint="text-generation-launcher --model-id BASE --lora-adapters NAME=DIR"),
    "peft": EngineSpec("peft", "peft", extras="supported", reads_patterns=True,
                       serve_hint='PeftModel.from_pretrained(base_model, "DIR")'),
}


# What a finding is about: check_serving writes these, the card and export read them (never the message text).
MODEL_TYPE = "model_type"  # the engine has no LoRA support for the base's architecture
MISSING_KEY = "missing_key"  # adapter_config.json lacks a key the engine requires (peft would default it)
BASE_CHANGED = "base_changed"  # the initialisation changed the base weights (PiSSA, OLoRA, ...)
BASE_REBUILT = "base_rebuilt"  # ... and the engine (peft) rebuilds that change when it loads the adapter
SCALING = "scaling"  # a module's own scaling (rank/alpha maps) is not read
DORA = "dora"
HEADS = "heads"  # modules_to_save
BIASES = "biases"
RANK_LIMIT = "rank_limit"  # a module's rank is above the engine's limit
RANKS_DIFFER = "ranks_differ"  # the engine stacks A/B at one rank
MAX_LORA_RANK = "max_lora_rank"  # a launch flag to set
SLOW_KERNELS = "slow_kernels"


@dataclass(frozen=True)
class Finding:
    """One thing an engine would do differently from hf_lorax. ``kind``: "refused", "wrong" or "note"; ``code``:
    what it is about (:data:`MODEL_TYPE`, :data:`DORA`, ...), for code that acts on it."""

    kind: str
    module: str  # a module name, or "" for the whole adapter
    message: str
    code: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] " + (f"{self.module}: " if self.module else "") + self.message


@dataclass
class ServingReport:
    """What :func:`check_serving` found for one engine."""

    engine: str
    folder: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def refused(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "refused"]

    @property
    def wrong(self) -> list[Finding]:
        """What the engine would load without error but compute differently (served silently wrong)."""
        return [f for f in self.findings if f.kind == "wrong"]

    @property
    def servable_as_is(self) -> bool:
        return not self.refused and not self.wrong

    def first(self, code: str, kinds: tuple[str, ...] = ("refused", "wrong")) -> Finding | None:
        """The first finding about ``code`` of one of ``kinds`` (None: there is none)."""
        return next((f for f in self.findings if f.code == code and f.kind in kinds), None)

    def __str__(self) -> str:
        status = f"{len(self.refused)} refused, {len(self.wrong)} served wrong"
        status = "loads as is" if self.servable_as_is else status
        return "\n".join([f"{ENGINES[self.engine].label}: {status}", *(f"  {f}" for f in self.findings)])


def engine_spec(engine: str) -> EngineSpec:
    if engine not in ENGINES:
        raise ValueError(f"Unknown serving engine {engine!r}; choose one of {sorted(ENGINES)}.")
    return ENGINES[engine]


def check_serving(adapter_dir: str | AdapterFolder, engine: str) -> ServingReport:
    """List, per module, what ``engine`` would refuse or silently change in the adapter saved in ``adapter_dir``."""
    spec = engine_spec(engine)
    folder = adapter_dir if isinstance(adapter_dir, AdapterFolder) else read_adapter_folder(adapter_dir)
    report = ServingReport(engine=engine, folder=folder.path)
    config, add = folder.config, report.findings.append
    model_type = base_model_type(folder)
    if model_type in spec.unsupported_model_types:
        add(Finding("refused", "", f"{spec.label} has no LoRA support for {model_type} models; export the merged model "
                    "with python -m hf_lorax.export --merge.", MODEL_TYPE))
    # the parsed config has peft's defaults filled in (what peft and hf_lorax load); the engine reads the file
    written = read_json(os.path.join(folder.path, CONFIG_FILE))
    for key in (k for k in spec.required_keys if k not in written):
        add(Finding("refused", "", f"{CONFIG_FILE} has no {key!r}, which {spec.label} requires; add \"{key}\": "
                    f"{json.dumps(loaded_values(folder)[key])} (the value peft and hf_lorax load it with), or export "
                    f"with python -m hf_lorax.export SRC DST --engine {spec.name}, which writes it.", MISSING_KEY))
    init = folder.base_changing_init
    if init and spec.name == "peft" and init.lower() in PEFT_REBUILT_INITS:
        add(Finding("note", "", f"init_lora_weights={init!r} changed the base in training; peft runs that "
                    "initialisation again on the original base when it loads the adapter, which rebuilds it.",
                    BASE_REBUILT))
    elif init:
        add(Finding("wrong", "", base_change_reason(init, spec.label, bool(config.get("use_dora"))), BASE_CHANGED))
    if not spec.reads_patterns:
        uniform = lora_scaling(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
        for module in folder.modules:
            if abs(module.scaling - uniform) > 1e-12 * max(1.0, abs(uniform)):
                add(Finding("wrong", module.name, f"scaling {module.scaling:g} would be served as {uniform:g} "
                            f"({spec.label} ignores rank_pattern/alpha_pattern and uses lora_alpha/r for every "
                            "module).", SCALING))
    biases = config.get("bias") not in (None, "none") or config.get("lora_bias")
    kind = {"refused": "refused", "ignored": "wrong"}.get(spec.extras)  # "supported": nothing to report
    for code, modules, what in (
        (DORA, [m.name for m in folder.modules if m.method == "dora"], "DoRA magnitudes"),
        (HEADS, [",".join(folder.heads)] if folder.heads else [], "task heads (modules_to_save)"),
        (BIASES, [""] if biases else [],
         f"trained biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')})"),
    ):
        for module in modules if kind else ():
            add(Finding(kind, module, f"{what} are {'refused' if kind == 'refused' else 'not loaded'} by {spec.label}; "
                        "export the merged model with python -m hf_lorax.export --merge.", code))
    for module in folder.modules:
        if spec.max_rank is not None and module.module_r > spec.max_rank:
            add(Finding("refused", module.name, f"rank {module.module_r} is above {spec.label}'s limit "
                        f"{spec.max_rank}.", RANK_LIMIT))
    ranks = sorted({m.module_r for m in folder.modules})
    if spec.uniform_rank and len(ranks) > 1:
        add(Finding("wrong", "", f"ranks {ranks} differ across modules; {spec.label} stacks A/B across layers at one "
                    "rank (export pads them with zeros).", RANKS_DIFFER))
    if spec.rank_values and ranks and max(ranks) != config.get("r") and max(ranks) <= spec.max_rank:
        add(Finding("note", "", f"serve with --max-lora-rank {next_rank_value(max(ranks), spec)} or more "
                    f"(the largest module rank is {max(ranks)}).", MAX_LORA_RANK))
    if spec.fast_rank and ranks and max(ranks) > spec.fast_rank:
        add(Finding("note", "", f"rank {max(ranks)} is above {spec.fast_rank}: {spec.label} falls back to slower "
                    "kernels.", SLOW_KERNELS))
    return report


def loaded_values(folder: AdapterFolder) -> dict:
    """``r``, ``lora_alpha`` and ``target_modules`` as peft loads the adapter: a key the file leaves out has peft's
    default; ``target_modules``, which peft would infer from the architecture, is the adapted modules' names."""
    targets = folder.config.get("target_modules") or sorted({m.name.rsplit(".", 1)[-1] for m in folder.modules})
    return {"r": folder.config["r"], "lora_alpha": folder.config["lora_alpha"], "target_modules": targets}


def next_rank_value(rank: int, spec: EngineSpec) -> int:
    """The smallest rank setting ``spec`` accepts that holds ``rank`` (``rank`` itself without a list). Callers
    check ``rank`` against ``spec.max_rank`` first, which is the largest setting."""
    return min((v for v in spec.rank_values or () if v >= rank), default=rank)


def base_model_type(folder: AdapterFolder) -> str | None:
    """The ``model_type`` of the adapter's base: its local ``config.json`` if there is one, else a name guess."""
    base = folder.config.get("base_model_name_or_path") or ""
    local = os.path.join(base, "config.json")
    if base and os.path.isfile(local):
        return read_json(local).get("model_type")
    return "gpt2" if base.rsplit("/", 1)[-1].lower().startswith(("gpt2", "distilgpt2")) else None


def serving_summary(folder: AdapterFolder, name: str = "ADAPTER",
                    engines=("vllm", "tgi", "lorax", "peft")) -> list[tuple[str, str, str]]:
    """Rows of the model card's "Serving" table: engine, status, and the command (in backticks) that makes it
    servable (``name``: how the commands refer to the adapter, e.g. its Hub repo id)."""
    rows = []
    for engine in engines:
        spec, report = ENGINES[engine], check_serving(folder, engine)
        base_changed = report.first(BASE_CHANGED)
        export = f"python -m hf_lorax.export ADAPTER_DIR OUT --engine {engine}"
        if report.servable_as_is:  # so no module is above the engine's max_rank
            rank = next_rank_value(max((m.module_r for m in folder.modules), default=1), spec)
            status, how = "loads as is", spec.serve_hint.format(rank=rank).replace("DIR", name)
        elif base_changed and (init_family(folder.base_changing_init) not in CONVERTIBLE_INITS
                               or folder.config.get("use_dora")):
            status, how = "cannot be served exactly", base_changed.message
        elif base_changed:
            status, how = "needs peft's conversion", "model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR)"
        else:
            # what only a merged model serves
            merge = any(report.first(code) for code in (MODEL_TYPE, DORA, HEADS, BIASES, RANK_LIMIT))
            status, how = "needs `hf_lorax.export`", export + (" --merge" if merge else "")
        rows.append((spec.label, status, f"`{how}`"))
    return rows
