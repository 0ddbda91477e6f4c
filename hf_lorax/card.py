"""The adapter model card: one pipeline, used by ``save_pretrained`` (via :func:`hf_lorax.get_model`'s model),
``Trainer.create_model_card``, the task scripts and :func:`hf_lorax.push_adapter`.

The card is always rendered from a saved folder (after the adapter files are written), from
``model_cards/adapter_card.md`` with ``ModelCard.from_template``: YAML metadata, a ``model-index`` built
from ``results.json``, the per-module table.

``results.json`` (written by the task scripts; every key optional)::

    {"task": "sst2", "task_type": "text-classification",
     "dataset": {"name": "GLUE SST-2", "type": "nyu-mll/glue", "config": "sst2", "split": "validation"},
     "metrics": {"accuracy": 0.951},
     "reference": {"source": "LoRA paper (Hu et al. 2021), Table 2", "metrics": {"accuracy": 0.951}},
     "hyperparameters": {"learning_rate": 0.0005, "epochs": 60}}
"""

from __future__ import annotations

import os
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._version import __version__
from .adapter_files import read_adapter_folder, read_json, write_text
from .base_init import PEFT_REBUILT_INITS, base_change_reason
from .config import UNQUANTIZED_HEADS
from .describe import AdaptedModule, AdapterReport, markdown_table
from .serving import serving_summary
from .task_types import AUTO_CLASSES, METHOD_NAMES, PIPELINE_TAGS

CARD_NAME = "README.md"


