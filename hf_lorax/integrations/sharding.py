"""Full tensors of sharded parameters: DeepSpeed ZeRO-3 partitions and FSDP2 ``DTensor`` shards.

Under ZeRO-3 a parameter outside its module's forward holds an empty partition (``param.ds_id`` marks it);
under FSDP2 (``fully_shard``) it is a ``DTensor`` holding this process's rows. Reading either as a weight gives
wrong shapes or wrong numbers, so every hf_lorax read of a weight that may be sharded — DoRA's weight norm, the
rank-utilization analysis, saving — goes through :func:`full_params`.

Gathering is a collective: every process must enter it, in the same order. Callers that compute on one process
only (a report, a file) gather on all and compute on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .guard import InternalAPI, require_signatures

GATHERED_PARAMETERS = InternalAPI(
    path="deepspeed.runtime.zero.partition_parameters:GatheredParameters.__init__",
    params=("self", "params", "modifier_rank"), library="deepspeed", verified=("0.15.0", "0.20.0"),
    reason="gather ZeRO-3 partitioned weights for DoRA's norm, the rank analysis and saving",
)


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (its data is a partition outside ``GatheredParameters``)."""
    return hasattr(param, "ds_id")


def is_dtensor(param: torch.Tensor) -> bool:
    """Whether ``param`` is an FSDP2 / tensor-parallel ``DTensor`` (this process holds a shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(param, DTensor)


def zero3_enabled() -> bool:
    """Whether a DeepSpeed ZeRO-3 config is active (transformers then loads models partitioned)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ZeRO-3 partition or a ``DTensor``."""
    return any(is_zero3_param(p) or is_dtensor(p) for p in model.parameters())


def full_params(params: Iterable[torch.Tensor]):
    """``with full_params([w, a]) as (w_full, a_full):`` the whole tensors, whatever the sharding.

    ZeRO-3 parameters are gathered in place for the block (``deepspeed.zero.GatheredParameters``, read-only) and
    partitioned again after it; ``DTensor`` s are all-gathered into new tensors; unsharded tensors are yielded as
    they are (a plain ``nullcontext``, so compiled layers trace through it). A collective whenever something is
    sharded: every process must call it with the same parameters.
    """
    params = list(params)
    if not any(is_zero3_param(p) or is_dtensor(p) for p in params):
        return nullcontext(params)
    return _gathered(params)


@contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    zero3 = [p for p in params if is_zero3_param(p)]
    if zero3:
        require_signatures([GATHERED_PARAMETERS], "gather ZeRO-3 parameters")
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # inside a module's forward DeepSpeed has gathered that module's parameters itself; gathering them again
        # would release them under its feet on exit
        missing = [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]
        gather = deepspeed.zero.GatheredParameters(missing, modifier_rank=None)
    else:
        gather = nullcontext()
    with gather:
        yield [p.full_tensor() if is_dtensor(p) else p for p in params]


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of every adapter and trained-head parameter of a (sharded) peft model.

    What peft's ``save_pretrained(state_dict=...)`` needs to write the adapter; the frozen base is not gathered.
    A collective under sharding (every process must call it); on one process it only copies.
    """
    wanted = [(name, p) for name, p in model.named_parameters()
              if p.requires_grad or "lora_" in name or ".modules_to_save." in name]
    state = {}
    for name, param in wanted:  # one at a time: at most one full tensor is held beyond the result
        with full_params([param]) as (full,):
            state[name] = full.detach().to("cpu", copy=True)
    return state
