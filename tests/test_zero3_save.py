"""Saving under DeepSpeed ZeRO-3 with the adapter partitioned too (issue 33, item 7): the rank-0-only pattern of
peft's and transformers' docs ends within a bounded time with one clear error and writes nothing, instead of
waiting forever in a gather the other process never joins; saving on every process still writes the adapter.

The 2-process run is part of the ZeRO launch of tests/test_scale_out_deepspeed.py
(``test_rank_zero_only_save_fails_within_the_timeout_and_every_process_saves``: one launch of torch, transformers and
DeepSpeed instead of two); what needs no process group is here."""

import pytest

from hf_lorax.integrations import sharding


def test_a_bad_timeout_is_named(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv(sharding.SAVE_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="HF_LORAX_SAVE_TIMEOUT='soon': must be a number of seconds > 0"):
        sharding.check_every_process_saves()
