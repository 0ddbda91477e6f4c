"""E2E NLG with the LoRA paper's GPT-2 presets: ``scripts/run_e2e.py`` is a thin wrapper around :func:`run`.

One run trains an adapter with ``transformers.Trainer`` (loss on the reference tokens only, label
smoothing, the LM head applied only where there are labels — :mod:`.targeted_loss`), saves it, decodes
the test MRs with batched beam search with the adapter merged into the weights, scores the outputs with
the E2E metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr; :mod:`hf_lorax_paper.metrics.e2e`) and writes
``predictions.txt``, ``references.txt``, ``results.json`` and ``results.md`` next to ``adapter/``.
Every input is validated before anything is written to the output directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

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
from .e2e_presets import METRICS, PAPER_SOURCE, SCALED_X100, E2EPreset, get_preset
from .runs import (
    RunArguments,
    adapter_config,
    check_method,
    finish_distributed,
    rank_map_argument,
    save_run,
    write_results,
)

OVERRIDABLE = ("model_name_or_path", "r", "lora_alpha", "lora_dropout", "learning_rate", "batch_size", "epochs",
               "weight_decay", "warmup_steps", "label_smoothing", "max_length", "num_beams", "length_penalty",
               "no_repeat_ngram_size", "max_new_tokens")


@dataclass
class E2EArguments(RunArguments):
    """Arguments of ``scripts/run_e2e.py``; every preset field can be overridden."""

    preset: str = field(default="gpt2-medium/e2e", metadata={"help": "gpt2-medium/e2e or gpt2-large/e2e"})
    warmup_steps: int | None = None
    label_smoothing: float | None = None
    num_beams: int | None = None
    length_penalty: float | None = field(default=None, metadata={"help": "0.9 (paper, default) or 0.8 (repo README)"})
    no_repeat_ngram_size: int | None = None
    max_new_tokens: int | None = None
    train_file: str | None = field(default=None, metadata={"help": "mr,ref CSV (overrides --data_dir's trainset.csv)"})
    validation_file: str | None = field(default=None, metadata={"help": "mr,ref CSV for the eval loss per epoch"})
    test_file: str | None = field(default=None, metadata={"help": "mr,ref CSV to decode and score"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with trainset.csv, devset.csv, testset_w_refs.csv"})
    dataset_name: str = field(default="GEM/e2e_nlg", metadata={"help": "Hub dataset when no local files are given"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "first N distinct MRs of validation/test"})
    max_steps: int = field(default=-1, metadata={"help": "stop training after N steps (-1: the preset's epochs)"})
    output_dir: str = "runs/e2e"
    seed: int = 110  # microsoft/LoRA's E2E command line
    eval_batch_size: int = field(default=16, metadata={"help": "MRs per beam-search batch"})
    meteor: bool = field(default=True, metadata={"help": "compute METEOR (needs Java)"})
    logging_steps: int = 100
    bf16: bool = False


def resolve(args: E2EArguments) -> E2EPreset:
    """The preset with the arguments' overrides applied; validates every setting."""
    check_method(args.method)
    preset = get_preset(args.preset)
    preset = replace(preset, **{k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None})
    if not preset.model_name_or_path:
        raise ValueError(f"Preset {preset.name} has no model; pass --model_name_or_path.")
    positive = {"r": preset.r, "batch_size": preset.batch_size, "max_length": preset.max_length,
                "num_beams": preset.num_beams, "max_new_tokens": preset.max_new_tokens,
                "eval_batch_size": args.eval_batch_size, "learning_rate": preset.learning_rate}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}.")
    if not 0 <= preset.label_smoothing < 1 or not 0 <= preset.lora_dropout < 1:
        raise ValueError("--label_smoothing and --lora_dropout must be in [0, 1).")
    if preset.epochs <= 0 and args.max_steps <= 0:
        raise ValueError("--epochs must be positive (or pass --max_steps).")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. me/gpt2-medium-lora-e2e).")
    return preset


