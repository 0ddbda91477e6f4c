"""The numbers a task script runs with: each checked against its range, and recorded as it ran.

Why: ``TrainingArguments`` accepts ``--num_train_epochs -1``, ``--per_device_train_batch_size 0`` or a NaN
learning rate, and the run then "succeeds" after zero steps with the untrained model's score. A script
checks every number before anything is read or written, and fails with one line naming the flag and what
would be valid. A preset's hyperparameters are recorded with the values that actually ran: a flag such as
``--num_train_epochs 1`` replaces the preset's 60 in ``results.json`` and the model card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What values a flag accepts: ``text`` for the message, ``accepts`` to check."""

    text: str
    accepts: Callable[[Any], bool]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


WHOLE_POSITIVE = Rule("a whole number >= 1", lambda v: _whole(v) and v >= 1)
WHOLE_NON_NEGATIVE = Rule("a whole number >= 0", lambda v: _whole(v) and v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _number(v) and v >= 0)
FRACTION = Rule("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
FINITE = Rule("a finite number", _number)
MAX_STEPS = Rule("-1 (train --num_train_epochs), 0 (no training: score the model as it starts) or a whole number >= 1",
                 lambda v: _whole(v) and v >= -1)

# MethodArguments and the tasks' data arguments (None: not given, the preset's value is used)
METHOD_RULES: dict[str, Rule] = {
    "r": WHOLE_POSITIVE, "lora_alpha": POSITIVE, "lora_dropout": FRACTION,
    "max_train_samples": WHOLE_POSITIVE, "max_eval_samples": WHOLE_POSITIVE, "rank_utilization_steps": WHOLE_POSITIVE,
    "max_length": WHOLE_POSITIVE, "num_beams": WHOLE_POSITIVE, "max_new_tokens": WHOLE_POSITIVE,
    "no_repeat_ngram_size": WHOLE_NON_NEGATIVE, "length_penalty": FINITE,
}
# transformers.TrainingArguments (which checks only a few of these itself)
TRAINING_RULES: dict[str, Rule] = {
    "num_train_epochs": POSITIVE, "max_steps": MAX_STEPS, "per_device_train_batch_size": WHOLE_POSITIVE,
    "per_device_eval_batch_size": WHOLE_POSITIVE, "gradient_accumulation_steps": WHOLE_POSITIVE,
    "learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE,
    "label_smoothing_factor": FRACTION, "max_grad_norm": NON_NEGATIVE, "logging_steps": POSITIVE,
    "eval_steps": POSITIVE, "save_steps": POSITIVE, "save_total_limit": WHOLE_POSITIVE,
    "dataloader_num_workers": WHOLE_NON_NEGATIVE, "seed": WHOLE_NON_NEGATIVE,
}


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise ``ValueError("--flag value: must be ...")`` for the first value outside its rule (None: not given)."""
    for name, rule in rules.items():
        value = values.get(name)
        if value is not None and not rule.accepts(value):
            raise ValueError(f"--{name} {value}: must be {rule.text}.")


def check_arguments(*groups) -> None:
    """Check the dataclass argument groups of a script (MethodArguments, the task's data arguments)."""
    for group in groups:
        check_values(vars(group), METHOD_RULES)


def check_training_arguments(args) -> None:
    """Check a ``TrainingArguments``; ``--num_train_epochs`` only when ``--max_steps`` does not replace it."""
    values = {name: getattr(args, name, None) for name in TRAINING_RULES}
    if _whole(values["max_steps"]) and values["max_steps"] >= 0:
        values.pop("num_train_epochs")
    check_values(values, TRAINING_RULES)


def ran_hyperparameters(preset, args, training_fields: Mapping[str, str]) -> dict[str, Any]:
    """The preset's hyperparameters with the values that ran: ``training_fields`` maps a preset field to the
    ``TrainingArguments`` name that carries it (the user's flag, or a method's baseline, may have replaced it).
    An adapter run's ``targets`` says which layers it adapted and why."""
    # the preset's target fields are the paper model's; what this run adapted (and why) is ``targets``
    values = {k: v for k, v in asdict(preset).items() if k not in ("setting", "task", "targets", "target_modules", "slices")}
    if getattr(preset, "targets", None) is not None:
        values["targets"] = preset.targets.why
    for field_name, arg_name in training_fields.items():
        values[field_name] = getattr(args, arg_name)
    if getattr(args, "max_steps", -1) >= 0:
        values["max_steps"] = args.max_steps
    if getattr(args, "gradient_accumulation_steps", 1) != 1:
        values["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    return values


def check_limit(name: str, value: int | None) -> None:
    """A row limit of a data reader: None (every row) or a whole number >= 1."""
    if value is not None and not WHOLE_POSITIVE.accepts(value):
        raise ValueError(f"{name}={value!r} must be None (every row) or {WHOLE_POSITIVE.text}.")
