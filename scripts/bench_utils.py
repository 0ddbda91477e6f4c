"""What the benchmark scripts share: memory measurement, one process per configuration, output.

Peak memory is measured as tensor bytes, the same quantity on both devices: on CUDA
``torch.cuda.max_memory_allocated``; on CPU, where PyTorch keeps no such counter, it is rebuilt from the
allocator's events that ``torch.profiler(profile_memory=True)`` records during one step, added to the bytes
of the tensors alive before that step (weights, buffers, optimizer state). Peak RSS is reported beside it,
but glibc keeps freed pages, so RSS hides temporaries that are freed early.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable


def parse_checked(parser, argv, rules: dict) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with each number (each item of a list flag) checked against its rule, as the
    training scripts check theirs (:mod:`hf_lorax_paper.arguments`): a bad one is ``parser.error``, one line
    naming the flag and its range with ``hf_lorax.cli.OneLineArgumentParser``, exit 2, before anything runs."""
    from hf_lorax_paper.arguments import check_values

    args = parser.parse_args(argv)
    try:
        for name, rule in rules.items():
            value = getattr(args, name)
            for item in value if isinstance(value, list) else [value]:
                check_values({name: item}, {name: rule})
    except ValueError as exc:
        parser.error(str(exc))
    return args


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_tensor_bytes(model, optimizer) -> int:
    """Bytes of the distinct storages held by the model (parameters, buffers) and the optimizer state."""
    import torch

    storages = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def cpu_step_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of tensor bytes allocated during ``step()`` above what was alive before it (CPU).

    The running sum of the allocator's allocation (+) and free (-) events, in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def step_memory(step: Callable[[], object], model, optimizer, device: str) -> tuple[int, int]:
    """``(peak tensor bytes during one more step, of which allocated by the step)``.

    Call it after warm-up steps, so that the optimizer state exists, as it does in a long run.
    """
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak, peak - before
    before = live_tensor_bytes(model, optimizer)
    added = cpu_step_peak_bytes(step)
    return before + added, added


def time_steps(step: Callable[[], object], n: int, device: str) -> list[float]:
    """Wall time of each of ``n`` calls of ``step`` (synchronizing CUDA after each, so the time is the GPU's)."""
    import torch

    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def run_worker(script: str, args: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process (so its memory is its own); it prints ``RESULT {json}``."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def emit(result: dict, json_path: str | None, summary: dict | None = None) -> dict:
    """Print the JSON summary (the whole result by default) and write the whole result to ``json_path``."""
    print(json.dumps(result if summary is None else summary))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
