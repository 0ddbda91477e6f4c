"""Overhead of RankUtilizationCallback on training wall time (issue: ≤ 2% at the default interval).

Trains the same GPT-2-shaped model with LoRA for the same steps without the callback, with it measuring spectra
only (``sensitivity=False``) and with it also gathering the loss sensitivity at every step (the default),
alternating runs, and reports the median wall times and their ratios as JSON and a table.

    python scripts/bench_callback.py [--steps 300] [--repeats 3] [--every 100] [--json out.json]
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import os
import statistics
import tempfile
import time

from bench_utils import emit, parse_checked

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from hf_lorax import LoRAConfig, RankUtilizationCallback, get_model  # noqa: E402


def run(steps: int, every: int | None, out: str, sensitivity: bool = True) -> float:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=8, vocab_size=2048, n_positions=128))
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
                      model=base)
    ids = torch.randint(0, 2048, (64, 64), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], use_cpu=True, logging_steps=50, save_strategy="no", disable_tqdm=True)
    callbacks = [RankUtilizationCallback(every_n_steps=every, plot=False, sensitivity=sensitivity)] if every else []
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parse_checked(parser, argv, dict.fromkeys(("steps", "repeats", "every", "threads"), WHOLE_POSITIVE))
    torch.set_num_threads(args.threads)
    times = {"without": [], "spectra_only": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        run(10, None, tmp)  # warm-up
        for _ in range(args.repeats):
            times["without"].append(run(args.steps, None, tmp))
            times["spectra_only"].append(run(args.steps, args.every, tmp, sensitivity=False))
            times["with"].append(run(args.steps, args.every, tmp))
    result = {"steps": args.steps, "every_n_steps": args.every, "repeats": args.repeats, "threads": args.threads,
              **{f"seconds_{k}": statistics.median(v) for k, v in times.items()}, "all_seconds": times}
    result["overhead_ratio"] = result["seconds_with"] / result["seconds_without"]
    result["spectra_only_overhead_ratio"] = result["seconds_spectra_only"] / result["seconds_without"]
    print(f"{'run':<36}{'median s':>10}{'ratio':>8}")
    for key, name in (("without", "without callback"), ("spectra_only", "spectra only (sensitivity=False)"),
                      ("with", "spectra + sensitivity (default)")):
        print(f"{name:<36}{result[f'seconds_{key}']:>10.2f}{result[f'seconds_{key}'] / result['seconds_without']:>8.3f}")
    return emit(result, args.json, {k: v for k, v in result.items() if k != "all_seconds"})


if __name__ == "__main__":
    main()
