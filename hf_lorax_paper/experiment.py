"""One experiment runner for every paper task; a task is a small :class:`TaskPlugin` (GLUE, E2E).

A script parses three argument groups, as transformers' example scripts do: :class:`MethodArguments` (model,
method, adapter), the task's data arguments, and transformers' own ``TrainingArguments`` (every flag:
``--num_train_epochs``, ``--per_device_train_batch_size``, ``--bf16``, ``--torch_compile``,
``--gradient_checkpointing``, ``--report_to``, ``--resume_from_checkpoint``, ``--max_steps``, ...). A preset
(``--preset roberta-base/sst2``) fills defaults, and every flag given on the command line wins: the preset's
values are placed *before* the user's arguments, so argparse keeps the user's. ``results.json`` records the
effective training arguments and which of them came from the preset. ``--max_steps 0`` trains nothing and scores
the model as it starts: with an adapter (whose ``B`` starts at zero) that is the base model, a zero-shot row.

Methods: ``lora``, ``dora``, ``qlora``, ``qdora`` (an hf_lorax adapter on the targets :mod:`.targets` finds in
the model: the attention's query and value), ``full`` (full fine-tuning, the paper's FT rows) and ``bitfit``
(biases and task head only). Each run writes ``results.json``, ``results.md`` (the run, named by its model, and
the paper's row for its method, named by the paper's model: a reference only for that model), the wall time of
each phase, a training-curve PNG, and the adapter with its model card (or, for ``full`` / ``bitfit``, the model).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .curves import plot_training_curve
from .processes import check_process_group, join_cpu_processes
from .rank_budget import RankBudgetArguments, plan_rank_map
from .targets import TargetArguments, check_flags, targets_record, with_targets

METHODS = ("lora", "dora", "qlora", "qdora", "full", "bitfit")
ADAPTER_METHODS = METHODS[:4]
RUN_FILES = ("rank_utilization.png", "rank_utilization.json", "suggested_rank_map.json", "training_curve.png")


@dataclass
class MethodArguments(TargetArguments, RankBudgetArguments):
    """Model, method and adapter: the arguments every task script shares (targets' and ``--rank_map auto``'s included)."""

    preset: str | None = field(default=None, metadata={"help": "paper preset, e.g. roberta-base/sst2 or gpt2-medium/e2e"})
    method: str = field(default="lora", metadata={"help": "lora, dora, qlora, qdora, full or bitfit"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "overrides the preset's model"})
    rank_map: str | None = field(default=None, metadata={
        "help": "rank map JSON file, inline JSON, or auto (probe run + budgeted allocation, see --rank_budget)"})
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    quant_storage: str | None = field(default=None, metadata={
        "help": "qlora/qdora: storage dtype of the 4-bit weights; FSDP needs the compute dtype (bfloat16)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "first N training examples"})
    max_eval_samples: int | None = None
    rank_utilization: bool = field(default=True, metadata={"help": "log rank utilization during training"})
    rank_utilization_steps: int = 100


class UsageError(ValueError):
    """A command-line argument the script cannot use (argparse's own complaints included)."""


class TaskPlugin:
    """What a paper task adds to :func:`run`; see ``tasks/glue.py`` and ``tasks/e2e.py``."""

    name: str
    data_arguments: type
    default_output_dir: str

    def resolve(self, method: MethodArguments, data) -> Any:
        """The preset with the method/data overrides applied; validates every setting."""
        raise NotImplementedError

    def training_defaults(self, preset, method: MethodArguments, data) -> dict[str, Any]:
        """``TrainingArguments`` values the preset sets (the user's flags override them)."""
        raise NotImplementedError

    def load_splits(self, preset, method: MethodArguments, data) -> dict:
        """The task's data, every row validated (before anything is written)."""
        raise NotImplementedError

    def adapter_fields(self, preset, method: MethodArguments, data) -> dict[str, Any]:
        """hf_lorax config fields (task_type, r, lora_alpha, and ``preset.targets``' target_modules, ...)."""
        raise NotImplementedError

    def task_type(self) -> str:
        raise NotImplementedError

    def num_labels(self, preset) -> int | None:
        return None

    def after_model(self, model, method: MethodArguments, data) -> dict:
        """Adjust the built model (e.g. start from another adapter); returns facts for ``results.json``."""
        return {}

    def trainer_inputs(self, tokenizer, preset, method: MethodArguments, data, splits) -> dict:
        """``train_dataset``, ``eval_dataset``, ``data_collator``, ``compute_metrics``, ``trainer_class``."""
        raise NotImplementedError

    def evaluate(self, trainer, model, tokenizer, preset, method, data, splits, output_dir: str) -> dict:
        """After training: ``{"record": {...}, "timings": {...}}`` (metrics, main metric, reference...)."""
        raise NotImplementedError

    def results_table(self, results: list[dict]) -> str:
        raise NotImplementedError


@dataclass
class Experiment:
    """A parsed command line: the three argument groups, the preset, and where each training value came from."""

    method: MethodArguments
    data: Any
    training: Any  # transformers.TrainingArguments
    preset: Any
    from_preset: list[str]
    push_adapter: bool = False  # --push_to_hub: the adapter alone goes up (hf_lorax.push_adapter), not checkpoints


# -- parsing -----------------------------------------------------------------------------------------------


def _parser(dataclass_types):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse prints usage and exits; a script reports one line instead
            raise UsageError(message)

    return Parser(dataclass_types)


def parse(plugin: TaskPlugin, argv: list[str]) -> Experiment:
    """Parse ``argv`` for ``plugin``: the preset's training values first, the user's flags after them (they win)."""
    from transformers import TrainingArguments

    from .arguments import check_arguments, check_training_arguments

    argv = list(argv)
    if "-h" in argv or "--help" in argv:  # every group's flags, TrainingArguments' included
        _parser((MethodArguments, plugin.data_arguments, TrainingArguments)).parse_args_into_dataclasses(args=argv)
    method, data, _ = _parser((MethodArguments, plugin.data_arguments)).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    check_method(method.method)
    check_arguments(method, data)
    check_flags(method, ADAPTER_METHODS)
    preset = plugin.resolve(method, data)
    defaults = {"output_dir": plugin.default_output_dir, "report_to": default_report_to(),
                "bf16": cuda_bf16(), "dataloader_num_workers": 0, **join_cpu_processes(explicit_flags(argv)),
                **plugin.training_defaults(preset, method, data)}
    given = explicit_flags(argv)
    tokens = [t for name, value in defaults.items() if name not in given for t in _tokens(name, value)]
    parser = _parser((MethodArguments, plugin.data_arguments, TrainingArguments))
    try:
        method, data, training = parser.parse_args_into_dataclasses(args=tokens + argv)
    except ValueError as exc:  # HfArgumentParser's unused-argument message, or TrainingArguments' own checks
        raise UsageError(str(exc).splitlines()[0]) from exc
    check_training_arguments(training)
    check_process_group(training, UsageError)
    push, training.push_to_hub = training.push_to_hub, False  # the Trainer would upload every checkpoint
    return Experiment(method=method, data=data, training=training, preset=preset, push_adapter=push,
                      from_preset=sorted(name for name in defaults if name not in given))


def explicit_flags(argv: list[str]) -> set[str]:
    """The option names given on a command line (``--name value`` and ``--name=value``)."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def _tokens(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{name}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", str(value)]


def default_report_to() -> str:
    """TensorBoard when it is installed (transformers' own default is no reporter)."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


def cuda_bf16() -> bool:
    """bf16 mixed precision on GPUs that support it, fp32 elsewhere."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {list(METHODS)}.")


# -- running -----------------------------------------------------------------------------------------------


def build_model(plugin: TaskPlugin, preset, method: MethodArguments, data, **adapter_overrides):
    """An hf_lorax adapter model (``get_model``) or, for ``full`` / ``bitfit``, the plain model to train.

    ``adapter_overrides`` replace config fields (the ``rank_map`` / ``alpha_map`` of ``--rank_map auto``)."""
    import transformers

    from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, get_model

    if method.method in ADAPTER_METHODS:
        kwargs = {**plugin.adapter_fields(preset, method, data), **adapter_overrides}
        if method.method in ("qlora", "qdora"):
            extra = {"quant_storage": method.quant_storage} if method.quant_storage else {}
            return get_model(QLoRAConfig(use_dora=method.method == "qdora", **kwargs, **extra))
        return get_model((DoRAConfig if method.method == "dora" else LoRAConfig)(**kwargs))
    from hf_lorax.task_types import AUTO_CLASSES

    auto = getattr(transformers, AUTO_CLASSES[plugin.task_type()])
    labels = plugin.num_labels(preset)
    model = auto.from_pretrained(preset.model_name_or_path, **({"num_labels": labels} if labels else {}))
    if method.method == "bitfit":  # Ben Zaken et al. 2022: biases (and the task head) train, nothing else
        head = [n for n, _ in model.named_children() if n != getattr(model, "base_model_prefix", None)]
        for name, param in model.named_parameters():
            in_head = name.split(".")[0] in head and plugin.task_type() != "CAUSAL_LM"  # an LM head is the embedding
            param.requires_grad_(name.endswith(".bias") or in_head)
    return model


def run(plugin: TaskPlugin, experiment: Experiment) -> dict | None:
    """Train, evaluate and write one run; returns its ``results.json`` record (``None`` on non-main processes)."""
    from transformers import AutoTokenizer, set_seed

    from hf_lorax import RankUtilizationCallback, push_adapter
    from hf_lorax.layers import trained_parameter_count

    method, data, args, preset = experiment.method, experiment.data, experiment.training, experiment.preset
    if experiment.push_adapter and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. me/roberta-base-lora-sst2).")
    if experiment.push_adapter and method.method not in ADAPTER_METHODS:
        raise ValueError(f"--push_to_hub uploads adapters; --method {method.method} trains a full model.")
    splits = plugin.load_splits(preset, method, data)  # validated before anything is written
    if method.method in ADAPTER_METHODS:  # the paper's targets found in this model, or the flags'
        preset = experiment.preset = with_targets(plugin, preset, method, log=args.should_log)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(preset.model_name_or_path)
    auto = plan_rank_map(plugin, experiment, tokenizer, splits, build_model, ADAPTER_METHODS)
    model = build_model(plugin, preset, method, data, **auto["overrides"])
    facts = {**plugin.after_model(model, method, data), **auto["facts"]}
    trainable = trained_parameter_count(model)  # a fused-slice B counts its blocks only
    inputs = plugin.trainer_inputs(tokenizer, preset, method, data, splits)
    trainer_class = inputs.pop("trainer_class")
    trainer = trainer_class(model=model, args=args, **inputs)
    if method.rank_utilization and method.method in ADAPTER_METHODS:  # first, so the reporters get its metrics
        RankUtilizationCallback(every_n_steps=method.rank_utilization_steps, output_dir=args.output_dir,
                                log_per_module=False).attach(trainer)
    timings = {}
    with timed(timings, "train"):  # --max_steps 0: nothing trains (an adapter then starts as the base model)
        train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint) if args.max_steps else None
    outcome = plugin.evaluate(trainer, model, tokenizer, preset, method, data, splits, args.output_dir)
    timings.update(outcome.get("timings", {}))

    results = None
    main = trainer.is_world_process_zero()  # under torchrun / accelerate, one process writes the run's files
    # every process saves: a ZeRO-3 / FSDP model gathers its sharded adapter first (a collective)
    saved = save_run(model, args.output_dir, method.method, is_main_process=main)
    if main:
        os.makedirs(args.output_dir, exist_ok=True)
        curve = plot_training_curve(trainer.state.log_history, os.path.join(args.output_dir, "training_curve.png"))
        results = {**outcome["record"], **facts, "model": preset.model_name_or_path, "preset": preset.name,
                   "model_type": getattr(model.config, "model_type", None), "targets": targets_record(model, preset),
                   "method": method.method,
                   "trainable_params": trainable, "train_loss": train_output.training_loss if train_output else None,
                   "training_args": effective_training_args(args), "from_preset": experiment.from_preset,
                   "timings_s": timings, "training_curve": os.path.basename(curve) if curve else None,
                   "distributed": {"processes": trainer.accelerator.num_processes,
                                   "engine": trainer.accelerator.distributed_type.value}}
        copy_run_files(args.output_dir, saved)
        write_results(plugin, args.output_dir, saved, results, args.hub_model_id, method.method in ADAPTER_METHODS)
        if experiment.push_adapter:
            results["hub"] = push_adapter(saved, args.hub_model_id, private=args.hub_private_repo).commit_url
    finish_distributed()
    return results


@contextlib.contextmanager
def timed(timings: dict, name: str) -> Iterator[None]:
    """``with timed(timings, "decode"):`` records the block's wall time in seconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


TRAINING_FIELDS = ("num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
                   "per_device_eval_batch_size", "gradient_accumulation_steps", "weight_decay", "warmup_steps",
                   "lr_scheduler_type", "label_smoothing_factor", "max_grad_norm", "seed", "bf16", "fp16",
                   "torch_compile", "gradient_checkpointing", "eval_strategy", "save_strategy", "logging_steps",
                   "report_to", "optim", "use_cpu", "resume_from_checkpoint", "output_dir")


def effective_training_args(args) -> dict:
    """The training arguments a run used (JSON-ready), for ``results.json``."""
    from enum import Enum

    values = {name: getattr(args, name, None) for name in TRAINING_FIELDS}
    return {name: value.value if isinstance(value, Enum) else value for name, value in values.items()}


def save_run(model, output_dir: str, method: str, is_main_process: bool = True) -> str:
    """Save the adapter to ``output_dir/adapter`` (or the model to ``output_dir/model``); every process calls it
    and the main one writes. Returns the folder."""
    folder = os.path.join(output_dir, "adapter" if method in ADAPTER_METHODS else "model")
    model.save_pretrained(folder, is_main_process=is_main_process)
    return folder


def copy_run_files(output_dir: str, folder: str) -> None:
    """The run's report files (rank utilization, training curve) beside the saved adapter or model."""
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), folder)


