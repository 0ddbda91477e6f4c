"""Training-step time and peak memory: full fine-tuning, peft and hf_lorax LoRA / DoRA, QLoRA / QDoRA.

Each configuration runs in its own process (so peak memory is its own): the model is loaded from the
same saved base, then ``--warmup`` + ``--steps`` optimizer steps (forward, backward, AdamW) run on a
fixed batch with ``torch.set_num_threads`` fixed; ``--repeats N`` runs N such processes per configuration in
alternating order and keeps the fastest. Reported: the median step time, and the peak tensor
bytes of one more step (weights and optimizer state included; see ``bench_utils`` for how it is measured
on CPU) beside the peak RSS. Prints a table and JSON with the ratios hf_lorax/peft and LoRA/full-FT.

    python scripts/bench_train.py --quick --json out.json        # < 2 minutes on 2 cores
    python scripts/bench_train.py --models gpt2 --json out.json  # 6 layers x 768, seq 256
    python scripts/bench_train.py --models gpt2 --configs peft_lora hf_lorax_lora --repeats 3
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import argparse
import json
import os
import statistics
import tempfile

from bench_utils import (
    cuda_available,
    emit,
    parse_checked,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_worker,
    step_memory,
    time_steps,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = ["full_ft", "peft_lora", "hf_lorax_lora", "peft_dora", "hf_lorax_dora", "hf_lorax_lora_bf16",
           "peft_qlora", "hf_lorax_qlora", "hf_lorax_qdora",
           # the fused eager node forced on / off (its default follows the device), and the logits-free loss off
           "hf_lorax_lora_fused", "hf_lorax_lora_unfused", "hf_lorax_dora_fused", "hf_lorax_dora_unfused",
           "hf_lorax_lora_logits"]
SHAPES = {  # (layers, hidden, heads, vocab, seq, batch)
    "quick": (2, 256, 4, 8192, 128, 4),
    "full": (6, 768, 12, 50257, 256, 4),
}
TARGETS = {"gpt2": ["c_attn", "c_proj"], "roberta": ["query", "value", "dense"]}


def build_base(model: str, shape, path: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForSequenceClassification

    layers, hidden, heads, vocab, seq, _ = shape
    torch.manual_seed(0)
    if model == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=seq))
    else:
        base = RobertaForSequenceClassification(RobertaConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
            vocab_size=vocab, max_position_embeddings=seq + 2, num_labels=2))
    base.save_pretrained(path)


def load_model(config_name: str, model: str, path: str, device: str, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import hf_lorax

    auto = AutoModelForCausalLM if model == "gpt2" else AutoModelForSequenceClassification
    task = "CAUSAL_LM" if model == "gpt2" else "SEQ_CLS"
    common = dict(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS[model], task_type=task)
    if config_name == "full_ft":
        return auto.from_pretrained(path).to(device)
    if config_name == "peft_qlora":  # peft's recipe: prepare_model_for_kbit_training upcasts to fp32
        from peft import prepare_model_for_kbit_training

        bnb_config = hf_lorax.QLoRAConfig(target_modules=TARGETS[model], compute_dtype="bfloat16").bnb_config()
        base = auto.from_pretrained(path, quantization_config=bnb_config, dtype=torch.bfloat16,
                                    device_map={"": device} if device != "cpu" else None)
        return get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
                              LoraConfig(**common))
    if config_name.startswith("peft_"):
        return get_peft_model(auto.from_pretrained(path).to(device),
                              LoraConfig(use_dora=config_name.endswith("dora"), **common))
    if config_name in ("hf_lorax_qlora", "hf_lorax_qdora"):
        config = hf_lorax.QLoRAConfig(base_model_name_or_path=path, use_dora=config_name.endswith("qdora"),
                                      compute_dtype="bfloat16", num_labels=2 if task == "SEQ_CLS" else None, **common)
        return hf_lorax.get_model(config, device_map={"": device} if device != "cpu" else None)
    cls = hf_lorax.DoRAConfig if "dora" in config_name else hf_lorax.LoRAConfig
    dtype = torch.bfloat16 if config_name.endswith("bf16") else torch.float32
    model = hf_lorax.get_model(cls(**common), model=auto.from_pretrained(path, dtype=dtype).to(device),
                               logits_free_loss=not config_name.endswith("_logits"))
    if config_name.endswith("fused"):
        from hf_lorax.layers import set_fused_path

        set_fused_path(model, not config_name.endswith("_unfused"))
    return model


def worker(args) -> dict:
    # imports are not part of the measured memory
    import bitsandbytes  # noqa: F401
    import peft.tuners.lora.bnb  # noqa: F401
    import torch
    from transformers import GPT2LMHeadModel, RobertaForSequenceClassification  # noqa: F401

    import hf_lorax.layers.bnb  # noqa: F401

    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "cuda" else "cpu"
    import gc

    gc.collect()
    before = rss_bytes()
    model = load_model(args.worker, args.model, args.base, device, args.dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    _, _, _, vocab, seq, batch = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids if args.model == "gpt2" else torch.randint(0, 2, (batch,), generator=g).to(device)
    loaded = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes() - before
    reset_peak_rss()

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup + args.steps, device)
    peak_rss = peak_rss_bytes() - before
    peak, _ = step_memory(step, model, optimizer, device)
    return {
        "config": args.worker, "model": args.model, "median_step_s": statistics.median(times[args.warmup:]),
        "peak_bytes": int(peak), "peak_rss_bytes": int(peak_rss), "loaded_bytes": int(loaded),
        "trainable_params": sum(p.numel() for p in params), "steps": args.steps,
    }


def ratios(rows: list[dict]) -> dict:
    by = {(r["model"], r["config"]): r for r in rows}
    out = {}
    for model in sorted({r["model"] for r in rows}):
        def ratio(a, b, key, model=model):
            ra, rb = by.get((model, a)), by.get((model, b))
            return ra[key] / rb[key] if ra and rb and rb[key] else None

        out[model] = {
            "lora_step_hf_lorax_over_peft": ratio("hf_lorax_lora", "peft_lora", "median_step_s"),
            "dora_step_hf_lorax_over_peft": ratio("hf_lorax_dora", "peft_dora", "median_step_s"),
            "dora_peak_mem_hf_lorax_over_peft": ratio("hf_lorax_dora", "peft_dora", "peak_bytes"),
            "lora_peak_mem_hf_lorax_over_peft": ratio("hf_lorax_lora", "peft_lora", "peak_bytes"),
            "lora_step_over_full_ft": ratio("hf_lorax_lora", "full_ft", "median_step_s"),
            "lora_peak_mem_over_full_ft": ratio("hf_lorax_lora", "full_ft", "peak_bytes"),
            "qlora_peak_mem_over_bf16_lora": ratio("hf_lorax_qlora", "hf_lorax_lora_bf16", "peak_bytes"),
            "qlora_step_over_bf16_lora": ratio("hf_lorax_qlora", "hf_lorax_lora_bf16", "median_step_s"),
            "qlora_peak_mem_hf_lorax_over_peft": ratio("hf_lorax_qlora", "peft_qlora", "peak_bytes"),
            "qlora_step_hf_lorax_over_peft": ratio("hf_lorax_qlora", "peft_qlora", "median_step_s"),
            "lora_step_fused_over_unfused": ratio("hf_lorax_lora_fused", "hf_lorax_lora_unfused", "median_step_s"),
            "lora_peak_mem_fused_over_unfused": ratio("hf_lorax_lora_fused", "hf_lorax_lora_unfused", "peak_bytes"),
            "dora_step_fused_over_unfused": ratio("hf_lorax_dora_fused", "hf_lorax_dora_unfused", "median_step_s"),
            "dora_peak_mem_fused_over_unfused": ratio("hf_lorax_dora_fused", "hf_lorax_dora_unfused", "peak_bytes"),
            "lora_step_logits_free_over_logits": ratio("hf_lorax_lora", "hf_lorax_lora_logits", "median_step_s"),
            "lora_peak_mem_logits_free_over_logits": ratio("hf_lorax_lora", "hf_lorax_lora_logits", "peak_bytes"),
        }
    return out


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import FRACTION, WHOLE_NON_NEGATIVE, WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run, < 2 minutes on 2 cores")
    parser.add_argument("--models", nargs="+", default=["gpt2", "roberta"], choices=["gpt2", "roberta"])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="processes per config, alternating order; the fastest counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the LoRA paper uses 0.1 on E2E)")
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parse_checked(parser, argv, {**dict.fromkeys(("steps", "repeats", "threads"), WHOLE_POSITIVE),
                                        "warmup": WHOLE_NON_NEGATIVE, "dropout": FRACTION})
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return {}
    shape = "quick" if args.quick else "full"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = os.path.join(tmp, model)
            build_base(model, SHAPES[shape], path)
            runs = {config: [] for config in args.configs}
            for repeat in range(args.repeats):  # alternate the order, so drift hits every config alike
                for config in args.configs if repeat % 2 == 0 else args.configs[::-1]:
                    runs[config].append(run_worker(__file__, [
                        "--worker", config, "--model", model, "--base", path, "--shape", shape, "--steps",
                        str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--dropout",
                        str(args.dropout), "--device", args.device]))
                    print(f"  {model:<8} {config:<20} {runs[config][-1]['median_step_s'] * 1000:9.1f} ms  "
                          f"{runs[config][-1]['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
            # the fastest repeat: other processes only ever slow a run down; tensor bytes do not vary
            rows += [{**min(rs, key=lambda r: r["median_step_s"]), "repeat_step_s": [r["median_step_s"] for r in rs]}
                     for rs in runs.values()]
    layers, hidden, heads, vocab, seq, batch = SHAPES[shape]
    result = {"device": args.device, "threads": args.threads, "shape": dict(layers=layers, hidden=hidden, vocab=vocab,
              seq=seq, batch=batch), "lora_dropout": args.dropout, "r": 8, "steps": args.steps, "repeats": args.repeats, "rows": rows,
              "ratios": ratios(rows)}
    print_table(result)
    return emit(result, args.json, {"ratios": result["ratios"]})


def print_table(result: dict) -> None:
    print(f"\n{'model':<8} {'config':<20} {'step ms':>9} {'peak MiB':>9} {'peak RSS MiB':>13} {'trainable':>11}")
    for r in result["rows"]:
        print(f"{r['model']:<8} {r['config']:<20} {r['median_step_s'] * 1000:9.1f} {r['peak_bytes'] / 2**20:9.1f} "
              f"{r['peak_rss_bytes'] / 2**20:13.1f} {r['trainable_params']:>11,}")
    for model, rs in result["ratios"].items():
        print(f"\n{model} ratios")
        for name, value in rs.items():
            print(f"  {name:<36} {value:.3f}" if value is not None else f"  {name:<36} -")


if __name__ == "__main__":
    main()
