"""``make demo``: fine-tune a tiny RoBERTa with DoRA and a per-layer rank map, offline, in about a minute.

Builds a RoBERTa-shaped model from config and a sentence-classification task (``hf_lorax.tasks.synthetic``),
trains the adapter and classifier head with the standard ``Trainer``, evaluates, saves the adapter,
reloads it from disk with :func:`hf_lorax.get_model` and checks that the reloaded model scores the same.

    python -m hf_lorax.demo [--output_dir runs/demo] [--method dora|lora] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--method", choices=["lora", "dora"], default="dora")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from hf_lorax import DoRAConfig, LoRAConfig, RankUtilizationCallback, describe, get_model
    from hf_lorax.tasks.synthetic import make_sentiment_splits, pretrain_tiny_roberta

    started = time.time()
    set_seed(args.seed)
    out = Path(args.output_dir)
    base_dir, adapter_dir = out / "base_model", out / "adapter"

    print(f"[1/5] Pre-training a tiny RoBERTa (built from config) on negation-free sentences -> {base_dir}")
    pretrain_tiny_roberta(str(base_dir), seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    config_cls = DoRAConfig if args.method == "dora" else LoRAConfig
    config = config_cls(
        base_model_name_or_path=str(base_dir), task_type="SEQ_CLS", num_labels=2,
        r=8, lora_alpha=16, target_modules=["query", "value"],
        rank_map={"layer.{0-1}.attention.self.query": 16, "layer.{2-3}.*": 4},
    )
    model = get_model(config)
    print(f"[2/5] {args.method.upper()} adapters injected:\n{describe(model)}\n")

    splits = make_sentiment_splits(n_train=args.train_size, n_eval=500, seed=args.seed)
    tokenize = lambda batch: tokenizer(batch["sentence"], truncation=True)  # noqa: E731
    train = Dataset.from_dict(splits["train"]).map(tokenize, batched=True, remove_columns=["sentence"])
    val = Dataset.from_dict(splits["validation"]).map(tokenize, batched=True, remove_columns=["sentence"])

    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=args.epochs, learning_rate=args.learning_rate,
        per_device_train_batch_size=32, per_device_eval_batch_size=128, warmup_steps=0.06,
        lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
        logging_steps=20, report_to=[], seed=args.seed, use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=val,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
        callbacks=[RankUtilizationCallback(every_n_steps=50, output_dir=str(out), log_per_module=False)],
    )
    before = trainer.evaluate()["eval_accuracy"]
    print(f"[3/5] Training ({len(train)} sentences, {args.epochs:g} epochs); accuracy before: {before:.3f}")
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]

    print(f"[4/5] Saving the adapter -> {adapter_dir}")
    model.save_pretrained(adapter_dir)

    reloaded = get_model(str(adapter_dir), is_trainable=False)
    check = Trainer(model=reloaded, args=training_args, eval_dataset=val,
                    data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    reloaded_acc = check.evaluate()["eval_accuracy"]
    results = {
        "method": args.method, "accuracy_before": before, "accuracy": after, "accuracy_reloaded": reloaded_acc,
        "trainable_params": describe(model).trainable_params, "seconds": round(time.time() - started, 1),
        "adapter_dir": str(adapter_dir), "base_model_dir": str(base_dir), "checkpoints": str(out / "checkpoints"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"[5/5] Reloaded from disk: accuracy {reloaded_acc:.3f} (trained model: {after:.3f})\n")
    print(f"accuracy {before:.3f} -> {after:.3f} in {results['seconds']} s")
    print(f"  adapter      {adapter_dir}/ (adapter_config.json, adapter_model.safetensors, hf_lorax.json)")
    print(f"  base model   {base_dir}/")
    print(f"  checkpoints  {out / 'checkpoints'}/")
    print(f"  results      {out / 'results.json'}")
    print(f"  rank usage   {out / 'rank_utilization.png'}, {out / 'suggested_rank_map.json'}")
    if abs(reloaded_acc - after) > 1e-9:
        raise SystemExit("The reloaded adapter scored differently from the trained one.")
    return results


if __name__ == "__main__":
    main()