def write_results(plugin: TaskPlugin, output_dir: str, saved: str, results: dict, card_name: str | None,
                  adapter: bool) -> None:
    """``results.json`` (run folder and beside the saved adapter/model), ``results.md``, and the adapter's card."""
    from hf_lorax import write_model_card
    from hf_lorax.adapter_files import write_json, write_text

    write_json(os.path.join(output_dir, "results.json"), results)
    write_json(os.path.join(saved, "results.json"), results)
    write_text(os.path.join(output_dir, "results.md"), plugin.results_table([results]) + "\n")
    if adapter:
        write_model_card(saved, card_name or os.path.basename(os.path.abspath(output_dir)), results=results)


def finish_distributed() -> None:
    """Tear down the process group ``torchrun`` / ``accelerate`` started, once every rank is done.

    Left to interpreter shutdown, gloo can abort a process after its work is finished ("terminate called
    without an active exception"), and the launcher then reports the run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- command line ------------------------------------------------------------------------------------------

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, OSError)


def main(plugin: TaskPlugin, argv: list[str] | None = None, show: Callable[[str], None] = print) -> int:
    """A task script: parse, run, print the results table. User errors: one line on stderr, exit code 2."""
    from hf_lorax.cli import debug_enabled  # first: in a script, torch/transformers/peft import quietly

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or debug_enabled()
    argv = strip_bare_debug(argv)
    try:
        experiment = parse(plugin, argv)
        results = run(plugin, experiment)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 2
    if results is not None:  # the main process of a distributed run reports
        out = experiment.training.output_dir
        show("\n" + plugin.results_table([results]))
        saved = "adapter" if experiment.method.method in ADAPTER_METHODS else "model"
        show(f"\n{saved}: {out}/{saved}   results: {out}/results.json   curve: {out}/training_curve.png")
    return 0


def strip_bare_debug(argv: list[str]) -> list[str]:
    """Drop a bare ``--debug`` (show tracebacks); ``--debug underflow_overflow`` stays for ``TrainingArguments``."""
    out = []
    for i, token in enumerate(argv):
        bare = token == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        if not bare:
            out.append(token)
    return out


def rank_map_argument(value: str | None):
    """``--rank_map``: a JSON file path (kept as a path, the config reads it) or inline JSON."""
    import json

    if value is None or value == "auto":  # "auto": plan_rank_map supplies the map
        return None
    if os.path.isfile(value):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise FileNotFoundError(f"--rank_map {value!r} is neither a file nor inline JSON.") from None
