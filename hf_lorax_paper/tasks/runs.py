"""What the task runners (GLUE, E2E) share: the adapter config for ``--method``, ``--rank_map`` parsing, and
writing a finished run's files."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

METHODS = ("lora", "dora", "qlora", "qdora")
RANK_UTILIZATION_FILES = ("rank_utilization.png", "rank_utilization.json", "suggested_rank_map.json")


@dataclass
class RunArguments:
    """The arguments every task script takes (``HfArgumentParser`` reads them from the subclasses)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "overrides the preset's model"})
    method: str = field(default="lora", metadata={"help": "lora, dora, qlora or qdora"})
    rank_map: str | None = field(default=None, metadata={"help": "rank map JSON file or inline JSON"})
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    epochs: float | None = None
    max_length: int | None = None
    weight_decay: float | None = None
    max_train_samples: int | None = field(default=None, metadata={"help": "first N training examples"})
    max_eval_samples: int | None = None
    rank_utilization: bool = field(default=True, metadata={"help": "log rank utilization during training"})
    rank_utilization_steps: int = 100
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    use_cpu: bool = False
    disable_tqdm: bool = False


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {list(METHODS)}.")


def adapter_config(method: str, **fields: Any):
    """The hf_lorax config for ``--method``: ``LoRAConfig``, ``DoRAConfig`` or ``QLoRAConfig`` (q-variants)."""
    from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig

    check_method(method)
    if method in ("qlora", "qdora"):
        return QLoRAConfig(use_dora=method == "qdora", **fields)
    return (DoRAConfig if method == "dora" else LoRAConfig)(**fields)


def rank_map_argument(value: str | None):
    """``--rank_map``: a JSON file path (kept as a path, the config reads it) or inline JSON."""
    if value is None or os.path.isfile(value):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise FileNotFoundError(f"--rank_map {value!r} is neither a file nor inline JSON.") from None


def finish_distributed() -> None:
    """Tear down the process group ``torchrun`` / ``accelerate`` started, once every rank is done.

    Left to interpreter shutdown, gloo can abort a process after its work is finished ("terminate called
    without an active exception"), and the launcher then reports the run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def save_run(model, output_dir: str) -> str:
    """Save the adapter to ``output_dir/adapter`` with the run's rank-utilization files; returns that folder."""
    adapter_dir = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    for name in RANK_UTILIZATION_FILES:
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), adapter_dir)
    return adapter_dir


def write_results(output_dir: str, adapter_dir: str, results: dict, table: str, card_name: str | None = None) -> None:
    """``results.json`` in the run folder and next to the adapter, ``results.md``, and the adapter's model card
    rendered again with the results (``card_name``: the repo id it names, default the run folder's name)."""
    from hf_lorax import write_model_card
    from hf_lorax.adapter_files import write_json, write_text

    write_json(os.path.join(output_dir, "results.json"), results)
    write_json(os.path.join(adapter_dir, "results.json"), results)
    write_text(os.path.join(output_dir, "results.md"), table + "\n")
    write_model_card(adapter_dir, card_name or os.path.basename(os.path.abspath(output_dir)), results=results)
