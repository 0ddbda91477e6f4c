"""DDP (torchrun, the Trainer) and FSDP2 (torch ``fully_shard`` on every layer and the model) with LoRA, DoRA and
QLoRA, rank and alpha maps, on 2 CPU processes over gloo: adapters, saves and rank-utilization reports equal one
process at the same global batch. Under FSDP2 ``model.save_pretrained`` and the analysis gather the sharded factors
on every process and write on one; a full state dict from torch's ``get_model_state_dict`` saved by rank 0 alone
is the same adapter; LoRA on a GPT-2 causal LM trains logits-free with the tied LM head's weight root-managed.

One torchrun launch trains DDP, then FSDP2 (``scale_out.TORCH``); one process trains the references once per session
(``scale_out.ONE_PROCESS``, shared with tests/test_scale_out_deepspeed.py). The tests below only read what they wrote.
"""

import pytest
from safetensors.torch import load_file
from scale_out import (
    METHODS,
    TORCH,
    assert_only_rank_zero_wrote,
    assert_same_adapter,
    assert_same_logged_metrics,
    assert_same_rank_utilization,
    one_process_run,
    run_job,
)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return one_process_run(tmp_path_factory)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_launch")
    return out, run_job(out, TORCH, distributed=True)


def test_ddp_matches_one_process(launch, one):
    out, log = launch
    assert log.count("ddp: engine MULTI_CPU DistributedDataParallel world 2") == 2 * len(METHODS)
    for method in METHODS:
        single, ddp = one / "single" / method, out / "ddp" / method
        for saved in ("trainer", "model"):
            assert_same_adapter(single / saved, ddp / saved)
        assert_same_rank_utilization(single / "rank_util", ddp / "rank_util")
        assert_same_logged_metrics(single / "logged.json", ddp / "logged.json")


def test_ddp_writes_checkpoints_and_the_report_from_rank_zero_only(launch):
    """(Was tests/test_reliability.py::test_ddp_two_processes_match_single_process, with DoRA, gradient clipping and
    checkpoints: the comparison itself is test_ddp_matches_one_process.)"""
    out, _ = launch
    for method in METHODS:
        assert_only_rank_zero_wrote(out / "ddp" / method)
        written = {p.name for p in (out / "ddp" / method / "checkpoint-2").iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= written


def test_fsdp2_matches_one_process(one, launch):
    out, _ = launch
    for method in TORCH["fsdp2"]:
        loop, fsdp2 = one / "loop" / method, out / "fsdp2" / method
        assert_same_adapter(loop / "model", fsdp2 / "model")
        assert_same_rank_utilization(loop / "rank_util", fsdp2 / "rank_util")
        assert_only_rank_zero_wrote(fsdp2)


def test_fsdp2_full_state_dict_saved_by_rank_zero_matches_one_process(one, launch):
    """(Was tests/test_reliability.py::test_fsdp2_on_cpu_matches_single_process[roberta] and [gpt2]: DoRA on a
    classifier, the fused DoRA node on sharded layers, and LoRA on a logits-free GPT-2, saved from
    ``get_model_state_dict`` on rank 0.)"""
    out, _ = launch
    for method in TORCH["fsdp2"]:
        assert_same_adapter(one / "loop" / method / "model", out / "fsdp2" / method / "model_sd")
    keys = {method: load_file(out / "fsdp2" / method / "model_sd" / "adapter_model.safetensors") for method in
            ("dora", "gpt2")}
    assert any("lora_magnitude_vector" in k for k in keys["dora"]) and any("lora_B" in k for k in keys["gpt2"])
