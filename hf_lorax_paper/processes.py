"""Processes started by ``torchrun`` / ``accelerate launch``: make them train together on machines without GPUs."""

from __future__ import annotations

import os
from typing import Any


def launched_processes() -> int:
    """How many processes ``torchrun`` / ``accelerate launch`` started (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_cpu_processes(flags: set[str]) -> dict[str, Any]:
    """Training defaults that make processes launched on a machine without CUDA train together.

    ``accelerate launch`` and ``torchrun`` start the processes; without CUDA, each would train alone (and write
    the same output) unless ``TrainingArguments`` joins them over gloo, which ``use_cpu`` does. DeepSpeed's CPU
    accelerator needs its process group before ``TrainingArguments`` exist (ZeRO-3 loads the base partitioned
    as soon as they do), and accelerate starts one only for GPU backends: it is started here, over gloo.
    """
    import torch

    if launched_processes() <= 1 or torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or "deepspeed" in flags:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return {"use_cpu": True}


def check_process_group(training, error: type[Exception] = ValueError) -> None:
    """Refuse a launch whose processes would train separately (each a full run writing the same files)."""
    launched = launched_processes()
    if launched > 1 and training.world_size != launched:
        raise error(
            f"{launched} processes were launched, but each would train alone (TrainingArguments sees "
            f"{training.world_size}): on a machine without GPUs pass --use_cpu true so they join over gloo."
        )
