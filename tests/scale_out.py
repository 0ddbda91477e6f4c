"""Shared by the scale-out tests: run ``tests/scripts/scale_job.py`` in one or two processes and compare what it
wrote. A torchrun launch trains several engines one after the other (one process group, one start-up of torch and
transformers per process): :data:`TORCH` for tests/test_scale_out_torch.py, :data:`ZERO` for
tests/test_scale_out_deepspeed.py. One process trains the references every engine is compared with
(:data:`ONE_PROCESS`), once per test session, shared by the xdist workers (:func:`one_process_run`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
JOB = TESTS / "scripts" / "scale_job.py"
METHODS = ("lora", "dora", "qlora")
# engine -> methods, in the order they run (gpt2: LoRA on a logits-free GPT-2 causal LM, under fully_shard only)
ONE_PROCESS = {"single": METHODS, "loop": (*METHODS, "gpt2")}
TORCH = {"ddp": METHODS, "fsdp2": (*METHODS, "gpt2")}
ZERO = {"zero2": METHODS, "zero3": METHODS}


def job_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    """A TCP port free right now, for a launch's rendezvous (a fixed one collides with another run of the suite)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(out: Path, jobs: dict[str, tuple[str, ...]], distributed: bool = False) -> str:
    """``scale_job.py`` in one process, or in two under torchrun (``distributed``), training each engine's methods in
    turn into ``out/ENGINE/METHOD``; fails the test on any error. Returns the job's stderr (it names the engine the
    Trainer really ran)."""
    launcher = [sys.executable] if not distributed else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    specs = [f"{engine}:{','.join(methods)}" for engine, methods in jobs.items()]
    proc = subprocess.run([*launcher, str(JOB), str(out), *specs], env=job_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for engine, methods in jobs.items():
        for method in methods:
            assert f"rank 0 {engine} {method} done" in proc.stderr, proc.stderr[-3000:]
            if distributed:
                assert f"rank 1 {engine} {method} done" in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def one_process_run(tmp_path_factory) -> Path:
    """The one-process references (:data:`ONE_PROCESS`: the Trainer's ``single`` and the plain ``loop``), run once per
    session: under xdist the first worker to ask runs them into the session's shared temporary root, under a file
    lock, and the other worker waits for them (a few seconds) and reads the same folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    out = root / "scale_out_one_process"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a failed earlier try
            run_job(out, ONE_PROCESS)
            (out / "done").touch()
    return out


def assert_only_rank_zero_wrote(run_dir: Path) -> None:
    """Each process gave the rank-utilization callback its own folder: only rank 0's may exist."""
    assert (run_dir / "rank_util").is_dir() and not (run_dir / "rank_util_from_rank1").exists()


def assert_same_adapter(expected_dir: Path, actual_dir: Path) -> None:
    """Same tensors (1e-5), none empty, a model card, and no half-written folder left beside it."""
    expected = load_file(expected_dir / "adapter_model.safetensors")
    actual = load_file(actual_dir / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert actual[key].numel() > 0 and actual[key].shape == value.shape, key
        torch.testing.assert_close(actual[key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert (actual_dir / "README.md").is_file() and (actual_dir / "adapter_config.json").is_file()
    assert not [n for n in os.listdir(actual_dir.parent) if ".hf_lorax-tmp-" in n]


def assert_same_rank_utilization(expected_dir: Path, actual_dir: Path) -> None:
    expected = json.loads((expected_dir / "rank_utilization.json").read_text())["modules"]
    actual = json.loads((actual_dir / "rank_utilization.json").read_text())["modules"]
    assert [m["module"] for m in actual] == [m["module"] for m in expected] and expected
    for e, a in zip(expected, actual):
        assert a["utilization"] == pytest_approx(e["utilization"])
        torch.testing.assert_close(torch.tensor(a["singular_values"]), torch.tensor(e["singular_values"]),
                                   atol=1e-5, rtol=1e-4)


def assert_same_logged_metrics(expected: Path, actual: Path) -> None:
    """The callback's metrics reached the Trainer's log at every step, equal to one process's."""
    want, got = json.loads(expected.read_text()), json.loads(actual.read_text())
    assert len(got) == len(want) >= 3
    for w, g in zip(want, got):
        metrics = {k for k in w if k.startswith("rank_utilization/")}
        assert metrics == {k for k in g if k.startswith("rank_utilization/")}
        for key in metrics:
            assert g[key] == pytest_approx(w[key]), key


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-4, abs=1e-6)
