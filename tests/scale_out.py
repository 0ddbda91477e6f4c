"""Shared by the scale-out tests: run ``scripts/scale_job.py`` in one or two processes and compare what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
JOB = TESTS / "scripts" / "scale_job.py"
METHODS = ("lora", "dora", "qlora")


def job_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def run_job(out: Path, engine: str, port: int | None = None, methods=METHODS) -> str:
    """``scale_job.py`` in one process (``port`` None) or two under torchrun; fails the test on any error.
    Returns the job's stderr (it names the engine the Trainer really ran)."""
    launcher = [sys.executable] if port is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run([*launcher, str(JOB), str(out), engine, *methods], env=job_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for method in methods:
        assert f"rank 0 {engine} {method} done" in proc.stderr, proc.stderr[-3000:]
        if port is not None:
            assert f"rank 1 {engine} {method} done" in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


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
