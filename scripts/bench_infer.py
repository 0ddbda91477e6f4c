"""Inference latency: base model, model with an unmerged adapter, and with the adapter merged.

GPT-2-shaped model (default 6 layers x 768, seq 128), LoRA or DoRA r=8 on c_attn and c_proj, forward pass
under ``torch.inference_mode``; median of ``--repeats`` timed runs after warm-up, at batch 1 and 32. Prints a
table and JSON with the ratios unmerged/base and merged/base (target for merged: <= 1.02).

    python scripts/bench_infer.py [--method lora|dora] [--quick] [--json out.json]
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import copy
import os
import statistics
import time

from bench_utils import emit, parse_checked

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from hf_lorax import DoRAConfig, LoRAConfig, get_model  # noqa: E402


def latencies(models: dict, ids, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median forward time of each model, measured round-robin so drift hits all of them alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {f"{name}_s": statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    parser.add_argument("--quick", action="store_true", help="2 layers x 256: a smoke run")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parse_checked(parser, argv, dict.fromkeys(("seq", "repeats", "threads"), WHOLE_POSITIVE))
    torch.set_num_threads(args.threads)
    layers, hidden, heads = (2, 256, 4) if args.quick else (6, 768, 12)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=args.seq)).eval()
    cls = DoRAConfig if args.method == "dora" else LoRAConfig
    adapted = get_model(cls(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
                        model=copy.deepcopy(base)).eval()
    with torch.no_grad():  # a trained-looking adapter (B is zero at init)
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    rows = []
    for batch in (1, 32):
        ids = torch.randint(0, base.config.vocab_size, (batch, args.seq), generator=torch.Generator().manual_seed(0))
        row = {"batch": batch, **latencies({"base": base, "unmerged": adapted, "merged": merged}, ids, args.repeats)}
        row["unmerged_over_base"] = row["unmerged_s"] / row["base_s"]
        row["merged_over_base"] = row["merged_s"] / row["base_s"]
        rows.append(row)
    result = {"method": args.method, "shape": f"{layers}x{hidden}, seq {args.seq}", "threads": args.threads, "rows": rows}
    print(f"{'batch':>5} {'base ms':>9} {'unmerged ms':>12} {'merged ms':>10} {'unmerged/base':>14} {'merged/base':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {1000 * r['base_s']:9.1f} {1000 * r['unmerged_s']:12.1f} {1000 * r['merged_s']:10.1f} "
              f"{r['unmerged_over_base']:14.3f} {r['merged_over_base']:12.3f}")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
