"""Full tensors of sharded parameters: DeepSpeed ZeRO-3 partitions and FSDP2 ``DTensor`` shards.

Under ZeRO-3 a parameter outside its module's forward holds an empty partition (``param.ds_id`` marks it);
under FSDP2 (``fully_shard``) it is a ``DTensor`` holding this process's rows. Reading either as a weight gives
wrong shapes or wrong numbers, so every hf_lorax read of a weight that may be sharded — DoRA's weight norm, the
rank-utilization analysis, saving — goes through :func:`full_params`.

Gathering is a collective: every process must enter it, in the same order. Callers that compute on one process
only (a report, a file) gather on all and compute on one.

``zero3_enabled()`` (transformers' ``is_deepspeed_zero3_enabled``): whether a DeepSpeed ZeRO-3 config is active
(transformers then loads models partitioned).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled as zero3_enabled  # noqa: F401

from .guard import InternalAPI, require_signatures

try:  # an FSDP2 / tensor-parallel ``DTensor``: this process holds a shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is a DTensor
    DTensor = ()

GATHERED_PARAMETERS = InternalAPI(
    path="deepspeed.runtime.zero.partition_parameters:GatheredParameters.__init__",
    params=("self", "params", "modifier_rank"), library="deepspeed", verified=("0.15.0", "0.20.0"),
    reason="gather ZeRO-3 partitioned weights for DoRA's norm, the rank analysis and saving")
DEFAULT_STORE = InternalAPI(
    path="torch.distributed.distributed_c10d:_get_default_store", params=(), library="torch",
    verified=("2.13.0", "2.14.0"),
    reason="every process checks in on the process group's store before a save gathers, so a save called on "
           "one process only fails with an error instead of waiting forever in the gather")
SAVE_TIMEOUT_ENV = "HF_LORAX_SAVE_TIMEOUT"
_SAVES = [0]  # this process's completed check-ins: the n-th save of every rank is one gather


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (its data is a partition outside ``GatheredParameters``)."""
    return hasattr(param, "ds_id")


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ZeRO-3 partition or a ``DTensor``."""
    return any(is_zero3_param(p) or isinstance(p, DTensor) for p in model.parameters())


def full_params(params: Iterable[torch.Tensor]):
    """``with full_params([w, a]) as (w_full, a_full):`` the whole tensors, whatever the sharding.

    ZeRO-3 parameters are gathered in place for the block (``deepspeed.zero.GatheredParameters``, read-only) and
    partitioned again after it; ``DTensor`` s are all-gathered into new tensors; unsharded tensors are yielded as
    they are (a plain ``nullcontext``, so compiled layers trace through it). A collective whenever something is
    sharded: every process must call it with the same parameters.
    """
    params = list(params)
    if not any(is_zero3_param(p) or isinstance(p, DTensor) for p in params):
        return nullcontext(params)
    return _gathered(params)


@contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    zero3 = [p for p in params if is_zero3_param(p)]
    gather = nullcontext()
    if zero3:
        require_signatures([GATHERED_PARAMETERS], "gather ZeRO-3 parameters")
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # inside a module's forward DeepSpeed has gathered that module's parameters itself; gathering them again
        # would release them under its feet on exit
        missing = [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]
        gather = deepspeed.zero.GatheredParameters(missing, modifier_rank=None)
    with gather:
        yield [p.full_tensor() if isinstance(p, DTensor) else p for p in params]


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of every adapter and trained-head parameter of a (sharded) peft model.

    What peft's ``save_pretrained(state_dict=...)`` needs to write the adapter; the frozen base is not gathered.
    A collective under sharding (every process must call it; :func:`check_every_process_saves` first); on one
    process it only copies.
    """
    if is_sharded(model):
        check_every_process_saves()
    state = {}
    for name, param in model.named_parameters():  # one at a time: at most one full tensor is held beyond the result
        if param.requires_grad or "lora_" in name or ".modules_to_save." in name:
            with full_params([param]) as (full,):
                state[name] = full.detach().to("cpu", copy=True)
    return state


def check_every_process_saves() -> None:
    """Wait until every process of the default group has reached this save, or raise a ``RuntimeError``.

    Each process sets a key for its n-th sharded save on the group's store and waits for every rank's key
    (``HF_LORAX_SAVE_TIMEOUT`` seconds, 60 by default). ``if trainer.is_world_process_zero():
    model.save_pretrained(...)`` (the pattern peft's and transformers' docs show) would otherwise wait forever in a
    gather the other processes never join; no collective is entered until all have arrived.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    raw = os.environ.get(SAVE_TIMEOUT_ENV, "60")
    seconds = float(raw) if raw.strip().replace(".", "", 1).isdigit() else 0.0
    if seconds <= 0:
        raise ValueError(f"{SAVE_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0.")
    require_signatures([DEFAULT_STORE], "check that every process saves")
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = [f"hf_lorax/save/{_SAVES[0]}/{r}" for r in range(world)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except RuntimeError:  # DistStoreError: the wait timed out
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        store.delete_key(keys[rank])  # withdrawn: the next save called on every process pairs up again
        raise RuntimeError(f"save_pretrained was called on process {rank} but not on process(es) {missing} "
                           f"(waited {seconds:g} s, {SAVE_TIMEOUT_ENV} sets it). The adapter is sharded (DeepSpeed "
                           "ZeRO-3 / FSDP): saving gathers it, a collective every process must join. Call "
                           "model.save_pretrained(dir, is_main_process=...) on every process (the main one "
                           "writes), or use trainer.save_model(dir). Nothing was written.") from None
    _SAVES[0] += 1