def write_model_card(folder: str, repo_id: str | None = None, results: dict | str | None = None,
                     license: str | None = None) -> str:
    """Render the card of the adapter saved in ``folder`` (everything is read from the folder) and write it as
    ``folder/README.md``. ``repo_id`` defaults to the folder's name; ``results`` (a dict or the path of a
    ``results.json``) to the folder's ``results.json``."""
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    saved = read_adapter_folder(folder)
    config, sidecar = saved.config, saved.sidecar
    if results is None and os.path.isfile(os.path.join(folder, "results.json")):
        results = os.path.join(folder, "results.json")
    results = (read_json(results) if isinstance(results, str) else results) or {}
    task_type, dataset = config.get("task_type"), results.get("dataset") or {}
    # the per-module table, as describe() shows a live model (a saved folder does not record the layer types)
    rows = [AdaptedModule(module=m.name, layer="", method=m.method, r=m.r, alpha=m.alpha, scaling=m.scaling,
                          params=m.params, slices=",".join(m.slices.adapt) if m.slices else "") for m in saved.modules]
    base_model = config.get("base_model_name_or_path") or "unknown"
    pipeline_tag, local_base = PIPELINE_TAGS.get(task_type), os.path.isabs(base_model)
    targets = config.get("target_modules")
    targets = f"`{targets}`" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in sorted(targets or []))
    card_data = ModelCardData(
        base_model=None if local_base else base_model, library_name="peft", license=license or results.get("license"),
        tags=sorted({saved.method, "hf_lorax", "peft", "lora", *([task_type.lower()] if task_type else [])}),
        datasets=[dataset["type"]] if dataset.get("type") else None, pipeline_tag=pipeline_tag,
        model_name=repo_id.split("/")[-1], eval_results=_eval_results(results, pipeline_tag) or None,
    )
    context = dict(
        title=repo_id.split("/")[-1], repo_id=repo_id, base_model=base_model,
        base_model_url=base_model if local_base else f"https://huggingface.co/{base_model}",
        method_name=METHOD_NAMES.get(saved.method, saved.method), task_description=dataset.get("name"),
        has_head=bool(config.get("modules_to_save")), adapter_params_str=f"{saved.adapter_params:,}",
        adapter_size_str=_human_bytes(os.path.getsize(saved.weights_path)), hf_lorax_version=__version__,
        serving_table=markdown_table(("engine", "as saved", "how to serve"), serving_summary(saved, repo_id))
        + _base_note(saved), peft_version=config.get("peft_version", "?"),
        slices=", ".join(f"{m}: {'/'.join(v) if isinstance(v, list) else v}"
                         for m, v in (sidecar.get("fused_slices") or {}).items()),
        target_modules=targets, r=config.get("r"), alpha=config.get("lora_alpha"), rslora=config.get("use_rslora"),
        has_rank_map=bool(config.get("rank_pattern") or config.get("alpha_pattern")),
        dropout=config.get("lora_dropout"), quantization=sidecar.get("quantization"),
        n_modules=len(rows), module_table=AdapterReport(adapter="default", rows=rows).to_markdown(),
        results_table=_results_table(results), reference_source=(results.get("reference") or {}).get("source"),
        hyperparameters_table=_dict_table(results.get("hyperparameters"), ("hyperparameter", "value")),
        allocation_part=_allocation_part(results.get("rank_allocation")),
        has_plot=os.path.isfile(os.path.join(folder, "rank_utilization.png")),
        has_curve=os.path.isfile(os.path.join(folder, "training_curve.png")),
        auto_class=AUTO_CLASSES.get(task_type, "AutoModel"), load_kwargs=_load_kwargs(sidecar),
    )
    template = resources.files("hf_lorax.model_cards").joinpath("adapter_card.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(card_data, template_str=template, **context)
    return write_text(os.path.join(folder, CARD_NAME), str(card))


def _base_note(saved) -> str:
    """What the card says, below the serving table, about an initialisation that changed the base: how to serve it."""
    init = saved.base_changing_init
    if not init:
        return ""
    reason = base_change_reason(init, "a serving engine (vLLM, TGI, LoRAX)", bool(saved.config.get("use_dora")))
    if init.lower() in PEFT_REBUILT_INITS:
        reason += " peft runs the initialisation again when it loads the adapter, which rebuilds the changed base."
    return "\n\n**The base weights changed in training.** " + reason


def _load_kwargs(sidecar: dict) -> str:
    """Extra ``from_pretrained`` arguments of the usage snippet (the 4-bit base of a QLoRA adapter)."""
    num_labels = "".join(f", {key}={sidecar[key]}" for key in ("num_labels", "pad_token_id") if sidecar.get(key) is not None)
    if "quant_type" not in sidecar:
        return num_labels
    if sidecar.get("load_in_8bit"):
        q = f"BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={list(UNQUANTIZED_HEADS)})"
    else:
        q = (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={sidecar['quant_type']!r}, "
             f"bnb_4bit_use_double_quant={sidecar.get('double_quant', True)}, bnb_4bit_compute_dtype=torch."
             f"{sidecar.get('compute_dtype', 'bfloat16')}, llm_int8_skip_modules={list(UNQUANTIZED_HEADS)})")
    return f"{num_labels},\n    quantization_config={q}"


def _eval_results(results: dict, pipeline_tag: str | None) -> list[EvalResult]:
    dataset = results.get("dataset") or {}
    return [EvalResult(task_type=results.get("task_type") or pipeline_tag or "other",
                       dataset_type=dataset.get("type", "custom"), dataset_name=dataset.get("name", dataset.get("type",
                       "custom")), dataset_config=dataset.get("config"), dataset_split=dataset.get("split"),
                       metric_type=name, metric_value=float(value))
            for name, value in (results.get("metrics") or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def _results_table(results: dict) -> str:
    reference = (results.get("reference") or {}).get("metrics") or {}
    rows = [(name, f"{value:.4f}", "-" if reference.get(name) is None else reference[name],
             f"{value - reference[name]:+.4f}" if isinstance(reference.get(name), (int, float)) else "-")
            for name, value in (results.get("metrics") or {}).items()]
    return markdown_table(("metric", "this adapter", "reference", "difference"), rows) if rows else ""


def _allocation_part(allocation: dict | None) -> str:
    """``results.json``'s ``rank_allocation`` (``--rank_map auto``): how the rank map was chosen."""
    if not allocation:
        return ""
    ranks = sorted((allocation.get("rank_map") or {}).values())
    worth = "its share of the probe update's energy"
    worth = "its loss sensitivity" if allocation.get("signal") == "sensitivity" else worth
    return (f"The rank map was allocated from a probe run (uniform r={allocation.get('probe_r')}, "
            f"{allocation.get('probe_steps')} steps, then discarded): each module's k-th direction is worth {worth} "
            "per parameter, and the best directions were kept within the budget.\n\n"
            + _dict_table({"budget (LoRA parameters)": f"{allocation.get('budget'):,}",
                           "allocated (LoRA parameters)": f"{allocation.get('params'):,}",
                           "ranks (min / max)": f"{ranks[0]} / {ranks[-1]}" if ranks else "-",
                           "alpha policy": allocation.get("alpha_policy"),
                           "per-module lora_alpha": "alpha_map" if allocation.get("alpha_map") else "lora_alpha kept"},
                          ("", "")))


def _dict_table(values: dict | None, header: tuple[str, str]) -> str:
    return markdown_table(header, values.items()) if values else ""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024

