"""E2E training step: full-logits label-smoothed loss (the Trainer recipe) vs hf_lorax's logits-free loss.

Both configurations train the same adapter — hf_lorax LoRA r=4, alpha 32, dropout 0.1 on the q and v
slices of every ``c_attn`` (plain peft cannot slice a fused projection, so the adapter is the same and only
the loss differs) — on the same GPT-2-shaped model (random init from config, vocab 50,257; nothing is
downloaded) and the same batches of 8 E2E examples (MR prefix + reference, loss on the reference only):

* ``full_logits``: ``model(input_ids, attention_mask)`` computes ``batch x seq x 50,257`` logits, then
  ``transformers``' ``LabelSmoother(0.1)(outputs, labels, shift_labels=True)`` — what ``Trainer`` with
  ``label_smoothing_factor=0.1`` does;
* ``logits_free``: ``model(input_ids, attention_mask, labels)`` with the smoothing set on the model (what
  ``TargetedLossTrainer`` trains with): the head's matmul and the cross-entropy run in row chunks
  (``hf_lorax.loss.LinearCrossEntropy``), no ``tokens x vocab`` logits are held.

Batches come from ``../shared/data/e2e/devset.csv`` when present (else generated MRs), encoded exactly as
``run_e2e.py`` does with a byte-level BPE trained offline on those sentences (GPT-2's scheme, a smaller
vocabulary than GPT-2's, so token counts differ a little from GPT-2's BPE). Each configuration runs in its
own process, ``--warmup`` + ``--steps`` optimizer steps (forward, backward, AdamW), repeated ``--repeats``
times in alternating order. Reported: tokens/s (median over the measured steps of non-padding tokens / step
time, which shrugs off steps slowed by other processes; best repeat); the peak tensor bytes of one more step
on the longest batch, weights and optimizer state included, and the part of it the step itself allocates
(see ``bench_utils`` for how this is measured on CPU); the peak RSS; and the first step's loss of each
(equal to ~1e-6: same seed, same dropout masks). Prints a table and JSON.

    python scripts/bench_e2e.py --quick --json out.json   # 2 layers x 768: < 2 minutes on 2 cores
    python scripts/bench_e2e.py --json out.json           # 6 layers x 768
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from bench_utils import (
    cuda_available,
    emit,
    parse_checked,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_worker,
    step_memory,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ["full_logits", "logits_free"]
SHAPES = {"quick": dict(layers=2, hidden=768, heads=12), "full": dict(layers=6, hidden=768, heads=12)}
VOCAB = 50257
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "e2e", "devset.csv")


def _rows(data: str, n: int) -> list[tuple[str, str]]:
    from hf_lorax_paper.tasks.e2e_data import read_csv

    if os.path.isfile(data):
        split = read_csv(data)
        rows = list(zip(split.mrs, split.refs))
    else:  # a stand-in with E2E's shape when the data folder is absent
        rng = random.Random(0)
        rows = []
        for i in range(400):
            name, kind = f"Place {i}", rng.choice(["pub", "coffee shop", "restaurant"])
            mr = f"name[{name}], eatType[{kind}], area[{rng.choice(['riverside', 'city centre'])}], priceRange[£20-25]"
            rows.append((mr, f"{name} is a {kind} with prices of £20-25, popular with families near the river."))
    random.Random(0).shuffle(rows)
    return rows[:n]


def build_assets(data: str, shape: str, batch: int, n_batches: int, workdir: str) -> dict:
    """Save the model config, and the padded batches both configurations train on."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    from hf_lorax_paper.tasks.e2e import CausalLMCollator
    from hf_lorax_paper.tasks.e2e_data import encode_example, format_mr, tokenize_text

    rows = _rows(data, batch * n_batches)
    corpus = [format_mr(m) for m, _ in rows] + [" " + tokenize_text(r) for _, r in rows]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    collate = CausalLMCollator(eos)
    batches = [collate([encode_example(tokenizer, m, r, 512) for m, r in rows[i:i + batch]])
               for i in range(0, len(rows), batch)]
    torch.save(batches, os.path.join(workdir, "batches.pt"))
    s = SHAPES[shape]
    config = GPT2Config(n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], vocab_size=VOCAB, n_positions=512,
                        bos_token_id=eos, eos_token_id=eos)
    config.save_pretrained(workdir)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    labelled = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    return {"rows": len(rows), "batches": len(batches), "tokenizer_vocab": len(tokenizer), "tokens": tokens,
            "labelled_tokens": labelled, "padded_positions": padded, "data": data if os.path.isfile(data) else "generated"}


