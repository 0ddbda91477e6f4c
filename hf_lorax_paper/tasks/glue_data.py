"""GLUE tasks: their columns, labels and metrics, loaded from the Hub or from original GLUE TSV folders.

Local folders use the layouts GLUE's own downloads and public mirrors carry (as in ``../shared/data/glue``):
CoLA's header-less ``train.tsv``, MRPC's UTF-8 BOM and ``#1 String`` columns, STS-B's original header,
MNLI's ``dev_matched.tsv`` / ``dev_mismatched.tsv`` with string labels, and RTE / QNLI either with string
labels (original) or 0/1 (Hugging Face export). Rows are read with quoting off: GLUE text contains bare
quote characters.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

from ..arguments import check_limit
from ..metrics.glue import METRIC_FUNCTIONS

NLI_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class LocalLayout:
    """Where a task's columns sit in its TSV files: by header name, or by position when there is no header."""

    columns: dict[str, str | int]  # Hub column name -> header name or column index
    has_header: bool = True
    train_file: str = "train.tsv"
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    label_names: dict[str, int] | None = None  # string labels in the file -> ids


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    main_metric: str  # the number in the LoRA paper's Table 2
    local: LocalLayout
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), 2, ("matthews_correlation", "accuracy"), "matthews_correlation",
                 LocalLayout({"sentence": 3, "label": 1}, has_header=False)),
        GlueTask("sst2", "SST-2", ("sentence",), 2, ("accuracy",), "accuracy",
                 LocalLayout({"sentence": "sentence", "label": "label"})),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy",
                 LocalLayout({"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"})),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy",
                 LocalLayout({"question1": "question1", "question2": "question2", "label": "is_duplicate"})),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "pearson",
                 LocalLayout({"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"})),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy",
                 LocalLayout({"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                             eval_files={"validation_matched": "dev_matched.tsv",
                                         "validation_mismatched": "dev_mismatched.tsv"},
                             label_names={"entailment": 0, "neutral": 1, "contradiction": 2}),
                 eval_splits=("validation_matched", "validation_mismatched")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, ("accuracy",), "accuracy",
                 LocalLayout({"question": "question", "sentence": "sentence", "label": "label"}, label_names=NLI_LABELS)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 LocalLayout({"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, label_names=NLI_LABELS)),
    ]
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> GlueTask:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[key]


def read_tsv(path: str, task: GlueTask, max_rows: int | None = None) -> dict[str, list]:
    """Read one GLUE TSV file into ``{column: values}`` with Hub column names; validates every row."""
    check_limit("max_rows", max_rows)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task.folder}: {path} does not exist (expected the original GLUE file name).")
    layout = task.local
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) if layout.has_header else None
        if layout.has_header and header is None:
            raise ValueError(f"{path} is empty.")
        index = _column_index(path, task, header)
        out: dict[str, list] = {key: [] for key in layout.columns}
        for line_no, row in enumerate(rows, start=2 if layout.has_header else 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) <= max(index.values()):
                raise ValueError(f"{path}:{line_no} has {len(row)} columns; {task.folder} needs at least {max(index.values()) + 1}.")
            for key, i in index.items():
                out[key].append(row[i])
            if max_rows is not None and len(out["label"]) >= max_rows:
                break
    if not out["label"]:
        raise ValueError(f"{path} holds no examples.")
    out["label"] = [_parse_label(value, task, path, n) for n, value in enumerate(out["label"], start=1)]
    return out


def _column_index(path: str, task: GlueTask, header: list[str] | None) -> dict[str, int]:
    columns = task.local.columns
    if header is None:
        return dict(columns)
    header = [h.strip() for h in header]
    missing = [name for name in columns.values() if name not in header]
    if missing:
        raise ValueError(
            f"{path} has columns {header}, but {task.folder} needs {sorted(columns.values())} (missing {missing}). "
            "Is this the right task's file?"
        )
    return {key: header.index(name) for key, name in columns.items()}


def _parse_label(value: str, task: GlueTask, path: str, row: int):
    value = value.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"{path}: example {row} has score {value!r}; STS-B scores are numbers in [0, 5].") from None
        if not 0 <= score <= 5:
            raise ValueError(f"{path}: example {row} has score {score}, outside STS-B's [0, 5].")
        return score
    names = task.local.label_names or {}
    if value in names:
        return names[value]
    try:
        label = int(value)
    except ValueError:
        valid = sorted(names) + [str(i) for i in range(task.num_labels)]
        raise ValueError(f"{path}: example {row} has label {value!r}; valid labels: {valid}.") from None
    if not 0 <= label < task.num_labels:
        raise ValueError(f"{path}: example {row} has label {label}, outside 0..{task.num_labels - 1} for {task.name}.")
    return label


def load_local(data_dir: str, task: GlueTask, max_train: int | None = None, max_eval: int | None = None) -> dict:
    """``{"train": {...}, <eval split>: {...}}`` from a GLUE folder (the task's folder or its parent)."""
    folder = data_dir
    if not os.path.isfile(os.path.join(folder, task.local.train_file)) and os.path.isdir(os.path.join(data_dir, task.folder)):
        folder = os.path.join(data_dir, task.folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data_dir {data_dir!r} does not exist.")
    splits = {"train": read_tsv(os.path.join(folder, task.local.train_file), task, max_train)}
    for split, name in task.local.eval_files.items():
        splits[split] = read_tsv(os.path.join(folder, name), task, max_eval)
    return splits


def load_hub(task: GlueTask, max_train: int | None = None, max_eval: int | None = None) -> dict:
    """The task from the Hub's ``nyu-mll/glue`` (needs network or the datasets cache)."""
    from datasets import load_dataset

    check_limit("max_train", max_train)
    check_limit("max_eval", max_eval)

    try:
        dataset = load_dataset("nyu-mll/glue", task.name)
    except Exception as exc:  # offline, no cache: say what to do instead
        raise OSError(
            f"Could not load nyu-mll/glue/{task.name} from the Hub ({type(exc).__name__}: {exc}). "
            "Pass --data_dir with the original GLUE TSV files instead."
        ) from exc
    out = {}
    for split, limit in [("train", max_train)] + [(s, max_eval) for s in task.eval_splits]:
        data = dataset[split]
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        out[split] = {key: data[key] for key in (*task.text_keys, "label")}
    return out


def compute_metrics(task: GlueTask, predictions, labels) -> dict[str, float]:
    import numpy as np

    predictions = np.asarray(predictions)
    predictions = predictions.squeeze(-1) if task.is_regression else predictions.argmax(axis=-1)
    return {name: METRIC_FUNCTIONS[name](predictions, labels) for name in task.metrics}
