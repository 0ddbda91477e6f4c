"""``make demo``: the GLUE script's quick preset on an embedded default, offline, in under a minute.

Pre-trains a tiny RoBERTa (built from config) on negation-free sentences, writes an SST-2-shaped task with
negations in GLUE's TSV layout, then runs ``scripts/run_glue.py --preset demo/sst2``: DoRA with a per-layer
rank map plus the classifier head, trained with the standard ``Trainer``, rank utilization logged. It then
reloads the saved adapter from disk with :func:`hf_lorax.get_model` and checks that it scores the same.

    python -m hf_lorax_paper.demo [--output_dir runs/demo] [--method dora|lora] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from hf_lorax.cli import OneLineArgumentParser

    from .arguments import POSITIVE, WHOLE_NON_NEGATIVE, WHOLE_POSITIVE, check_values

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--method", choices=["lora", "dora"], default="dora")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_values(vars(args), {"epochs": POSITIVE, "train_size": WHOLE_POSITIVE, "seed": WHOLE_NON_NEGATIVE})
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hf_lorax import describe, get_model
    from hf_lorax_paper.experiment import parse, run
    from hf_lorax_paper.tasks.glue import GluePlugin, results_table
    from hf_lorax_paper.tasks.glue_data import compute_metrics, get_task, read_tsv
    from hf_lorax_paper.tasks.synthetic import pretrain_tiny_roberta, write_sst2_folder

    started = time.time()
    out = Path(args.output_dir)
    base_dir, data_dir = out / "base_model", out / "data"
    print(f"[1/4] Pre-training a tiny RoBERTa (built from config) on negation-free sentences -> {base_dir}")
    pretrain_tiny_roberta(str(base_dir), seed=args.seed)
    write_sst2_folder(str(data_dir), seed=args.seed, n_train=args.train_size)
    print(f"[2/4] scripts/run_glue.py --preset demo/sst2 --method {args.method} --data_dir {data_dir}")
    argv = ["--preset", "demo/sst2", "--model_name_or_path", str(base_dir), "--data_dir", str(data_dir),
            "--output_dir", str(out), "--method", args.method, "--num_train_epochs", str(args.epochs),
            "--seed", str(args.seed), "--rank_map", json.dumps({"layer.{0-1}.attention.self.query": 16,
                                                                 "layer.{2-3}.*": 4}),
            "--rank_utilization_steps", "50", "--use_cpu", "true", "--logging_steps", "20", "--report_to", "none"]
    results = run(GluePlugin(), parse(GluePlugin(), argv))
    adapter_dir = out / "adapter"

    print(f"[3/4] Reloading {adapter_dir} with hf_lorax.get_model and re-scoring the dev set")
    model = get_model(str(adapter_dir), is_trainable=False)
    print(describe(model))
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dev = read_tsv(str(data_dir / "dev.tsv"), get_task("sst2"))
    batch = tokenizer(dev["sentence"], padding=True, return_tensors="pt")

    def score(m) -> float:
        with torch.no_grad():
            return compute_metrics(get_task("sst2"), m.eval()(**batch).logits.numpy(), dev["label"])["accuracy"]

    reloaded = score(model)
    before = score(AutoModelForSequenceClassification.from_pretrained(base_dir))
    accuracy = results["main_metric"]["value"]

    print(f"[4/4] Done in {time.time() - started:.0f} s\n")
    print(results_table([results]))
    print(f"\naccuracy: pre-trained base {before:.3f} -> with the {args.method.upper()} adapter {accuracy:.3f} "
          f"(reloaded from disk: {reloaded:.3f})")
    print(f"  adapter      {adapter_dir}/ (adapter_config.json, adapter_model.safetensors, hf_lorax.json, README.md)")
    print(f"  results      {out / 'results.json'}, {out / 'results.md'}")
    print(f"  rank usage   {out / 'rank_utilization.png'}, {out / 'suggested_rank_map.json'}")
    print(f"  curve        {out / 'training_curve.png'}")
    print(f"  base model   {base_dir}/   data {data_dir}/")
    if abs(reloaded - accuracy) > 1e-6:
        raise SystemExit(f"The reloaded adapter scored {reloaded:.4f}, the trained one {accuracy:.4f}.")
    return {**results, "accuracy_before": before, "accuracy_reloaded": reloaded, "seconds": time.time() - started}


if __name__ == "__main__":
    main()
