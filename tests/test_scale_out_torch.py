"""DDP (torchrun, the Trainer) and FSDP2 (torch ``fully_shard`` on every layer and the model) with LoRA, DoRA and
QLoRA, rank and alpha maps, on 2 CPU processes over gloo: adapters, saves and rank-utilization reports equal one
process at the same global batch. Under FSDP2 ``model.save_pretrained`` and the analysis gather the sharded factors
on every process and write on one."""

from scale_out import (
    METHODS,
    assert_same_adapter,
    assert_same_logged_metrics,
    assert_same_rank_utilization,
    run_job,
)


def test_ddp_matches_one_process(tmp_path):
    run_job(tmp_path / "single", "single")
    log = run_job(tmp_path / "ddp", "ddp", port=29645)
    assert log.count("engine MULTI_CPU DistributedDataParallel world 2") == 2 * len(METHODS)
    for method in METHODS:
        for saved in ("trainer", "model"):
            assert_same_adapter(tmp_path / "single" / method / saved, tmp_path / "ddp" / method / saved)
        assert_same_rank_utilization(tmp_path / "single" / method / "rank_util", tmp_path / "ddp" / method / "rank_util")
        assert_same_logged_metrics(tmp_path / "single" / method / "logged.json", tmp_path / "ddp" / method / "logged.json")


def test_fsdp2_matches_one_process(tmp_path):
    run_job(tmp_path / "loop", "loop")
    run_job(tmp_path / "fsdp2", "fsdp2", port=29647)
    for method in METHODS:
        assert_same_adapter(tmp_path / "loop" / method / "model", tmp_path / "fsdp2" / method / "model")
        assert_same_rank_utilization(tmp_path / "loop" / method / "rank_util", tmp_path / "fsdp2" / method / "rank_util")
