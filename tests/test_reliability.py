"""Reliability: all-or-nothing saves under SIGKILL, safe loading, resume after a crash.

DDP and FSDP2 on 2 CPU processes against one process (DoRA with gradient clipping and checkpoints, only rank 0
writing the rank-utilization report; DoRA and a logits-free GPT-2 under ``fully_shard`` saved from a full state
dict) are tested in tests/test_scale_out_torch.py, in its one launch of both engines."""

import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, roberta_config
from safetensors.torch import load_file
from transformers import RobertaForSequenceClassification

from hf_lorax import LoRAConfig, get_model
from hf_lorax.adapter_files import atomic_directory_write

TESTS = Path(__file__).parent
JOB = TESTS / "scripts" / "train_job.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rel_base")
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config()).save_pretrained(path)
    return str(path)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_sigkill_during_save_keeps_the_previous_adapter(base_dir, tmp_path):
    target, copy_a, mark = tmp_path / "adapter", tmp_path / "a_copy", tmp_path / "mid_save"
    script = textwrap.dedent(f"""
        import shutil, time, torch
        import peft.peft_model as pm
        from conftest import randomize_adapters
        from hf_lorax import LoRAConfig, get_model
        model = get_model(LoRAConfig(base_model_name_or_path={base_dir!r}, task_type="SEQ_CLS", num_labels=2, r=4,
                                     target_modules=["query", "value"]))
        randomize_adapters(model, seed=1)
        model.save_pretrained({str(target)!r})
        shutil.copytree({str(target)!r}, {str(copy_a)!r})
        randomize_adapters(model, seed=2)
        real = pm.safe_save_file
        def half_written(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(64)  # the crash lands in the middle of writing the weights
            open({str(mark)!r}, "w").close()
            time.sleep(600)
        pm.safe_save_file = half_written
        model.save_pretrained({str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(mark, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for name in ("adapter_model.safetensors", "adapter_config.json", "hf_lorax.json"):
        assert (target / name).read_bytes() == (copy_a / name).read_bytes(), name
    model = get_model(str(target))  # still loads, and is adapter A
    assert model is not None
    stale = [p for p in tmp_path.iterdir() if ".hf_lorax-tmp-" in p.name]
    assert stale  # the killed save's temporary directory ...
    atomic_directory_write(str(target), lambda tmp: shutil.copytree(copy_a, tmp, dirs_exist_ok=True))
    assert not [p for p in tmp_path.iterdir() if ".hf_lorax-tmp-" in p.name]  # ... is cleaned up by the next save


def test_save_keeps_files_it_does_not_write(base_dir, tmp_path):
    model = get_model(LoRAConfig(base_model_name_or_path=base_dir, task_type="SEQ_CLS", num_labels=2, r=4,
                                 target_modules=["query"]))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"optimizer state")
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "optimizer.pt").read_bytes() == b"optimizer state"
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".hf_lorax-tmp-" in p.name]


def test_pickle_adapter_needs_opt_in(base_dir, tmp_path, input_ids):
    model = get_model(LoRAConfig(base_model_name_or_path=base_dir, task_type="SEQ_CLS", num_labels=2, r=4,
                                 target_modules=["query"]))
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="pickle adapter_model.bin.*allow_pickle=True"):
        get_model(str(tmp_path))
    again = get_model(str(tmp_path), allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits)


def _tensors(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def _run_job_here(monkeypatch, *argv: str) -> None:
    """``train_job.py`` in this process (a new one would start torch and transformers again), with the one thread
    per process the job's processes have (``OMP_NUM_THREADS=1``). Only the run to be killed needs its own process;
    the uninterrupted run and the resumed one read and write nothing but their folders (and the checkpoint)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(JOB), *argv])
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(JOB), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def test_resume_after_sigkill_matches_uninterrupted_run(base_dir, tmp_path, monkeypatch):
    crashed, mark = tmp_path / "crashed", tmp_path / "checkpoint_written"
    proc = subprocess.Popen([sys.executable, str(JOB), "--base", base_dir, "--out", str(crashed), "--stall_at", "4",
                             "--mark", str(mark)], env=ENV, stderr=subprocess.PIPE, text=True)
    _run_job_here(monkeypatch, "--base", base_dir, "--out", str(tmp_path / "full"))  # the uninterrupted run
    _wait_for(mark, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = crashed / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # adapter + head + optimizer state only
    _run_job_here(monkeypatch, "--base", base_dir, "--out", str(crashed), "--resume", str(checkpoint))
    expected, actual = _tensors(tmp_path / "full" / "final"), _tensors(crashed / "final")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)


def test_workflows_are_valid():
    check = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not os.path.exists(check):
        pytest.skip("check-jsonschema not installed")
    workflows = sorted(str(p) for p in (TESTS.parent / ".github" / "workflows").glob("*.yml"))
    assert len(workflows) >= 2
    proc = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", *workflows], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
