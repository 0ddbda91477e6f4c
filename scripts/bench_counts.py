"""Kernel launches, autograd nodes and device syncs of a training step, counted on any device (CPU included).

What makes a small eager GPU step slow is how many kernels it launches and whether it waits for the device, and
both can be counted without a GPU. Counted with a ``TorchDispatchMode`` (every ATen op that reaches a kernel):

* **kernel-like ops**: ATen ops other than views, aliases and bare allocations;
* **device syncs**: ops whose CUDA kernels make the host wait for the device (``nonzero``, ``.item()``, boolean
  masking, ``unique``, ...), each with the first source line outside torch that issued it;
* **autograd nodes**: the backward graph's nodes (``AccumulateGrad`` leaves not counted).

On CPU, ``F.dropout`` decomposes into a Bernoulli draw, a multiply and a divide, where CUDA runs one
``native_dropout`` kernel; the counting routes it to ``native_dropout`` as CUDA does (``--cpu_dropout`` keeps
the CPU route). hf_lorax's loss is counted on its CUDA route too (every row, unlabelled ones with weight 0; on a
CPU it gathers the labelled rows, which waits for no device there). Rows: full fine-tuning, peft and hf_lorax, LoRA and DoRA, dropout 0 and 0.1:

* ``layer``: one adapted ``Linear(1024, 1024)``, forward and backward (input gradient included), r=16;
* ``step``: a whole training step (forward, loss, backward, ``AdamW(foreach=True)``, ``zero_grad``) of a GPT-2
  (4 layers x 256, vocab 8192, sequence 128, batch 4, r=16 on ``c_attn``, ``c_proj``, ``c_fc``);
* ``loss``: the causal-LM loss alone at GPT-2-medium's geometry (4,096 rows, hidden 1024, vocab 50,257; forward
  and backward from the last hidden state): transformers' (LM head, then its loss on the logits) against
  hf_lorax's logits-free loss, with the allocator-level peak memory of each.

    python scripts/bench_counts.py --json docs/bench_counts_cpu.json
    python scripts/bench_counts.py --quick          # small shapes: checks the suite runs
"""

from __future__ import annotations

import collections
import os
import traceback
from contextlib import contextmanager

import torch
from bench_utils import cpu_step_peak_bytes, emit, parse_checked
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ATen ops that launch no kernel: views, aliases, metadata, bare allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "alias", "detach",
    "squeeze", "unsqueeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_reshape_alias",
    "unflatten", "flatten", "view_as", "expand_as", "numpy_T", "_has_compatible_shallow_copy_type",
}
# ATen ops whose CUDA kernels make the host wait for the device (their output size or value is data-dependent).
SYNCS = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
         "unique_dim", "is_nonzero", "equal", "bincount", "repeat_interleave", "masked_scatter"}
# hf_lorax rows switch the fused autograd node on (set_fused_path); hf_lorax-unfused rows keep the default, peft's
# forward (with hf_lorax's DoRA variant).
CONFIGS = ("full", "peft_lora", "hf_lorax_lora", "hf_lorax-unfused_lora", "peft_dora", "hf_lorax_dora",
           "hf_lorax-unfused_dora")


class OpCounter(TorchDispatchMode):
    """Counts kernel-like ATen ops by name, and device-sync ops by name and issuing source line."""

    def __init__(self):
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not getattr(func, "is_view", False):
            self.kernels[name] += 1
        if name in SYNCS or (name in ("index", "index_put", "index_put_") and _has_bool_index(args)):
            where = _issuing_line()
            if where != HOST_SIDE:
                self.syncs[f"{name} @ {where}"] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        return {"kernel_ops": sum(self.kernels.values()), "device_syncs": sum(self.syncs.values()),
                "sync_sources": dict(self.syncs), "by_op": dict(self.kernels.most_common())}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


HOST_SIDE = "host-side"  # torch.optim's step counters: CPU scalars (``capturable=False``) on CUDA too, no sync