def load_splits(args: E2EArguments) -> dict[str, E2ESplit]:
    """Local CSVs when any of ``--data_dir`` / ``--*_file`` is given, else the Hub."""
    if args.data_dir or args.train_file or args.validation_file or args.test_file:
        files = resolve_local_files(args.data_dir, args.train_file, args.validation_file, args.test_file)
        return load_local(files, args.max_train_samples, args.max_eval_samples)
    if args.dataset_name not in HUB_DATASETS:
        raise ValueError(f"--dataset_name {args.dataset_name!r}: choose one of {list(HUB_DATASETS)}.")
    return load_hub(args.dataset_name, args.max_train_samples, args.max_eval_samples)


def build_config(preset: E2EPreset, args: E2EArguments):
    return adapter_config(
        args.method, base_model_name_or_path=preset.model_name_or_path, task_type="CAUSAL_LM", r=preset.r,
        lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout, target_modules=list(preset.target_modules),
        rank_map=rank_map_argument(args.rank_map), fused_slices={m: list(preset.slices) for m in preset.target_modules})


def _scorer():
    """The metrics function, imported before training so a missing scorer fails in seconds, not hours."""
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
    """The adapter folded into the base weights for decoding (no extra latency), unmerged afterwards."""
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
                eos_token_id=eos, pad_token_id=pad,
            )
            for j, i in enumerate(rows):
                text = tokenizer.decode(generated[j, width:], skip_special_tokens=True)
                outputs[i] = detokenize(text.split("\n")[0].strip())
    return outputs


