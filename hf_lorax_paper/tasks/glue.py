"""GLUE fine-tuning with the LoRA paper's presets: ``scripts/run_glue.py`` is a thin wrapper around :func:`run`.

Fast by construction: examples are tokenized without padding, batches are padded dynamically and grouped
by length (the official scripts pad everything to 512), and evaluation runs batched without gradients.
Every input is validated before anything is written to the output directory.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from .glue_data import GlueTask, compute_metrics, get_task, load_hub, load_local
from .glue_presets import PAPER_SOURCE, GluePreset, get_preset
from .runs import (
    RunArguments,
    adapter_config,
    check_method,
    finish_distributed,
    rank_map_argument,
    save_run,
    write_results,
)


@dataclass
class GlueArguments(RunArguments):
    """Arguments of ``scripts/run_glue.py``; every preset field can be overridden."""

    preset: str | None = field(default=None, metadata={"help": "e.g. roberta-base/sst2, roberta-large-dagger/rte"})
    task: str | None = field(default=None, metadata={"help": "GLUE task when no preset is given"})
    warmup_ratio: float | None = None
    official_scripts: bool = field(default=False, metadata={"help": "microsoft/LoRA script values (alpha 16, wd 0.1)"})
    data_dir: str | None = field(default=None, metadata={"help": "local GLUE folder (original TSV layout)"})
    init_adapter: str | None = field(default=None, metadata={"help": "adapter to start from (the MNLI one)"})
    output_dir: str = "runs/glue"
    seed: int = 0
    eval_batch_size: int = 64
    logging_steps: int = 50


def resolve(args: GlueArguments) -> tuple[GluePreset, GlueTask]:
    """The preset with the arguments' overrides applied, and its task; validates everything."""
    check_method(args.method)
    if args.preset:
        preset = get_preset(args.preset, args.official_scripts)
        if args.task and get_task(args.task).name != preset.task:
            raise ValueError(f"--task {args.task!r} contradicts --preset {args.preset!r}.")
    elif args.task:
        task = get_task(args.task)
        preset = replace(get_preset(f"roberta-base/{task.name}", args.official_scripts), setting="custom")
    else:
        raise ValueError("Pass --preset (e.g. roberta-base/sst2) or --task.")
    overrides = {k: getattr(args, k) for k in ("model_name_or_path", "r", "lora_alpha", "lora_dropout", "learning_rate",
                                               "batch_size", "epochs", "max_length", "weight_decay", "warmup_ratio")
                 if getattr(args, k) is not None}
    preset = replace(preset, **overrides)
    if not preset.model_name_or_path:
        raise ValueError(f"Preset {preset.name} has no model; pass --model_name_or_path.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. me/roberta-base-lora-sst2).")
    return preset, get_task(preset.task)


def load_splits(args: GlueArguments, task: GlueTask) -> dict:
    if args.data_dir:
        return load_local(args.data_dir, task, args.max_train_samples, args.max_eval_samples)
    return load_hub(task, args.max_train_samples, args.max_eval_samples)


def build_config(preset: GluePreset, task: GlueTask, args: GlueArguments):
    return adapter_config(
        args.method, base_model_name_or_path=preset.model_name_or_path, task_type="SEQ_CLS",
        num_labels=task.num_labels, r=preset.r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
        target_modules=list(preset.target_modules), rank_map=rank_map_argument(args.rank_map))