def _issuing_line() -> str:
    """The innermost frame outside torch (and this file): the library line that issued the op; ``backward``
    when the autograd engine ran it (no Python frame), :data:`HOST_SIDE` for the optimizer's step counters."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/optim/" in path:
            return HOST_SIDE
        if "/torch/" not in path and not path.endswith("bench_counts.py"):
            return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno}"
    return "backward"


def autograd_nodes(output: torch.Tensor) -> int:
    """Nodes of the backward graph that produced ``output`` (``AccumulateGrad`` leaves not counted)."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(1 for n in seen if type(n).__name__ != "AccumulateGrad")


@contextmanager
def dropout_as_on_cuda(enabled: bool = True):
    """Route ``F.dropout`` to ``native_dropout`` (one kernel, as on CUDA) instead of CPU's decomposition, and
    hf_lorax's loss through every row (as on CUDA) instead of its CPU route, the labelled rows only."""
    import hf_lorax.loss

    original, labelled_only = nn.functional.dropout, hf_lorax.loss.LABELLED_ROWS_ONLY_ON

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        return torch.native_dropout(input, p, True)[0]

    if enabled:
        nn.functional.dropout, hf_lorax.loss.LABELLED_ROWS_ONLY_ON = dropout, ()
    try:
        yield
    finally:
        nn.functional.dropout, hf_lorax.loss.LABELLED_ROWS_ONLY_ON = original, labelled_only


def adapt(config: str, base: nn.Module, targets: list[str], r: int, dropout: float, task_type: str | None):
    """``base`` as the configuration trains it: itself (full), peft's or hf_lorax's LoRA / DoRA."""
    if config == "full":
        return base
    library, method = config.rsplit("_", 1)
    common = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(use_dora=method == "dora", **common))
    import hf_lorax
    from hf_lorax.layers import set_fused_path

    cls = hf_lorax.DoRAConfig if method == "dora" else hf_lorax.LoRAConfig
    model = hf_lorax.get_model(cls(**common), model=base)
    set_fused_path(model, library == "hf_lorax")  # the fused node; -unfused: the default, peft's forward
    return model


class OneLinear(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


def count_layer(config: str, dropout: float, width: int, tokens: int, cuda_dropout: bool) -> dict:
    """One adapted linear, forward and backward with the input's gradient, as inside a model."""
    torch.manual_seed(0)
    model = adapt(config, OneLinear(width), ["proj"], 16, dropout, None).train()
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)
    model(x).backward(grad)  # warm-up: caches (DoRA's ‖W‖²) filled as in every later step
    counter = OpCounter()
    with dropout_as_on_cuda(cuda_dropout), counter:
        out = model(x)
        nodes = autograd_nodes(out)
        out.backward(grad)
    return {**counter.summary(), "autograd_nodes": nodes}


def gpt2(layers: int, hidden: int, vocab: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=seq))


def count_step(config: str, dropout: float, shape: dict, cuda_dropout: bool) -> dict:
    """A whole training step: forward with labels, backward, ``AdamW(foreach=True)``, ``zero_grad``."""
    model = adapt(config, gpt2(shape["layers"], shape["hidden"], shape["vocab"], shape["seq"]),
                  ["c_attn", "c_proj", "c_fc"], 16, dropout, "CAUSAL_LM").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    with dropout_as_on_cuda(cuda_dropout):
        step()  # warm-up: optimizer state created
    counter = OpCounter()
    with dropout_as_on_cuda(cuda_dropout), counter:
        step()
    return counter.summary()


