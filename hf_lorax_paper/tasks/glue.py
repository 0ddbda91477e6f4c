"""GLUE with the LoRA paper's presets: the GLUE plug-in of :mod:`hf_lorax_paper.experiment`.

``scripts/run_glue.py`` runs it. Fast by construction: examples are tokenized without padding, batches are
padded dynamically and grouped by length (the official scripts pad everything to 512), and evaluation runs
batched without gradients. Every input is validated before anything is written to the output directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arguments import ran_hyperparameters
from ..experiment import MethodArguments, TaskPlugin, rank_map_argument, timed
from ..targets import model_label, preset_targets, same_model
from .glue_data import GlueTask, compute_metrics, get_task, load_hub, load_local
from .glue_presets import PAPER_MODELS, PAPER_SOURCE, PRESETS, GluePreset, get_preset, paper_result


@dataclass
class GlueDataArguments:
    """GLUE data arguments of ``scripts/run_glue.py``."""

    task: str | None = field(default=None, metadata={"help": "GLUE task when no preset is given"})
    data_dir: str | None = field(default=None, metadata={"help": "local GLUE folder (original TSV layout)"})
    max_length: int | None = field(default=None, metadata={"help": "overrides the preset's max sequence length"})
    official_scripts: bool = field(default=False, metadata={"help": "microsoft/LoRA script values (alpha 16, wd 0.1)"})
    init_adapter: str | None = field(default=None, metadata={"help": "adapter to start from (the MNLI one)"})


# full fine-tuning and BitFit: the LoRA paper quotes these rows from earlier work without their settings, so
# these are hf_lorax's choices: RoBERTa's fine-tuning recipe (Liu et al. 2019, Appendix C: lr 1e-5..3e-5,
# weight decay 0.1, 10 epochs) and a learning rate inside BitFit's search range (Ben Zaken et al. 2022).
BASELINE_TRAINING = {
    "full": {"learning_rate": 2e-5, "weight_decay": 0.1, "num_train_epochs": 10},
    "bitfit": {"learning_rate": 5e-4, "weight_decay": 0.0},
}


# preset field -> the TrainingArguments name that carries it (a flag or a baseline may replace the preset's value)
TRAINING_FIELDS = {"epochs": "num_train_epochs", "learning_rate": "learning_rate", "batch_size": "per_device_train_batch_size",
                   "weight_decay": "weight_decay", "warmup_ratio": "warmup_steps"}


class GluePlugin(TaskPlugin):
    name = "glue"
    data_arguments = GlueDataArguments
    default_output_dir = "runs/glue"

    def resolve(self, method: MethodArguments, data: GlueDataArguments) -> GluePreset:
        """The preset with the overrides applied, and validated."""
        if method.preset:
            preset = get_preset(method.preset, data.official_scripts)
            if data.task and get_task(data.task).name != preset.task:
                raise ValueError(f"--task {data.task!r} contradicts --preset {method.preset!r}.")
        elif data.task:
            task = get_task(data.task)
            preset = replace(get_preset(f"roberta-base/{task.name}", data.official_scripts), setting="custom")
        else:
            raise ValueError("Pass --preset (e.g. roberta-base/sst2) or --task.")
        overrides = {k: getattr(method, k) for k in ("model_name_or_path", "r", "lora_alpha", "lora_dropout")
                     if getattr(method, k) is not None}
        if data.max_length is not None:
            overrides["max_length"] = data.max_length
        preset = replace(preset, **overrides)
        if not preset.model_name_or_path:
            raise ValueError(f"Preset {preset.name} has no model; pass --model_name_or_path.")
        return preset

    def training_defaults(self, preset: GluePreset, method: MethodArguments, data) -> dict:
        task = get_task(preset.task)
        return {
            "output_dir": "runs/glue", "num_train_epochs": preset.epochs, "learning_rate": preset.learning_rate,
            "per_device_train_batch_size": preset.batch_size, "per_device_eval_batch_size": 64,
            "weight_decay": preset.weight_decay, "warmup_steps": preset.warmup_ratio, "lr_scheduler_type": "linear",
            "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1,
            "load_best_model_at_end": True, "metric_for_best_model": metric_key(task).removeprefix("eval_"),
            "greater_is_better": True, "train_sampling_strategy": "group_by_length", "logging_steps": 50, "seed": 0,
            **BASELINE_TRAINING.get(method.method, {}),
        }

    def load_splits(self, preset: GluePreset, method: MethodArguments, data: GlueDataArguments) -> dict:
        task = get_task(preset.task)
        if data.init_adapter:
            from hf_lorax import read_adapter_folder

            init = read_adapter_folder(data.init_adapter).base_changing_init  # a broken folder fails here, named
            if init:  # its factors belong to a changed base, not to the fresh model's
                raise ValueError(f"--init_adapter {data.init_adapter!r} was trained with init_lora_weights={init!r}, "
                                 "which changed its base; convert it first: "
                                 "model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR).")
        if data.data_dir:
            return load_local(data.data_dir, task, method.max_train_samples, method.max_eval_samples)
        return load_hub(task, method.max_train_samples, method.max_eval_samples)

    def task_type(self) -> str:
        return "SEQ_CLS"

    def num_labels(self, preset: GluePreset) -> int:
        return get_task(preset.task).num_labels

    def adapter_fields(self, preset: GluePreset, method: MethodArguments, data) -> dict:
        return dict(base_model_name_or_path=preset.model_name_or_path, task_type="SEQ_CLS",
                    num_labels=self.num_labels(preset), r=preset.r, lora_alpha=preset.lora_alpha,
                    lora_dropout=preset.lora_dropout, rank_map=rank_map_argument(method.rank_map),
                    **(preset.targets or preset_targets(preset.target_modules)).config_fields())

    def after_model(self, model, method: MethodArguments, data: GlueDataArguments) -> dict:
        if not data.init_adapter:
            return {}
        return {"init_adapter": data.init_adapter, "init_adapter_skipped": load_init_adapter(model, data.init_adapter)}

    def trainer_inputs(self, tokenizer, preset: GluePreset, method, data, splits) -> dict:
        from datasets import Dataset
        from transformers import DataCollatorWithPadding, Trainer

        task = get_task(preset.task)

        def encode(batch):
            return tokenizer(*[batch[k] for k in task.text_keys], truncation=True, max_length=preset.max_length)

        encoded = {name: Dataset.from_dict(split).map(encode, batched=True, remove_columns=list(task.text_keys))
                   for name, split in splits.items()}
        eval_sets = {s: encoded[s] for s in task.eval_splits}
        return {"trainer_class": Trainer, "train_dataset": encoded["train"],
                "eval_dataset": eval_sets if len(eval_sets) > 1 else eval_sets[task.eval_splits[0]],
                "data_collator": DataCollatorWithPadding(tokenizer),
                "compute_metrics": lambda p: compute_metrics(task, p.predictions, p.label_ids)}

    def evaluate(self, trainer, model, tokenizer, preset: GluePreset, method, data, splits, output_dir) -> dict:
        task, timings = get_task(preset.task), {}
        with timed(timings, "evaluate"):
            final = trainer.evaluate()  # the best epoch's weights when load_best_model_at_end
        key = metric_key(task)
        history = [e for e in trainer.state.log_history if key in e]
        best = max(history, key=lambda e: e[key]) if history else final
        metrics = {k.removeprefix("eval_"): v for k, v in final.items()
                   if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "loss", "epoch"))
                   and "preparation" not in k}
        reference = paper_result(preset, method.method)
        paper = {"source": PAPER_SOURCE, "model": PAPER_MODELS[preset.setting], "method": reference[0],
                 "metrics": {key.removeprefix("eval_"): reference[1] / 100}} if reference else None
        paper_model = PRESETS[preset.name].model_name_or_path if preset.name in PRESETS else None
        record = {
            "task": task.name, "task_type": "text-classification",
            "dataset": {"name": f"GLUE {task.folder}", "type": "nyu-mll/glue", "config": task.name,
                        "split": task.eval_splits[0]},
            "metrics": metrics,
            "main_metric": {"name": key.removeprefix("eval_"), "value": final.get(key),
                            "best_epoch": best.get("epoch"), "best_value": best.get(key)},
            # the paper's number is this run's reference only for the paper's model; else it is another model's
            "reference": paper if same_model(preset.model_name_or_path, paper_model) else None, "paper": paper,
            "hyperparameters": ran_hyperparameters(preset, trainer.args, TRAINING_FIELDS),
        }
        return {"record": record, "timings": timings}

    def results_table(self, results: list[dict]) -> str:
        return results_table(results)


def metric_key(task: GlueTask) -> str:
    """The Trainer's name for the task's main metric (MNLI reports the matched split's)."""
    return f"eval_{task.eval_splits[0]}_{task.main_metric}" if len(task.eval_splits) > 1 else f"eval_{task.main_metric}"


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


def results_table(results: list[dict]) -> str:
    """Markdown table of runs (x100), each named by the model that ran. The paper's Table 2 number is set against
    a run of the paper's own model; beside another model's run it is a row of its own, named by its model."""
    lines = ["| preset | method | model | metric | value | paper (same model and method) | difference |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        main = r["main_metric"]
        ours = 100 * main["value"] if main["value"] is not None else float("nan")
        ref = r.get("reference") or {}
        paper = 100 * next(iter(ref["metrics"].values())) if ref else None
        diff = f"{ours - paper:+.1f}" if paper is not None else "-"
        lines.append(f"| {r['preset']} | {r['method']} | {model_label(r['model'])} | {main['name']} | {ours:.1f} | "
                     f"{f'{paper:.1f}' if paper is not None else '-'} | {diff} |")
        other = r.get("paper") if not ref else None
        if other:
            value = 100 * next(iter(other["metrics"].values()))
            lines.append(f"| {r['preset']} | {other['method']} | paper, {other['model']} | {main['name']} | "
                         f"{value:.1f} | - | - |")
    return "\n".join(lines)

