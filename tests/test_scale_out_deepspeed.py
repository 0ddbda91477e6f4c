"""DeepSpeed ZeRO-2 and ZeRO-3 (every weight sharded) with LoRA, DoRA and QLoRA, rank and alpha maps, on 2 CPU
processes over gloo: trained adapters, ``Trainer.save_model``, ``model.save_pretrained`` and the rank-utilization
callback equal one process at the same global batch. ZeRO-3 loads the base already partitioned (``TrainingArguments``
first, as the task scripts do), so DoRA's weight norm and the analysis must gather what they read.

Saving under ZeRO-3 with the adapter partitioned too (issue 33, item 7; was tests/test_zero3_save.py): the
rank-0-only pattern of peft's and transformers' docs ends within a bounded time with one clear error and writes
nothing, instead of waiting forever in a gather the other process never joins; saving on every process still writes
the adapter.

One torchrun launch trains ZeRO-2, then ZeRO-3 (``scale_out.ZERO``); one process trains the references once per
session (``scale_out.ONE_PROCESS``, shared with tests/test_scale_out_torch.py). The tests below only read what they
wrote."""

import pytest
from scale_out import (
    METHODS,
    ZERO,
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
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extras")
    out = tmp_path_factory.mktemp("zero_launch")
    return out, run_job(out, ZERO, distributed=True)


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_matches_one_process(one, launch, engine):
    out, log = launch
    assert log.count(f"{engine}: engine DEEPSPEED DeepSpeedEngine world 2") == 2 * len(METHODS)  # not DDP, not alone
    for method in METHODS:
        single, zero = one / "single" / method, out / engine / method
        assert_same_adapter(single / "trainer", zero / "trainer")
        assert_same_adapter(single / "model", zero / "model")
        assert_same_rank_utilization(single / "rank_util", zero / "rank_util")
        assert_same_logged_metrics(single / "logged.json", zero / "logged.json")
        assert_only_rank_zero_wrote(zero)


def test_rank_zero_only_save_fails_within_the_timeout_and_every_process_saves(one, launch):
    out, log = launch
    run = out / "zero3" / "lora"
    raised = [line for line in log.splitlines() if " raised after " in line]
    assert len(raised) == 1 and raised[0].startswith("rank 0 raised after "), log[-3000:]
    assert 5 <= float(raised[0].split()[4]) < 60
    assert "not on process(es) [1]" in raised[0] and "on every process" in raised[0]
    assert "trainer.save_model" in raised[0]
    assert not (run / "rank0").exists()
    assert_same_adapter(run / "trainer", run / "model")  # saved on every process; no half-written folder either
    assert_same_adapter(run / "trainer", run / "again")  # and the error left no save pending
    assert_same_adapter(one / "single" / "lora" / "trainer", run / "again")


def test_qlora_with_byte_storage_is_refused_under_zero3_before_loading():
    """ZeRO-3 partitions floating-point tensors only; a uint8-packed 4-bit base would fail inside DeepSpeed's setup
    with an AttributeError about ``ds_id``. The float storage the error names is what the jobs above train with."""
    from transformers.integrations import HfDeepSpeedConfig

    from hf_lorax import QLoRAConfig, get_model

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})  # noqa: F841 (a weakref)
    config = QLoRAConfig(base_model_name_or_path="/nonexistent/base", task_type="SEQ_CLS", num_labels=2,
                         target_modules=["query"], compute_dtype="float32")
    with pytest.raises(ValueError, match=r"quant_storage='uint8'\) under DeepSpeed ZeRO-3.*'float32'"):
        get_model(config)
    del keep  # ZeRO-3 off again for the tests after this one