def run(args: E2EArguments) -> dict | None:
    """Train, decode and score one E2E run; writes the adapter, predictions, references and results.

    Returns the results record; ``None`` on the non-main processes of a distributed run.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    from hf_lorax import RankUtilizationCallback, TargetedLossTrainer, get_model, push_adapter

    preset = resolve(args)
    e2e_scores = _scorer()
    splits = load_splits(args)  # every row parsed before anything is written
    test_mrs, test_refs = group_by_mr(splits["test"].mrs, splits["test"].refs)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(preset.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {preset.model_name_or_path!r} has no end-of-text token; E2E needs one.")
    model = get_model(build_config(preset, args))  # fp32 weights; --bf16 trains under autocast
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encode(split: E2ESplit) -> Dataset:
        rows = [encode_example(tokenizer, m, r, preset.max_length) for m, r in zip(split.mrs, split.refs)]
        return Dataset.from_dict({"input_ids": [x["input_ids"] for x in rows], "labels": [x["labels"] for x in rows]})

    train_set = encode(splits["train"])
    eval_set = encode(splits["validation"]) if "validation" in splits else None

    os.makedirs(args.output_dir, exist_ok=True)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"), num_train_epochs=preset.epochs, max_steps=args.max_steps,
        learning_rate=preset.learning_rate, per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=preset.batch_size, weight_decay=preset.weight_decay,
        warmup_steps=preset.warmup_steps, lr_scheduler_type="linear", label_smoothing_factor=preset.label_smoothing,
        max_grad_norm=0.0,  # microsoft/LoRA trains E2E with --clip 0.0
        eval_strategy="epoch" if eval_set is not None else "no", save_strategy="epoch", save_total_limit=1,
        prediction_loss_only=True, remove_unused_columns=False, train_sampling_strategy="group_by_length",
        logging_steps=args.logging_steps, report_to=[], seed=args.seed, use_cpu=args.use_cpu, bf16=args.bf16,
        disable_tqdm=args.disable_tqdm, dataloader_num_workers=0,
    )
    callbacks = []
    if args.rank_utilization:
        callbacks.append(RankUtilizationCallback(every_n_steps=args.rank_utilization_steps, output_dir=args.output_dir,
                                                 log_per_module=False))
    trainer = TargetedLossTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                                  data_collator=CausalLMCollator(tokenizer.pad_token_id if tokenizer.pad_token_id
                                                                 is not None else tokenizer.eos_token_id),
                                  callbacks=callbacks)
    train_output = trainer.train()
    eval_loss = trainer.evaluate().get("eval_loss") if eval_set is not None else None

    results = None
    if trainer.is_world_process_zero():  # under torchrun / accelerate, one process decodes and writes
        adapter_dir = save_run(model, args.output_dir)
        start = time.perf_counter()
        predictions = generate(model, tokenizer, test_mrs, preset, args.eval_batch_size)
        decode_s = time.perf_counter() - start
        write_predictions(os.path.join(args.output_dir, "predictions.txt"), predictions)
        write_references(os.path.join(args.output_dir, "references.txt"), test_refs)
        scores = e2e_scores(predictions, test_refs, meteor=args.meteor)

        results = results_record(preset, args, scores, splits, trainable, train_output, eval_loss, decode_s)
        write_results(args.output_dir, adapter_dir, results, results_table([results]), card_name=args.hub_model_id)
        if args.push_to_hub:
            results["hub"] = push_adapter(adapter_dir, args.hub_model_id, private=args.hub_private).commit_url
    finish_distributed()
    return results


def results_record(preset: E2EPreset, args: E2EArguments, scores: dict, splits: dict[str, E2ESplit], trainable: int,
                   train_output, eval_loss: float | None, decode_s: float) -> dict:
    """``results.json``: the fields ``hf_lorax.card`` renders (task_type, dataset, metrics, reference) and the run."""
    metrics = {m: scores[m] for m in METRICS if isinstance(scores.get(m), (int, float))}
    reference = preset.reference
    n_mrs = len(group_by_mr(splits["test"].mrs, splits["test"].refs)[0])
    return {
        "task": "e2e", "task_type": "text-generation",
        "dataset": {"name": "E2E NLG", "type": "e2e_nlg", "config": None, "split": "test"},
        "metrics": metrics,
        "metrics_unavailable": dict(scores.get("unavailable") or {}),
        "main_metric": {"name": "BLEU", "value": metrics.get("BLEU")},
        "reference": {"source": PAPER_SOURCE, "metrics": reference.metrics()} if reference else None,
        "paper_rows": [asdict(row) for row in preset.paper_rows],
        "preset": preset.name, "method": args.method, "trainable_params": trainable,
        "hyperparameters": {k: v for k, v in asdict(preset).items() if k not in ("setting", "task")},
        "train_runtime_s": train_output.metrics.get("train_runtime"), "train_loss": train_output.training_loss,
        "eval_loss": eval_loss, "decode_runtime_s": decode_s,
        "data": {split: {"source": s.source, "rows": len(s)} for split, s in splits.items()},
        "test_mrs": n_mrs, "test_references": len(splits["test"]), "seed": args.seed,
    }


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if name in SCALED_X100 else f"{value:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def results_table(results: list[dict]) -> str:
    """Markdown table of runs and the paper's Table 3 rows (BLEU, METEOR, ROUGE-L x100 as the paper prints)."""
    header = "| run | method | trainable params | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    paper_seen: set[str] = set()
    for r in results:
        cells = " | ".join(_fmt(m, r["metrics"].get(m)) for m in METRICS)
        lines.append(f"| {r['preset']} (ours) | {r['method']} | {_params(r['trainable_params'])} | {cells} |")
    for r in results:
        setting = r["preset"].split("/")[0]
        if setting in paper_seen:
            continue
        paper_seen.add(setting)
        for row in r.get("paper_rows") or []:
            cells = " | ".join(f"{row[m]:.1f}" if m in SCALED_X100 else f"{row[m]:.2f}" for m in METRICS)
            lines.append(f"| {setting} (paper) | {row['method']} | {row['trainable_params_m']:.2f}M | {cells} |")
    return "\n".join(lines)

