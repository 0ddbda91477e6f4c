"""Saving under DeepSpeed ZeRO-3 with the adapter partitioned too (issue 33, item 7): the rank-0-only pattern of
peft's and transformers' docs ends within a bounded time with one clear error and writes nothing, instead of
waiting forever in a gather the other process never joins; saving on every process still writes the adapter."""

import subprocess
import sys

import pytest
from scale_out import TESTS, assert_same_adapter, job_env

from hf_lorax.integrations import sharding


def test_rank_zero_only_save_fails_within_the_timeout_and_every_process_saves(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extras")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29651",
           str(TESTS / "scripts" / "zero3_save_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env={**job_env(), sharding.SAVE_TIMEOUT_ENV: "5"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 0 done" in proc.stderr and "rank 1 done" in proc.stderr, proc.stderr[-3000:]
    raised = [line for line in proc.stderr.splitlines() if " raised after " in line]
    assert len(raised) == 1 and raised[0].startswith("rank 0 raised after "), proc.stderr[-3000:]
    assert 5 <= float(raised[0].split()[4]) < 60
    assert "not on process(es) [1]" in raised[0] and "on every process" in raised[0]
    assert "trainer.save_model" in raised[0]
    assert not (tmp_path / "rank0").exists()
    assert_same_adapter(tmp_path / "trainer", tmp_path / "every")  # no half-written folder beside them either
    assert_same_adapter(tmp_path / "trainer", tmp_path / "again")  # and the error left no save pending


def test_a_bad_timeout_is_named(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv(sharding.SAVE_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="HF_LORAX_SAVE_TIMEOUT='soon': must be a number of seconds > 0"):
        sharding.check_every_process_saves()
