"""GPU training-step suite: full fine-tuning / peft / hf_lorax x LoRA, DoRA, QLoRA, QDoRA, eager and compiled.

The recipe people run: base weights bf16 (full fine-tuning: fp32 master weights), adapters fp32,
``torch.autocast(bfloat16)``, AdamW on the trainable parameters, no gradient checkpointing. Each
configuration runs in its own process (``--repeats`` processes each, in alternating order): ``--warmup``
steps, then ``--steps`` timed steps. Reported per row: median ms/step, tokens/s, model FLOPs utilization and
``torch.cuda.max_memory_allocated`` (on CPU: the allocator-level peak of ``bench_utils``), plus ratios against
peft and full fine-tuning within the same run. JSON (``--json``) and a table.

FLOPs per token (counted, not measured), with N the parameters of the matmuls (the LM head included, the
embedding lookups not), L layers, s the sequence length, d the hidden size:

* full fine-tuning: ``6N + 12·L·s·d`` (forward 2N; backward 4N: input and weight gradients; attention
  scores and values ``4·L·s·d`` forward, twice that backward);
* LoRA / DoRA / QLoRA: ``4N + 12·L·s·d + 6·N_adapter`` (frozen weights need no weight gradient).

MFU = FLOPs/token × tokens/s ÷ peak: ``--peak_tflops`` (default 989, the H100 SXM dense bf16 figure, on CUDA;
none on CPU, where MFU is not reported).

    python scripts/bench_gpu.py --shapes gpt2-medium roberta-large llama-1b --modes eager compiled --repeats 3
    python scripts/bench_gpu.py --quick --json out.json      # tiny shapes, CPU-sized: checks the suite runs
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import argparse
import os
import statistics
import tempfile

from bench_utils import cuda_available, emit, parse_checked, run_worker, step_memory, time_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("lora", "dora", "qlora", "qdora")
CONFIGS = ["full", *(f"{lib}_{m}" for m in METHODS for lib in ("peft", "hf_lorax"))]
# hf_lorax with its fused eager node off (peft's forward, the default), against the hf_lorax rows, which switch it on
# (hf_lorax.layers.set_fused_path): what the node is worth, and so whether it should become the default on CUDA.
# Compiled steps never use the fused node, so these rows run in eager mode only.
UNFUSED = [f"hf_lorax-unfused_{m}" for m in METHODS]
# name: (family, layers, hidden, heads, kv_heads, intermediate, vocab, seq, batch, r, targets)
SHAPES = {
    "gpt2-medium": ("gpt2", 24, 1024, 16, 16, 4096, 50257, 512, 8, 16, ["c_attn", "c_proj", "c_fc"]),
    "roberta-large": ("roberta", 24, 1024, 16, 16, 4096, 50265, 128, 32, 8, ["query", "value"]),
    "llama-1b": ("llama", 16, 2048, 32, 8, 8192, 128256, 512, 4, 16,
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "quick-gpt2": ("gpt2", 2, 128, 4, 4, 512, 4096, 64, 2, 8, ["c_attn", "c_proj", "c_fc"]),
    "quick-llama": ("llama", 2, 128, 4, 2, 256, 4096, 64, 2, 8, ["q_proj", "v_proj", "down_proj"]),
}


def build_base(shape: str, path: str) -> None:
    import torch
    import transformers as tf

    family, layers, hidden, heads, kv, inter, vocab, seq, _, _, _ = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=inter,
                                                 vocab_size=vocab, n_positions=seq))
    elif family == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
            vocab_size=vocab, max_position_embeddings=seq + 2, num_labels=2))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
            intermediate_size=inter, vocab_size=vocab, max_position_embeddings=seq))
    model.save_pretrained(path)


def load_model(config: str, shape: str, path: str, device: str):
    """One configuration of the recipe: bf16 frozen base (4-bit for q*), fp32 adapters; fp32 for full FT."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import hf_lorax

    family, *_, r, targets = SHAPES[shape]
    task = "SEQ_CLS" if family == "roberta" else "CAUSAL_LM"
    auto = tf.AutoModelForSequenceClassification if task == "SEQ_CLS" else tf.AutoModelForCausalLM
    if config == "full":
        return auto.from_pretrained(path, dtype=torch.float32).to(device)
    library, method = config.rsplit("_", 1)
    common = dict(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task)
    quantized = method.startswith("q")
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    if library.startswith("hf_lorax"):
        if quantized:
            cfg = hf_lorax.QLoRAConfig(base_model_name_or_path=path, use_dora=method == "qdora",
                                       num_labels=2 if task == "SEQ_CLS" else None, **common)
            model = hf_lorax.get_model(cfg, **placement)
        else:
            cls = hf_lorax.DoRAConfig if method == "dora" else hf_lorax.LoRAConfig
            model = hf_lorax.get_model(cls(**common), model=auto.from_pretrained(path, dtype=torch.bfloat16).to(device))
    else:
        if quantized:
            bnb = hf_lorax.QLoRAConfig(target_modules=targets).bnb_config()
            base = auto.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16, **placement)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        else:
            base = auto.from_pretrained(path, dtype=torch.bfloat16).to(device)
        model = get_peft_model(base, LoraConfig(use_dora=method in ("dora", "qdora"), **common))
    if library.startswith("hf_lorax"):
        from hf_lorax.layers import set_fused_path

        set_fused_path(model, library == "hf_lorax")
    for p in model.parameters():  # adapters (and a task head) train in fp32
        if p.requires_grad:
            p.data = p.data.float()
    return model


def flops_per_token(model, shape: str, full: bool) -> float:
    _, layers, hidden, *_ = SHAPES[shape]
    seq = SHAPES[shape][7]
    matmul = sum(_logical_numel(m) for m in model.modules() if _is_base_matmul(m))
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    attention = 12 * layers * seq * hidden
    return 6 * matmul + attention if full else 4 * matmul + attention + 6 * adapter


