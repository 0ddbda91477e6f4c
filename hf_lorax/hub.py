"""Adapter-only publishing to the Hugging Face Hub, with a model card rendered from ``model_cards/``.

``push_adapter`` uploads exactly the files of an adapter (an allowlist), refuses folders that hold base
model weights, renders ``README.md`` from ``model_cards/adapter_card.md`` with ``ModelCard.from_template``
(YAML metadata and a ``model-index`` built from ``results.json``), and needs the network only for the final
``create_repo`` / ``create_commit`` calls. Tokens come from ``huggingface_hub``'s usual login / ``HF_TOKEN``
and are never logged or written.

``results.json`` (written by the task scripts; every key optional)::

    {"task": "sst2", "task_type": "text-classification",
     "dataset": {"name": "GLUE SST-2", "type": "nyu-mll/glue", "config": "sst2", "split": "validation"},
     "metrics": {"accuracy": 0.951},
     "reference": {"source": "LoRA paper (Hu et al. 2021), Table 2", "metrics": {"accuracy": 0.951}},
     "hyperparameters": {"learning_rate": 0.0005, "epochs": 60}}
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .describe import AdaptedModule, AdapterReport

logger = logging.getLogger(__name__)

UPLOADABLE = (
    "adapter_config.json", "adapter_model.safetensors", "hf_lorax.json", "README.md", "results.json",
    "rank_utilization.png", "rank_utilization.json", "suggested_rank_map.json",
)
BASE_WEIGHT_PATTERN = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$"
)
MAX_WEIGHTS_BYTES = 4 * 1024**3  # an adapter of 4 GiB would be a mistake long before a LoRA gets there
MAX_SIDE_FILE_BYTES = 32 * 1024**2
PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation", "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering", "SEQ_2_SEQ_LM": "text2text-generation",
    "FEATURE_EXTRACTION": "feature-extraction",
}
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "qdora": "QDoRA"}


@dataclass
class UploadPlan:
    """What :func:`push_adapter` uploads: ``files`` is ``[(path_in_repo, local_path, bytes)]``."""

    repo_id: str
    folder: str
    files: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    commit_url: str | None = None

    def describe(self) -> str:
        lines = [f"{'file':<28} {'bytes':>14}"]
        lines += [f"{name:<28} {size:>14,}" for name, _, size in self.files]
        lines.append(f"{len(self.files)} files, {sum(s for _, _, s in self.files):,} bytes -> {self.repo_id}")
        if self.skipped:
            lines.append(f"not uploaded (not adapter files): {', '.join(self.skipped)}")
        return "\n".join(lines)


def plan_upload(folder: str, repo_id: str, results: str | None = None) -> UploadPlan:
    """Validate an adapter folder and list the files to upload; raises on anything that is not an adapter."""
    from .checks import check_adapter_dir

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Adapter folder {folder!r} does not exist.")
    names = sorted(os.listdir(folder))
    base_weights = [n for n in names if BASE_WEIGHT_PATTERN.match(n)]
    if base_weights:
        raise ValueError(
            f"{folder!r} holds base-model weights ({', '.join(base_weights)}); push_adapter uploads adapters only. "
            "Save the adapter with model.save_pretrained(...) into its own folder."
        )
    if "adapter_model.safetensors" not in names:
        raise FileNotFoundError(
            f"{folder!r} has no adapter_model.safetensors (pickle .bin adapters are not uploaded); "
            "save with safe_serialization=True."
        )
    check_adapter_dir(folder)
    _check_adapter_tensors(folder)
    plan = UploadPlan(repo_id=repo_id, folder=folder)
    for name in names:
        path = os.path.join(folder, name)
        if name not in UPLOADABLE or not os.path.isfile(path):
            plan.skipped.append(name)
            continue
        if name == "results.json" and results:
            continue  # the explicit results file wins
        plan.files.append((name, path, _checked_size(path, name)))
    if results:
        if not os.path.isfile(results):
            raise FileNotFoundError(f"results file {results!r} does not exist.")
        plan.files.append(("results.json", results, _checked_size(results, "results.json")))
    return plan


def _checked_size(path: str, name: str) -> int:
    size = os.path.getsize(path)
    bound = MAX_WEIGHTS_BYTES if name.endswith(".safetensors") else MAX_SIDE_FILE_BYTES
    if size > bound:
        raise ValueError(f"{path} is {size:,} bytes, over the {bound:,}-byte bound for {name}; it is not an adapter file.")
    return size


def _check_adapter_tensors(folder: str) -> None:
    from safetensors import safe_open

    config = _read_json(os.path.join(folder, "adapter_config.json"))
    heads = config.get("modules_to_save") or []
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        foreign = [k for k in f.keys() if "lora_" not in k and not any(f".{h}." in f".{k}" for h in heads)]
    if foreign:
        raise ValueError(
            f"adapter_model.safetensors in {folder!r} holds non-adapter tensors such as {foreign[:3]}; "
            "refusing to upload what may be base-model weights."
        )


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- model card -------------------------------------------------------------------------------------------


def rows_from_folder(folder: str) -> tuple[list[AdaptedModule], int]:
    """Per-module rows and the adapter's trainable parameter count, read from a saved adapter."""
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    from .slices import parse_fused_slices, spec_for

    config = _read_json(os.path.join(folder, "adapter_config.json"))
    sidecar_path = os.path.join(folder, "hf_lorax.json")
    sidecar = _read_json(sidecar_path) if os.path.isfile(sidecar_path) else {}
    sliced, specs = sidecar.get("sliced_modules") or {}, parse_fused_slices(sidecar.get("fused_slices"))
    rows, total = [], 0
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for key, a_shape in sorted(shapes.items()):
        if not key.endswith(".lora_A.weight"):
            total += _numel(a_shape) if "lora_" not in key or "magnitude" in key else 0
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b_shape = shapes[key.replace(".lora_A.", ".lora_B.")]
        alpha = config["alpha_pattern"].get(get_pattern_key(list(config["alpha_pattern"]), module), config["lora_alpha"])
        r, n, slices = a_shape[0], sliced.get(module, 1), ""
        b_params = _numel(b_shape)
        if module in sliced and spec_for(module, specs):
            spec = spec_for(module, specs)
            b_params = n * (b_shape[0] // len(spec.layout)) * (r // n)
            slices = ",".join(spec.adapt)
        scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
        magnitude = shapes.get(key.replace(".lora_A.weight", ".lora_magnitude_vector"))
        params = _numel(a_shape) + b_params + (_numel(magnitude) if magnitude else 0)
        rows.append(AdaptedModule(module=module, layer="", method="dora" if magnitude else "lora", r=r // n,
                                  alpha=alpha / (n**0.5 if config.get("use_rslora") else n), scaling=scaling,
                                  params=params, slices=slices))
        total += _numel(a_shape) + b_params
    return rows, total


def _numel(shape) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def render_model_card(
    folder: str,
    repo_id: str,
    results: dict | str | None = None,
    license: str | None = None,
    rows: list[AdaptedModule] | None = None,
    adapter_params: int | None = None,
    config: dict | None = None,
    sidecar: dict | None = None,
) -> ModelCard:
    """Render the adapter's model card.

    By default everything is read from the saved adapter in ``folder``; the model-card hook passes
    ``config`` / ``sidecar`` / ``rows`` from the live model instead, since peft writes the card first.
    """
    from . import __version__

    if config is None:
        config = _read_json(os.path.join(folder, "adapter_config.json"))
    if sidecar is None:
        sidecar_path = os.path.join(folder, "hf_lorax.json")
        sidecar = _read_json(sidecar_path) if os.path.isfile(sidecar_path) else {}
    if isinstance(results, str):
        results = _read_json(results)
    if results is None and os.path.isfile(os.path.join(folder, "results.json")):
        results = _read_json(os.path.join(folder, "results.json"))
    results = results or {}
    if rows is None:
        rows, adapter_params = rows_from_folder(folder)
    method = sidecar.get("method") or ("dora" if config.get("use_dora") else "lora")
    task_type = config.get("task_type")
    base_model = config.get("base_model_name_or_path") or "unknown"
    dataset = results.get("dataset") or {}
    pipeline_tag = PIPELINE_TAGS.get(task_type)
    card_data = ModelCardData(
        base_model=base_model if not os.path.isabs(base_model) else None,
        library_name="peft",
        license=license or results.get("license"),
        tags=sorted({method, "hf_lorax", "peft", "lora", *( [task_type.lower()] if task_type else [])}),
        datasets=[dataset["type"]] if dataset.get("type") else None,
        pipeline_tag=pipeline_tag,
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(results, pipeline_tag) or None,
    )
    weights = os.path.join(folder, "adapter_model.safetensors")
    context = dict(
        title=repo_id.split("/")[-1], repo_id=repo_id, base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if not os.path.isabs(base_model) else base_model,
        method_name=METHOD_NAMES.get(method, method), task_description=dataset.get("name"),
        has_head=bool(config.get("modules_to_save")), adapter_params_str=f"{adapter_params:,}",
        adapter_size_str=_human_bytes(os.path.getsize(weights)) if os.path.isfile(weights) else "not saved yet",
        hf_lorax_version=__version__, peft_version=config.get("peft_version", "?"),
        slices=", ".join(f"{m}: {'/'.join(v) if isinstance(v, list) else v}" for m, v in (sidecar.get("fused_slices") or {}).items()),
        target_modules=", ".join(f"`{t}`" for t in sorted(config.get("target_modules") or [])) if not isinstance(config.get("target_modules"), str) else f"`{config['target_modules']}`",
        r=config.get("r"), alpha=config.get("lora_alpha"), rslora=config.get("use_rslora"),
        has_rank_map=bool(config.get("rank_pattern") or config.get("alpha_pattern")),
        dropout=config.get("lora_dropout"), quantization=sidecar.get("quantization"),
        n_modules=len(rows), module_table=AdapterReport(adapter="default", rows=rows).to_markdown(),
        results_table=_results_table(results), reference_source=(results.get("reference") or {}).get("source"),
        hyperparameters_table=_dict_table(results.get("hyperparameters"), ("hyperparameter", "value")),
        has_plot=os.path.isfile(os.path.join(folder, "rank_utilization.png")),
        auto_class=AUTO_CLASSES.get(task_type, "AutoModel"), num_labels=sidecar.get("num_labels"),
        load_kwargs=_load_kwargs(sidecar),
    )
    template = resources.files("hf_lorax.model_cards").joinpath("adapter_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, **context)


def _load_kwargs(sidecar: dict) -> str:
    """Extra ``from_pretrained`` arguments of the usage snippet (the 4-bit base of a QLoRA adapter)."""
    num_labels = f", num_labels={sidecar['num_labels']}" if sidecar.get("num_labels") else ""
    if "quant_type" not in sidecar:
        return num_labels
    from .quantization import UNQUANTIZED_HEADS

    if sidecar.get("load_in_8bit"):
        q = f"BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={list(UNQUANTIZED_HEADS)})"
    else:
        q = (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={sidecar['quant_type']!r}, "
             f"bnb_4bit_use_double_quant={sidecar.get('double_quant', True)}, "
             f"bnb_4bit_compute_dtype=torch.{sidecar.get('compute_dtype', 'bfloat16')}, "
             f"llm_int8_skip_modules={list(UNQUANTIZED_HEADS)})")
    return f"{num_labels},\n    quantization_config={q}"


def _eval_results(results: dict, pipeline_tag: str | None) -> list[EvalResult]:
    dataset = results.get("dataset") or {}
    return [
        EvalResult(
            task_type=results.get("task_type") or pipeline_tag or "other", dataset_type=dataset.get("type", "custom"),
            dataset_name=dataset.get("name", dataset.get("type", "custom")), dataset_config=dataset.get("config"),
            dataset_split=dataset.get("split"), metric_type=name, metric_value=float(value),
        )
        for name, value in (results.get("metrics") or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _results_table(results: dict) -> str:
    metrics = results.get("metrics") or {}
    if not metrics:
        return ""
    reference = (results.get("reference") or {}).get("metrics") or {}
    lines = ["| metric | this adapter | reference | difference |", "|---|---|---|---|"]
    for name, value in metrics.items():
        ref = reference.get(name)
        diff = f"{value - ref:+.4f}" if isinstance(ref, (int, float)) else "-"
        lines.append(f"| {name} | {value:.4f} | {ref if ref is not None else '-'} | {diff} |")
    return "\n".join(lines)


def _dict_table(values: dict | None, header: tuple[str, str]) -> str:
    if not values:
        return ""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def write_model_card(card: ModelCard, folder: str) -> str:
    path = os.path.join(folder, "README.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(card))
    os.replace(tmp, path)
    return path


# -- push -------------------------------------------------------------------------------------------------


def push_adapter(
    folder: str,
    repo_id: str,
    results: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    dry_run: bool = False,
    api: Any = None,
) -> UploadPlan:
    """Upload an adapter folder (adapter files only) with a rendered model card.

    Example::

        push_adapter("runs/sst2/adapter", repo_id="me/roberta-base-lora-sst2",
                     results="runs/sst2/results.json", private=True)

    ``dry_run=True`` validates, writes ``README.md`` into the folder and returns the plan without any network
    call. ``token`` defaults to the usual ``huggingface_hub`` login / ``HF_TOKEN``.
    """
    plan = plan_upload(folder, repo_id, results)
    card = render_model_card(folder, repo_id, results=results, license=license)
    write_model_card(card, folder)
    if "README.md" not in [name for name, _, _ in plan.files]:
        plan.files.append(("README.md", os.path.join(folder, "README.md"), 0))
    plan.files = [(n, p, os.path.getsize(p)) for n, p, _ in plan.files]
    if dry_run:
        return plan
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path, _ in plan.files]
    info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload {len(operations)} adapter files with hf_lorax")
    plan.commit_url = getattr(info, "commit_url", None) or str(repo_url)
    logger.info("Uploaded %d files to %s", len(plan.files), repo_id)
    return plan


def card_for_model(model, output_dir: str, repo_id: str | None = None) -> ModelCard:
    """The model card of a live hf_lorax ``PeftModel`` about to be saved into ``output_dir``."""
    from .describe import describe

    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    peft_config = model.peft_config[adapter]
    config = peft_config.to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], (set, list)) else config["target_modules"]
    if not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = getattr(model.get_base_model(), "name_or_path", None)
    report = describe(model, adapter)
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    return render_model_card(output_dir, name, rows=report.rows, adapter_params=report.adapter_params,
                             config=config, sidecar=peft_config.sidecar())