def count_loss(kind: str, rows: int, hidden: int, vocab: int) -> dict:
    """The causal-LM loss from the last hidden state: transformers' (head, logits, loss) or hf_lorax's."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(1, rows, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (1, rows), generator=gen)
    labels[:, : rows // 4] = -100  # a masked prompt, as in instruction tuning and E2E

    if kind == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_fn():
            return ForCausalLMLoss(head(states), labels, vocab_size=vocab)
    else:
        from hf_lorax.loss import causal_lm_loss_from_hidden

        def loss_fn():
            return causal_lm_loss_from_hidden(states, head, labels)

    def step():
        loss = loss_fn()
        loss.backward()
        states.grad = head.weight.grad = None
        return loss

    with dropout_as_on_cuda():
        step()
        peak = cpu_step_peak_bytes(step)
        counter = OpCounter()
        with counter:
            step()
    return {**counter.summary(), "peak_bytes": peak}


SHAPES = {
    "full": {"layer": (1024, 512), "step": dict(layers=4, hidden=256, vocab=8192, seq=128, batch=4),
             "loss": (4096, 1024, 50257)},
    "quick": {"layer": (64, 32), "step": dict(layers=2, hidden=32, vocab=128, seq=16, batch=2),
              "loss": (64, 32, 256)},
}


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import FRACTION

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (checks the suite runs)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.1])
    parser.add_argument("--cpu_dropout", action="store_true", help="count CPU's dropout decomposition")
    parser.add_argument("--skip_loss", action="store_true")
    parser.add_argument("--json")
    args = parse_checked(parser, argv, {"dropouts": FRACTION})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shape = SHAPES["quick" if args.quick else "full"]
    cuda_dropout = not args.cpu_dropout
    rows = []
    for dropout in args.dropouts:
        for config in args.configs:
            width, tokens = shape["layer"]
            layer = count_layer(config, dropout, width, tokens, cuda_dropout)
            step = count_step(config, dropout, shape["step"], cuda_dropout)
            rows.append({"config": config, "dropout": dropout, "layer": layer, "step": step})
    loss = {} if args.skip_loss else {kind: count_loss(kind, *shape["loss"]) for kind in ("transformers", "hf_lorax")}
    result = {"shapes": shape, "dropout_route": "cuda" if cuda_dropout else "cpu", "device": "cpu",
              "rows": rows, "loss": loss, "ratios": ratios(rows, loss)}
    print_table(result)
    return emit(result, args.json, summary=result["ratios"])


def ratios(rows: list[dict], loss: dict) -> dict:
    by = {(r["config"], r["dropout"]): r for r in rows}
    out = {}
    for (config, dropout), row in by.items():
        if not config.startswith("hf_lorax"):
            continue
        peft = by.get(("peft_" + config.rsplit("_", 1)[1], dropout))
        if peft:
            key = f"{config}/peft@p={dropout}"
            out[f"{key} step kernel ops"] = row["step"]["kernel_ops"] / peft["step"]["kernel_ops"]
            out[f"{key} layer kernel ops"] = row["layer"]["kernel_ops"] / peft["layer"]["kernel_ops"]
    if loss:
        t, h = loss["transformers"], loss["hf_lorax"]
        out["loss hf_lorax/transformers kernel ops"] = h["kernel_ops"] / t["kernel_ops"]
        out["loss hf_lorax/transformers peak"] = h["peak_bytes"] / t["peak_bytes"]
    return out


def print_table(result: dict) -> None:
    print("| config | dropout | layer kernel ops | layer autograd nodes | layer syncs | step kernel ops | step syncs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['config']} | {r['dropout']} | {r['layer']['kernel_ops']} | {r['layer']['autograd_nodes']} | "
              f"{r['layer']['device_syncs']} | {r['step']['kernel_ops']} | {r['step']['device_syncs']} |")
    for kind, row in result["loss"].items():
        print(f"loss {kind}: {row['kernel_ops']} kernel ops, {row['device_syncs']} syncs, "
              f"peak {row['peak_bytes'] / 2**20:.0f} MiB; syncs from {row['sync_sources']}")
    for r in result["rows"]:
        if r["step"]["device_syncs"]:
            print(f"step syncs, {r['config']} p={r['dropout']}: {r['step']['sync_sources']}")


if __name__ == "__main__":
    main()
