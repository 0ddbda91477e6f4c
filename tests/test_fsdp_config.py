"""The shipped ``examples/accelerate/fsdp.yaml`` through accelerate's own FSDP2 preparation (issue 33, item 3).

accelerate applies an FSDP config on GPU backends only; ``tests/scripts/forced_fsdp`` (on the launched processes'
``PYTHONPATH``) makes it apply on CPU too, so ``accelerate launch --config_file examples/accelerate/fsdp.yaml
scripts/run_glue.py`` runs the preparation a GPU user's launch runs: the file's wrap policy, state-dict type and
RAM-efficient loading, ``fully_shard`` over gloo. Overridden at launch: 2 processes instead of 8, and fp32 instead
of bf16 so the run can equal one process exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import roberta_config
from scale_out import TESTS, assert_same_adapter, free_port
from test_glue import _args, run, write_glue
from transformers import RobertaForSequenceClassification

from hf_lorax_paper.tasks.synthetic import build_tokenizer

ROOT = TESTS.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny RoBERTa classifier without dropout (one process and two then draw the same numbers)."""
    path = tmp_path_factory.mktemp("fsdp_base")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(vocab_size=len(tokenizer), hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_shipped_fsdp_config_trains_what_one_process_trains(base, tmp_path):
    glue = write_glue(tmp_path / "glue")
    options = dict(max_steps=2, rank_utilization_steps=1)
    run(_args(base, glue, tmp_path / "single", "sst2", per_device_train_batch_size=8, **options))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), str(ROOT / "scripts" / "run_glue.py"),
           *_args(base, glue, tmp_path / "fsdp", "sst2", per_device_train_batch_size=4, **options)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS / "scripts" / "forced_fsdp"), str(ROOT)])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    saved = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert saved["distributed"] == {"processes": 2, "engine": "FSDP"}  # accelerate's FSDP, not DDP
    assert_same_adapter(tmp_path / "single" / "adapter", tmp_path / "fsdp" / "adapter")
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert saved["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
