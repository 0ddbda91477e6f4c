"""Reliability: all-or-nothing saves under SIGKILL, safe loading, resume after a crash, DDP on 2 CPU processes."""

import os
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


def test_resume_after_sigkill_matches_uninterrupted_run(base_dir, tmp_path):
    full = subprocess.run([sys.executable, str(JOB), "--base", base_dir, "--out", str(tmp_path / "full")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed, mark = tmp_path / "crashed", tmp_path / "checkpoint_written"
    proc = subprocess.Popen([sys.executable, str(JOB), "--base", base_dir, "--out", str(crashed), "--stall_at", "4",
                             "--mark", str(mark)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(mark, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = crashed / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # adapter + head + optimizer state only
    resumed = subprocess.run([sys.executable, str(JOB), "--base", base_dir, "--out", str(crashed), "--resume",
                              str(checkpoint)], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = _tensors(tmp_path / "full" / "final"), _tensors(crashed / "final")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)


def test_ddp_two_processes_match_single_process(tmp_path):
    # dropout draws differ between one process and two, so the comparison needs a dropout-free model
    base_dir = str(tmp_path / "base")
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                    classifier_dropout=0.0)).save_pretrained(base_dir)
    no_clip = []  # gradient clipping on: loss scaling must match exactly
    single = subprocess.run([sys.executable, str(JOB), "--base", base_dir, "--out", str(tmp_path / "single"), *no_clip],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    ddp = subprocess.run([*torchrun, str(JOB), "--base", base_dir, "--out", str(tmp_path / "ddp"), "--batch", "4",
                          *no_clip],
                         env=ENV, capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert "rank 1 done" in ddp.stderr and "rank 0 done" in ddp.stderr
    expected, actual = _tensors(tmp_path / "single" / "final"), _tensors(tmp_path / "ddp" / "final")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)
    written = set(os.listdir(tmp_path / "ddp"))
    assert "rank_util_from_rank0" in written and "rank_util_from_rank1" not in written  # only rank 0 writes
    assert not [n for n in written if ".hf_lorax-tmp-" in n]


def test_workflows_are_valid():
    check = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not os.path.exists(check):
        pytest.skip("check-jsonschema not installed")
    workflows = sorted(str(p) for p in (TESTS.parent / ".github" / "workflows").glob("*.yml"))
    assert len(workflows) >= 2
    proc = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", *workflows], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("arch", "port"), [("roberta", "29534"), ("gpt2", "29536")])
def test_fsdp2_on_cpu_matches_single_process(tmp_path, arch, port):
    job = TESTS / "scripts" / "fsdp_job.py"
    single = subprocess.run([sys.executable, str(job), str(tmp_path / "single"), arch], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    fsdp = subprocess.run([*torchrun, str(job), str(tmp_path / "fsdp"), arch], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    expected, actual = _tensors(tmp_path / "single"), _tensors(tmp_path / "fsdp")
    assert expected.keys() == actual.keys()
    assert any(("lora_magnitude_vector" if arch == "roberta" else "lora_B") in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)