def _is_base_matmul(module) -> bool:
    name = type(module).__name__
    return name in ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt") and not type(module).__module__.startswith(
        ("peft", "hf_lorax")) and not _is_adapter_factor(module)


def _is_adapter_factor(module) -> bool:
    return getattr(module, "_is_lora_factor", False)


def _logical_numel(module) -> int:
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        import torch

        return int(torch.Size(state.shape).numel())
    return module.weight.numel()


def worker(args) -> dict:
    import torch

    device = "cuda" if cuda_available() and not args.cpu else "cpu"
    model = load_model(args.worker, args.shape, args.base, device)
    for module in model.modules():  # mark LoRA's own nn.Linear factors, so FLOPs count the base only
        for container in ("lora_A", "lora_B"):
            for factor in getattr(module, container, {}).values() if hasattr(module, container) else ():
                factor._is_lora_factor = True
    model.train()
    family, *_, vocab, seq, batch, _, _ = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids if family != "roberta" else torch.randint(0, 2, (batch,), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    forward = torch.compile(model) if args.mode == "compiled" else model

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup + args.steps, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak, _ = step_memory(step, model, optimizer, device)
    median = statistics.median(times[args.warmup:])
    tokens_per_s = batch * seq / median
    flops = flops_per_token(model, args.shape, full=args.worker == "full")
    peak_tflops = args.peak_tflops if args.peak_tflops else (989.0 if device == "cuda" else None)
    return {
        "config": args.worker, "shape": args.shape, "mode": args.mode, "device": device,
        "median_ms": 1000 * median, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
        "mfu": flops * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None, "peak_bytes": int(peak),
        "trainable_params": sum(p.numel() for p in params), "steps": args.steps,
    }


def ratios(rows: list[dict]) -> dict:
    """Per shape and mode: hf_lorax/peft and hf_lorax/full step time and peak memory, medians of the repeats."""
    out = {}
    for shape, mode in sorted({(r["shape"], r["mode"]) for r in rows}):
        med = {c: statistics.median(r["median_ms"] for r in rows if (r["shape"], r["mode"], r["config"]) == (shape, mode, c))
               for c in {r["config"] for r in rows if (r["shape"], r["mode"]) == (shape, mode)}}
        mem = {r["config"]: r["peak_bytes"] for r in rows if (r["shape"], r["mode"]) == (shape, mode)}
        entry = {}
        for m in METHODS:
            ours, theirs = f"hf_lorax_{m}", f"peft_{m}"
            if ours in med and theirs in med:
                entry[f"{m}_step_hf_lorax_over_peft"] = med[ours] / med[theirs]
                entry[f"{m}_peak_mem_hf_lorax_over_peft"] = mem[ours] / mem[theirs]
            if ours in med and "full" in med:
                entry[f"{m}_step_hf_lorax_over_full"] = med[ours] / med["full"]
            if ours in med and f"hf_lorax-unfused_{m}" in med:
                entry[f"{m}_step_fused_over_unfused"] = med[ours] / med[f"hf_lorax-unfused_{m}"]
                entry[f"{m}_peak_mem_fused_over_unfused"] = mem[ours] / mem[f"hf_lorax-unfused_{m}"]
            if ours in med and "hf_lorax_lora" in med and m != "lora":
                entry[f"{m}_over_lora_hf_lorax"] = med[ours] / med["hf_lorax_lora"]
        out[f"{shape}/{mode}"] = entry
    return out


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import POSITIVE, WHOLE_NON_NEGATIVE, WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2-medium", "roberta-large", "llama-1b"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--configs", nargs="+", default=CONFIGS + UNFUSED, choices=CONFIGS + UNFUSED)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration, alternating")
    parser.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak for MFU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, eager, 1 warm-up + 2 steps")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parse_checked(parser, argv, {"warmup": WHOLE_NON_NEGATIVE, "steps": WHOLE_POSITIVE, "repeats": WHOLE_POSITIVE,
                                        "peak_tflops": POSITIVE})
    if args.worker:
        import json

        print("RESULT " + json.dumps(worker(args)))
        return {}
    if args.quick:
        args.shapes = [s for s in args.shapes if s.startswith("quick")] or ["quick-gpt2", "quick-llama"]
        args.modes, args.warmup, args.steps = ["eager"], 1, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            base = os.path.join(tmp, shape)
            build_base(shape, base)
            for mode in args.modes:
                for repeat in range(args.repeats):
                    configs = [c for c in args.configs if mode == "eager" or c not in UNFUSED]
                    order = configs if repeat % 2 == 0 else list(reversed(configs))  # alternate
                    for config in order:
                        worker_args = ["--worker", config, "--shape", shape, "--mode", mode, "--base", base,
                                       "--warmup", str(args.warmup), "--steps", str(args.steps)]
                        worker_args += ["--cpu"] if args.cpu else []
                        worker_args += ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else []
                        rows.append({**run_worker(__file__, worker_args), "repeat": repeat})
    result = {"rows": rows, "ratios": ratios(rows), "warmup": args.warmup, "steps": args.steps,
              "repeats": args.repeats}
    print_table(result)
    return emit(result, args.json, summary=result["ratios"])


def print_table(result: dict) -> None:
    print(f"{'shape/mode':<26} {'config':<24} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak MiB':>9}")
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['shape'] + '/' + r['mode']:<26} {r['config']:<24} {r['median_ms']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{mfu:>6} {r['peak_bytes'] / 2**20:9.0f}")
    for key, entry in result["ratios"].items():
        print(key, " ".join(f"{k}={v:.2f}" for k, v in entry.items()))


if __name__ == "__main__":
    main()
