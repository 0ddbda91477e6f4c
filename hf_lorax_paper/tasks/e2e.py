"""E2E NLG with the LoRA paper's GPT-2 presets: the E2E plug-in of :mod:`hf_lorax_paper.experiment`.

``scripts/run_e2e.py`` runs it. A run trains with ``hf_lorax.TargetedLossTrainer`` (loss on the reference
tokens only, label smoothing, the LM head applied only where there are labels), decodes the test MRs with
batched beam search (left-padded, KV cache, adapter merged into the weights), scores the outputs with the
E2E metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr; :mod:`hf_lorax_paper.metrics.e2e`) and writes
``predictions.txt`` and ``references.txt`` beside the run's results. Every input is validated before
anything is written to the output directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

from ..arguments import ran_hyperparameters
from ..experiment import MethodArguments, TaskPlugin, rank_map_argument, timed
from ..targets import model_label, preset_targets, same_model
from .e2e_data import (
    HUB_DATASETS,
    E2ESplit,
    detokenize,
    encode_example,
    encode_prompt,
    group_by_mr,
    load_hub,
    load_local,
    resolve_local_files,
    write_predictions,
    write_references,
)
from .e2e_presets import METRICS, PAPER_MODELS, PAPER_SOURCE, PRESETS, SCALED_X100, E2EPreset, get_preset

PRESET_FIELDS = ("model_name_or_path", "r", "lora_alpha", "lora_dropout", "max_length", "num_beams", "length_penalty",
                 "no_repeat_ngram_size", "max_new_tokens")
# The LoRA paper quotes its FT row from earlier work without the settings; these are hf_lorax's choices.
# preset field -> the TrainingArguments name that carries it (a flag or a baseline may replace the preset's value)
TRAINING_FIELDS = {"epochs": "num_train_epochs", "learning_rate": "learning_rate", "batch_size": "per_device_train_batch_size",
                   "weight_decay": "weight_decay", "warmup_steps": "warmup_steps", "label_smoothing": "label_smoothing_factor"}
BASELINE_TRAINING = {"full": {"learning_rate": 5e-5, "warmup_steps": 500}, "bitfit": {"learning_rate": 1e-3}}


@dataclass
class E2EDataArguments:
    """E2E data and decoding arguments of ``scripts/run_e2e.py`` (preset fields can be overridden)."""

    train_file: str | None = field(default=None, metadata={"help": "mr,ref CSV (overrides --data_dir's trainset.csv)"})
    validation_file: str | None = field(default=None, metadata={"help": "mr,ref CSV for the eval loss per epoch"})
    test_file: str | None = field(default=None, metadata={"help": "mr,ref CSV to decode and score"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with trainset.csv, devset.csv, testset_w_refs.csv"})
    dataset_name: str = field(default="GEM/e2e_nlg", metadata={"help": "Hub dataset when no local files are given"})
    max_length: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = field(default=None, metadata={"help": "0.9 (paper, default) or 0.8 (repo README)"})
    no_repeat_ngram_size: int | None = None
    max_new_tokens: int | None = None
    meteor: bool = field(default=True, metadata={"help": "compute METEOR (needs Java)"})


class E2EPlugin(TaskPlugin):
    name = "e2e"
    data_arguments = E2EDataArguments
    default_output_dir = "runs/e2e"

    def resolve(self, method: MethodArguments, data: E2EDataArguments) -> E2EPreset:
        """The preset (default ``gpt2-medium/e2e``) with the overrides (checked by :mod:`..arguments`) applied."""
        preset = get_preset(method.preset or "gpt2-medium/e2e")
        sources = {**vars(method), **vars(data)}
        preset = replace(preset, **{k: sources[k] for k in PRESET_FIELDS if sources.get(k) is not None})
        if not preset.model_name_or_path:
            raise ValueError(f"Preset {preset.name} has no model; pass --model_name_or_path.")
        return preset

    def training_defaults(self, preset: E2EPreset, method: MethodArguments, data: E2EDataArguments) -> dict:
        return {
            "num_train_epochs": preset.epochs, "learning_rate": preset.learning_rate,
            "per_device_train_batch_size": preset.batch_size, "per_device_eval_batch_size": 16,
            "weight_decay": preset.weight_decay, "warmup_steps": preset.warmup_steps, "lr_scheduler_type": "linear",
            "label_smoothing_factor": preset.label_smoothing,
            "max_grad_norm": 0.0,  # microsoft/LoRA trains E2E with --clip 0.0
            "eval_strategy": "epoch" if self._has_validation(data) else "no", "save_strategy": "epoch",
            "save_total_limit": 1, "prediction_loss_only": True, "remove_unused_columns": False,
            "train_sampling_strategy": "group_by_length", "logging_steps": 100,
            "seed": 110,  # microsoft/LoRA's E2E command line
            **BASELINE_TRAINING.get(method.method, {}),
        }

    @staticmethod
    def _has_validation(data: E2EDataArguments) -> bool:
        if not (data.data_dir or data.train_file or data.validation_file or data.test_file):
            return True  # the Hub dataset has a validation split
        if data.validation_file:
            return True
        return bool(data.data_dir) and os.path.isfile(os.path.join(data.data_dir, "devset.csv"))

    def load_splits(self, preset, method: MethodArguments, data: E2EDataArguments) -> dict[str, E2ESplit]:
        """Local CSVs when any of ``--data_dir`` / ``--*_file`` is given, else the Hub."""
        _scorer()  # a missing scorer fails in seconds, not after hours of training
        if data.data_dir or data.train_file or data.validation_file or data.test_file:
            files = resolve_local_files(data.data_dir, data.train_file, data.validation_file, data.test_file)
            return load_local(files, method.max_train_samples, method.max_eval_samples)
        if data.dataset_name not in HUB_DATASETS:
            raise ValueError(f"--dataset_name {data.dataset_name!r}: choose one of {list(HUB_DATASETS)}.")
        return load_hub(data.dataset_name, method.max_train_samples, method.max_eval_samples)

    def task_type(self) -> str:
        return "CAUSAL_LM"

    def adapter_fields(self, preset: E2EPreset, method: MethodArguments, data) -> dict:
        targets = preset.targets or preset_targets(preset.target_modules,
                                                   {m: list(preset.slices) for m in preset.target_modules})
        return dict(base_model_name_or_path=preset.model_name_or_path, task_type="CAUSAL_LM", r=preset.r,
                    lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
                    rank_map=rank_map_argument(method.rank_map), **targets.config_fields())

    def trainer_inputs(self, tokenizer, preset: E2EPreset, method, data, splits) -> dict:
        from datasets import Dataset

        from hf_lorax import TargetedLossTrainer

        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {preset.model_name_or_path!r} has no end-of-text token; E2E needs one.")

        def encode(split: E2ESplit) -> Dataset:
            rows = [encode_example(tokenizer, m, r, preset.max_length) for m, r in zip(split.mrs, split.refs)]
            return Dataset.from_dict({"input_ids": [x["input_ids"] for x in rows], "labels": [x["labels"] for x in rows]})

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {"trainer_class": TargetedLossTrainer, "train_dataset": encode(splits["train"]),
                "eval_dataset": encode(splits["validation"]) if "validation" in splits else None,
                "data_collator": CausalLMCollator(pad)}

    def evaluate(self, trainer, model, tokenizer, preset: E2EPreset, method, data: E2EDataArguments, splits,
                 output_dir: str) -> dict:
        timings = {}
        eval_loss = None
        if trainer.eval_dataset is not None:
            with timed(timings, "evaluate"):
                eval_loss = trainer.evaluate().get("eval_loss")
        if not trainer.is_world_process_zero():  # one process decodes and scores
            return {"record": None, "timings": timings}
        test_mrs, test_refs = group_by_mr(splits["test"].mrs, splits["test"].refs)
        with timed(timings, "decode"):
            predictions = generate(model, tokenizer, test_mrs, preset, trainer.args.per_device_eval_batch_size)
        os.makedirs(output_dir, exist_ok=True)
        write_predictions(os.path.join(output_dir, "predictions.txt"), predictions)
        write_references(os.path.join(output_dir, "references.txt"), test_refs)
        with timed(timings, "score"):
            scores = _scorer()(predictions, test_refs, meteor=data.meteor)
        metrics = {m: scores[m] for m in METRICS if isinstance(scores.get(m), (int, float))}
        row = next((r for r in preset.paper_rows if r.method == {"full": "FT"}.get(method.method, "LoRA")), None)
        paper_model = PRESETS[preset.name].model_name_or_path
        if method.method == "bitfit" or not same_model(preset.model_name_or_path, paper_model):
            row = None  # Table 3 has no BitFit row; another model's numbers are no reference for this one
        record = {
            "task": "e2e", "task_type": "text-generation",
            "dataset": {"name": "E2E NLG", "type": "e2e_nlg", "config": None, "split": "test"},
            "metrics": metrics, "metrics_unavailable": dict(scores.get("unavailable") or {}),
            "main_metric": {"name": "BLEU", "value": metrics.get("BLEU")},
            "reference": {"source": PAPER_SOURCE, "method": row.method, "metrics": row.metrics()} if row else None,
            "paper_rows": [{"model": PAPER_MODELS[preset.setting], **asdict(r)} for r in preset.paper_rows],
            "hyperparameters": ran_hyperparameters(preset, trainer.args, TRAINING_FIELDS),
            "eval_loss": eval_loss, "decode_runtime_s": timings["decode"],
            "data": {split: {"source": s.source, "rows": len(s)} for split, s in splits.items()},
            "test_mrs": len(test_mrs), "test_references": len(splits["test"]),
        }
        return {"record": record, "timings": timings}

    def results_table(self, results: list[dict]) -> str:
        return results_table(results)


def _scorer():
    """The metrics function (imported up front, so a missing scorer fails before training)."""
    try:
        from ..metrics.e2e import e2e_scores
    except ImportError as exc:
        raise ImportError(f"hf_lorax_paper.metrics.e2e is not importable ({exc}); the E2E scorer is needed.") from exc
    return e2e_scores


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100); builds the attention mask."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@contextlib.contextmanager
def merged_adapter(model) -> Iterator[None]:
    """The adapter folded into the base weights for decoding (no extra latency), unmerged afterwards.

    A model without an adapter (``--method full`` / ``bitfit``) decodes as it is."""
    if not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def generate(model, tokenizer, mrs: Sequence[str], preset: E2EPreset, batch_size: int) -> list[str]:
    """Beam-search outputs for ``mrs`` (in their order), detokenized; batches are left-padded and length-sorted."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [encode_prompt(tokenizer, mr) for mr in mrs]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    with torch.no_grad(), merged_adapter(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[j, width - len(prompts[i]):] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                num_beams=preset.num_beams, length_penalty=preset.length_penalty,
                no_repeat_ngram_size=preset.no_repeat_ngram_size, max_new_tokens=preset.max_new_tokens,
                eos_token_id=eos, pad_token_id=pad, use_cache=True,  # the KV cache: each step runs one new token
            )
            for j, i in enumerate(rows):
                text = tokenizer.decode(generated[j, width:], skip_special_tokens=True)
                outputs[i] = detokenize(text.split("\n")[0].strip())
    return outputs


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if name in SCALED_X100 else f"{value:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def results_table(results: list[dict]) -> str:
    """Markdown table of runs, each named by the model that ran, and the paper's Table 3 rows, each named by its
    model (BLEU, METEOR, ROUGE-L x100 as the paper prints)."""
    header = "| run | method | trainable params | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    paper_seen: set[tuple[str, str]] = set()
    for r in results:
        cells = " | ".join(_fmt(m, r["metrics"].get(m)) for m in METRICS)
        lines.append(f"| {model_label(r['model'])} (ours) | {r['method']} | {_params(r['trainable_params'])} | {cells} |")
    for row in (row for r in results for row in r.get("paper_rows") or []):
        if (row["model"], row["method"]) in paper_seen:
            continue
        paper_seen.add((row["model"], row["method"]))
        cells = " | ".join(f"{row[m]:.1f}" if m in SCALED_X100 else f"{row[m]:.2f}" for m in METRICS)
        lines.append(f"| paper, {row['model']} | {row['method']} | {row['trainable_params_m']:.2f}M | {cells} |")
    return "\n".join(lines)