def load_init_adapter(model, path: str) -> list[str]:
    """Start from a saved adapter (the MNLI one): copy its LoRA weights, and its head where shapes fit.

    The classifier head is re-initialised when the label counts differ (MNLI's 3 labels vs MRPC's 2); the
    skipped keys are returned. LoRA weights that do not fit raise ``ValueError`` naming the key and both shapes.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from hf_lorax import read_adapter_folder

    read_adapter_folder(path)  # a broken folder fails here, naming the file
    saved, current = load_peft_weights(path), get_peft_model_state_dict(model)
    skipped = []
    for key, tensor in list(saved.items()):
        if key in current and tuple(current[key].shape) == tuple(tensor.shape):
            continue
        if "lora_" in key:
            if key not in current:
                raise ValueError(f"--init_adapter {path!r} adapts {key}, which this model's config does not target.")
            raise ValueError(f"--init_adapter {path!r}: {key} has shape {tuple(tensor.shape)}, this model's is "
                             f"{tuple(current[key].shape)} (different rank or base model?).")
        skipped.append(key)
        if key in current:
            saved[key] = current[key]  # keep this model's freshly initialised head weight
        else:
            del saved[key]
    set_peft_model_state_dict(model, saved)
    return skipped


def run(args: GlueArguments) -> dict | None:
    """Train and evaluate one GLUE task; writes the adapter, ``results.json`` and ``results.md``.

    Returns the results record; ``None`` on the non-main processes of a distributed run.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from hf_lorax import RankUtilizationCallback, get_model, push_adapter

    preset, task = resolve(args)
    splits = load_splits(args, task)  # validated before anything is written
    if args.init_adapter and not os.path.isdir(args.init_adapter):
        raise FileNotFoundError(f"--init_adapter {args.init_adapter!r} is not an adapter folder.")
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(preset.model_name_or_path)
    model = get_model(build_config(preset, task, args))
    skipped = load_init_adapter(model, args.init_adapter) if args.init_adapter else []

    def encode(batch):
        texts = [batch[k] for k in task.text_keys]
        return tokenizer(*texts, truncation=True, max_length=preset.max_length)

    data = {name: Dataset.from_dict(split).map(encode, batched=True, remove_columns=list(task.text_keys))
            for name, split in splits.items()}
    eval_sets = {s: data[s] for s in task.eval_splits}
    main_split = task.eval_splits[0]
    metric_key = f"eval_{main_split}_{task.main_metric}" if len(eval_sets) > 1 else f"eval_{task.main_metric}"

    os.makedirs(args.output_dir, exist_ok=True)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"), num_train_epochs=preset.epochs,
        learning_rate=preset.learning_rate, per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, weight_decay=preset.weight_decay,
        warmup_steps=preset.warmup_ratio, lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model=metric_key.removeprefix("eval_"),
        greater_is_better=True, train_sampling_strategy="group_by_length", logging_steps=args.logging_steps, report_to=[],
        seed=args.seed, use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm, dataloader_num_workers=0,
    )
    callbacks = []
    if args.rank_utilization:
        callbacks.append(RankUtilizationCallback(every_n_steps=args.rank_utilization_steps, output_dir=args.output_dir,
                                                 log_per_module=False))
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data["train"],
        eval_dataset=eval_sets if len(eval_sets) > 1 else eval_sets[main_split],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: compute_metrics(task, p.predictions, p.label_ids), callbacks=callbacks,
    )
    train_output = trainer.train()
    final = trainer.evaluate()  # the best epoch's adapter is loaded back by load_best_model_at_end
    history = [e for e in trainer.state.log_history if metric_key in e]
    best = max(history, key=lambda e: e[metric_key]) if history else final

    results = None
    if trainer.is_world_process_zero():  # under torchrun / accelerate, one process writes the run's files
        adapter_dir = save_run(model, args.output_dir)
        results = results_record(preset, task, args, final, best, metric_key, train_output, skipped)
        write_results(args.output_dir, adapter_dir, results, results_table([results]), card_name=args.hub_model_id)
        if args.push_to_hub:
            results["hub"] = push_adapter(adapter_dir, args.hub_model_id, private=args.hub_private).commit_url
    finish_distributed()
    return results


def results_record(preset, task, args, final, best, metric_key, train_output, skipped) -> dict:
    prefix = metric_key.removesuffix(task.main_metric)
    metrics = {k.removeprefix("eval_"): v for k, v in final.items()
               if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "loss", "epoch"))
               and "preparation" not in k}
    return {
        "task": task.name, "task_type": "text-classification",
        "dataset": {"name": f"GLUE {task.folder}", "type": "nyu-mll/glue", "config": task.name,
                    "split": task.eval_splits[0]},
        "metrics": metrics,
        "main_metric": {"name": metric_key.removeprefix("eval_"), "value": final.get(metric_key),
                        "best_epoch": best.get("epoch"), "best_value": best.get(metric_key)},
        "reference": {"source": PAPER_SOURCE, "metrics": {metric_key.removeprefix("eval_"): preset.reference / 100}}
        if preset.reference is not None else None,
        "preset": preset.name, "method": args.method,
        "hyperparameters": {k: v for k, v in asdict(preset).items() if k not in ("setting", "task")},
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "init_adapter": args.init_adapter, "init_adapter_skipped": skipped, "seed": args.seed,
        "metric_prefix": prefix,
    }


def results_table(results: list[dict]) -> str:
    """Markdown table of runs set against the paper's Table 2 numbers (x100)."""
    lines = ["| preset | method | metric | ours | paper | difference |", "|---|---|---|---|---|---|"]
    for r in results:
        main = r["main_metric"]
        ours = 100 * main["value"] if main["value"] is not None else float("nan")
        ref = r.get("reference") or {}
        paper = 100 * next(iter(ref["metrics"].values())) if ref else None
        diff = f"{ours - paper:+.1f}" if paper is not None else "-"
        lines.append(f"| {r['preset']} | {r['method']} | {main['name']} | {ours:.1f} | "
                     f"{f'{paper:.1f}' if paper is not None else '-'} | {diff} |")
    return "\n".join(lines)