def worker(args) -> dict:
    import gc

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.trainer_pt_utils import LabelSmoother

    import hf_lorax
    from hf_lorax.loss import set_label_smoothing

    torch.set_num_threads(args.threads)
    device = args.device
    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(os.path.join(args.workdir, "batches.pt"))]
    gc.collect()
    before = rss_bytes()
    torch.manual_seed(0)  # the same random weights in every process; built in memory (a load would mmap lazily)
    base = GPT2LMHeadModel(GPT2Config.from_pretrained(args.workdir)).to(device)
    model = hf_lorax.get_model(hf_lorax.LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=32, lora_dropout=0.1,
                                                   target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}),
                               model=base)
    model.train()
    set_label_smoothing(model, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    smoother = LabelSmoother(epsilon=0.1)

    torch.manual_seed(1)  # same dropout masks in both configurations

    def step(batch: dict) -> float:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if args.worker == "full_logits":
            loss = smoother(model(**inputs), batch["labels"], shift_labels=True)
        else:
            loss = model(**inputs, labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    reset_peak_rss()
    times, losses, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        losses.append(step(batch))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(int(batch["attention_mask"].sum()))
    peak_rss = peak_rss_bytes() - before
    longest = max(batches, key=lambda b: b["input_ids"].numel())
    peak, step_peak = step_memory(lambda: step(longest), model, optimizer, device)
    return {"config": args.worker, "median_step_s": statistics.median(times[args.warmup:]),
            "tokens_per_s": statistics.median(n / t for n, t in zip(tokens[args.warmup:], times[args.warmup:])),
            "peak_bytes": int(peak), "step_peak_bytes": int(step_peak), "peak_rss_bytes": int(peak_rss),
            "first_loss": losses[0], "trainable_params": sum(p.numel() for p in params)}


def _run_worker(config: str, args, workdir: str) -> dict:
    return run_worker(__file__, ["--worker", config, "--workdir", workdir, "--steps", str(args.steps),
                                 "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device])


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import WHOLE_NON_NEGATIVE, WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers x 768, fewer steps: < 2 minutes on 2 cores")
    parser.add_argument("--data", default=DEFAULT_DATA, help="an E2E mr,ref CSV (default: ../shared/data/e2e/devset.csv)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parse_checked(parser, argv, {**dict.fromkeys(("batch", "steps", "repeats", "threads"), WHOLE_POSITIVE),
                                        "warmup": WHOLE_NON_NEGATIVE})
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return {}
    shape = "quick" if args.quick else "full"
    args.steps = args.steps or (4 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 2)
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as workdir:
        data = build_assets(args.data, shape, args.batch, args.warmup + args.steps, workdir)
        for repeat in range(args.repeats):
            for config in CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]:  # alternate, so drift hits both
                runs[config].append(_run_worker(config, args, workdir))
                r = runs[config][-1]
                print(f"  {config:<12} {r['tokens_per_s']:9.0f} tok/s  {r['median_step_s'] * 1000:8.1f} ms/step  "
                      f"step peak {r['step_peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    rows = [max(rs, key=lambda r: r["tokens_per_s"]) for rs in runs.values()]  # tensor bytes do not vary
    by = {r["config"]: r for r in rows}
    full, free = by["full_logits"], by["logits_free"]
    result = {
        "device": args.device, "threads": args.threads, "shape": {**SHAPES[shape], "vocab": VOCAB}, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "data": data, "rows": rows,
        "ratios": {
            "tokens_per_s_logits_free_over_full": free["tokens_per_s"] / full["tokens_per_s"],
            "peak_mem_logits_free_over_full": free["peak_bytes"] / full["peak_bytes"],
            "step_peak_mem_logits_free_over_full": free["step_peak_bytes"] / full["step_peak_bytes"],
        },
        "first_loss_difference": abs(free["first_loss"] - full["first_loss"]),
    }
    print_table(result)
    return emit(result, args.json, {"ratios": result["ratios"], "first_loss_difference": result["first_loss_difference"]})


def print_table(result: dict) -> None:
    d = result["data"]
    print(f"\n{result['device']}, {result['threads']} threads, {result['shape']['layers']} layers x "
          f"{result['shape']['hidden']}, vocab {result['shape']['vocab']:,}, batch {result['batch']}; "
          f"{d['tokens']:,} tokens ({d['labelled_tokens']:,} labelled) in {d['batches']} batches from {d['data']}")
    print(f"{'config':<12} {'tokens/s':>9} {'ms/step':>9} {'peak MiB':>9} {'step peak MiB':>14} {'peak RSS MiB':>13} "
          f"{'first loss':>11}")
    for r in result["rows"]:
        print(f"{r['config']:<12} {r['tokens_per_s']:9.0f} {r['median_step_s'] * 1000:9.1f} {r['peak_bytes'] / 2**20:9.1f} "
              f"{r['step_peak_bytes'] / 2**20:14.1f} {r['peak_rss_bytes'] / 2**20:13.1f} {r['first_loss']:11.5f}")
    for name, value in result["ratios"].items():
        print(f"  {name:<36} {value:.3f}")


if __name__ == "__main__":
    main()
