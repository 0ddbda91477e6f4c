"""DeepSpeed ZeRO-2 and ZeRO-3 (every weight sharded) with LoRA, DoRA and QLoRA, rank and alpha maps, on 2 CPU
processes over gloo: trained adapters, ``Trainer.save_model``, ``model.save_pretrained`` and the rank-utilization
callback equal one process at the same global batch. ZeRO-3 loads the base already partitioned (``TrainingArguments``
first, as the task scripts do), so DoRA's weight norm and the analysis must gather what they read."""

import pytest
from scale_out import (
    METHODS,
    assert_same_adapter,
    assert_same_logged_metrics,
    assert_same_rank_utilization,
    run_job,
)

pytest.importorskip("deepspeed", reason="deepspeed is in the test extras")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_job(out, "single")
    return out


@pytest.mark.parametrize(("engine", "port"), [("zero2", 29641), ("zero3", 29643)])
def test_zero_matches_one_process(single, tmp_path, engine, port):
    log = run_job(tmp_path, engine, port)
    assert log.count("engine DEEPSPEED DeepSpeedEngine world 2") == 2 * len(METHODS)  # not plain DDP, not alone
    for method in METHODS:
        assert_same_adapter(single / method / "trainer", tmp_path / method / "trainer")
        assert_same_adapter(single / method / "model", tmp_path / method / "model")
        assert_same_rank_utilization(single / method / "rank_util", tmp_path / method / "rank_util")
        assert_same_logged_metrics(single / method / "logged.json", tmp_path / method / "logged.json")


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
