"""E2E NLG data: meaning representations (MRs), their text format, CSV / Hub loading, grouping, encoding.

The format follows ``microsoft/LoRA`` ``examples/NLG`` (data from Li & Liang's prefix-tuning release):
an MR such as ``name[The Vaults], eatType[pub], priceRange[£20-25], familyFriendly[yes]`` becomes the
context ``name : The Vaults | Type : pub | price : £ 20 - 25 | family friendly : yes`` (slot names
renamed, punctuation split off the values), and a training example is ``context <eos> " " + reference
<eos>`` with the loss on the reference tokens only (the context and the first end-of-text token carry
label -100). References are split the same way (``... near Café Adriatic , has a 5 star rating .``), as
in the released ``train.txt``; :func:`detokenize` undoes it for the files that get scored.

Local files use the original E2E release layout: a CSV with ``mr`` and ``ref`` columns, one reference
per row, several rows per MR (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..arguments import check_limit

# Slot names of the original MRs -> the names in microsoft/LoRA's formatted contexts.
SLOT_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
LOCAL_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
HUB_DATASETS = ("GEM/e2e_nlg", "e2e_nlg")
# Hub column names -> (MR column, reference column); GEM renamed the reference column.
HUB_COLUMNS = {"GEM/e2e_nlg": ("meaning_representation", "target"), "e2e_nlg": ("meaning_representation",
                                                                                "human_reference")}

_SLOT = re.compile(r"\s*([^\[\],\s][^\[\],]*?)\s*\[([^\]]*)\]\s*(?:,|$)")
_LEADING = "(\"£$“‘"
_TRAILING = ".,!?;:)\"”’"
_DIGIT_RANGE = re.compile(r"(?<=\d)-(?=\d)")


@dataclass(frozen=True)
class E2ESplit:
    """One split: parallel lists of raw MRs and references (one row per reference, as in the CSVs)."""

    mrs: list[str]
    refs: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.mrs)


def parse_mr(mr: str, where: str = "MR") -> list[tuple[str, str]]:
    """``"name[X], eatType[pub]"`` -> ``[("name", "X"), ("eatType", "pub")]``; ``ValueError`` if it does not parse.

    ``where`` names the row in the error (``"devset.csv row 12"``).
    """
    slots, pos = [], 0
    text = mr.strip()
    while pos < len(text):
        match = _SLOT.match(text, pos)
        if match is None:
            raise ValueError(
                f"{where}: meaning representation {mr!r} does not parse at {text[pos:pos + 30]!r}; expected "
                "'slot[value], slot[value], ...' as in the E2E CSVs (e.g. 'name[The Vaults], eatType[pub]')."
            )
        slots.append((match.group(1).strip(), match.group(2).strip()))
        pos = match.end()
    if not slots:
        raise ValueError(f"{where}: meaning representation {mr!r} is empty.")
    return slots


def tokenize_text(text: str) -> str:
    """Split punctuation off words as the released E2E/LoRA files do: ``"£20-25, fine."`` -> ``"£ 20 - 25 , fine ."``.

    Word-internal punctuation stays (``family-friendly``, ``10.50``, ``it's``); a hyphen between digits and
    the currency sign before a number are split, as in the formatted MRs.
    """
    out: list[str] = []
    for word in _DIGIT_RANGE.sub(" - ", text).split():
        lead, trail = [], []
        while len(word) > 1 and word[0] in _LEADING:
            lead.append(word[0])
            word = word[1:]
        while len(word) > 1 and word[-1] in _TRAILING:
            trail.insert(0, word[-1])
            word = word[:-1]
        out += lead + [word] + trail
    return " ".join(out)


def detokenize(text: str) -> str:
    """Undo :func:`tokenize_text` for output files: ``"£ 20 - 25 , fine ."`` -> ``"£20-25, fine."``."""
    text = " ".join(text.split())
    text = re.sub(r" ([.,!?;:)”’])", r"\1", text)
    text = re.sub(r"([(“‘£$]) ", r"\1", text)
    text = re.sub(r"(?<=\d) - (?=\d)", "-", text)
    return text


def format_mr(mr: str, where: str = "MR") -> str:
    """The model's context for an MR: ``name : X | Type : pub | price : £ 20 - 25 | family friendly : yes``."""
    return " | ".join(f"{SLOT_NAMES.get(slot, slot)} : {tokenize_text(value)}" for slot, value in parse_mr(mr, where))


def read_csv(path: str, max_rows: int | None = None) -> E2ESplit:
    """Read an E2E CSV (``mr,ref`` columns); every MR is parsed so a bad row fails here, naming the row."""
    check_limit("max_rows", max_rows)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"E2E file {path!r} does not exist.")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a CSV with 'mr' and 'ref' columns.")
        header = [h.strip() for h in header]
        missing = [c for c in ("mr", "ref") if c not in header]
        if missing:
            raise ValueError(f"{path} has columns {header}, but E2E files need 'mr' and 'ref' (missing {missing}).")
        i_mr, i_ref = header.index("mr"), header.index("ref")
        mrs, refs = [], []
        for row_no, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(i_mr, i_ref):
                raise ValueError(f"{path} row {row_no} has {len(row)} columns; expected {len(header)} ({header}).")
            mr, ref = row[i_mr].strip(), row[i_ref].strip()
            parse_mr(mr, f"{path} row {row_no}")
            if not ref:
                raise ValueError(f"{path} row {row_no}: the reference for MR {mr!r} is empty.")
            mrs.append(mr)
            refs.append(ref)
            if max_rows is not None and len(mrs) >= max_rows:
                break
    if not mrs:
        raise ValueError(f"{path} holds no examples (only a header).")
    return E2ESplit(mrs, refs, path)


def limit_mrs(split: E2ESplit, max_mrs: int | None) -> E2ESplit:
    """Keep the rows of the first ``max_mrs`` distinct MRs (evaluation limits count MRs, not references)."""
    check_limit("max_mrs", max_mrs)
    if max_mrs is None:
        return split
    keep = set(group_by_mr(split.mrs, split.refs)[0][:max_mrs])
    rows = [(m, r) for m, r in zip(split.mrs, split.refs) if m in keep]
    return E2ESplit([m for m, _ in rows], [r for _, r in rows], split.source)


def group_by_mr(mrs: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance, and the references of each (what the scorer compares)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in zip(mrs, refs):
        groups.setdefault(mr, []).append(ref)
    return list(groups), list(groups.values())


def resolve_local_files(data_dir: str | None, train_file: str | None, validation_file: str | None,
                        test_file: str | None) -> dict[str, str | None]:
    """``{split: path or None}``: explicit files win over ``data_dir``'s original file names."""
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir!r} does not exist.")
    explicit = {"train": train_file, "validation": validation_file, "test": test_file}
    files: dict[str, str | None] = {}
    for split, path in explicit.items():
        if path is None and data_dir is not None and os.path.isfile(os.path.join(data_dir, LOCAL_FILES[split])):
            path = os.path.join(data_dir, LOCAL_FILES[split])
        files[split] = path
    for split in ("train", "test"):
        if files[split] is None:
            where = f"--data_dir {data_dir!r} has no {LOCAL_FILES[split]}" if data_dir else f"no --{split}_file"
            raise FileNotFoundError(f"E2E needs a {split} set: {where}; pass --{split}_file PATH (an mr,ref CSV).")
    return files


def load_local(files: dict[str, str | None], max_train: int | None = None,
               max_eval_mrs: int | None = None) -> dict[str, E2ESplit]:
    """Read the resolved local files; evaluation splits are limited to their first ``max_eval_mrs`` MRs."""
    splits = {}
    for split, path in files.items():
        if path is None:
            continue
        data = read_csv(path, max_train if split == "train" else None)
        splits[split] = data if split == "train" else limit_mrs(data, max_eval_mrs)
    return splits


def load_hub(name: str = "GEM/e2e_nlg", max_train: int | None = None, max_eval_mrs: int | None = None) -> dict[str, E2ESplit]:
    """E2E from the Hub (``GEM/e2e_nlg`` or ``e2e_nlg``); needs the network or the datasets cache."""
    from datasets import load_dataset

    check_limit("max_train", max_train)

    if name not in HUB_COLUMNS:
        raise ValueError(f"--dataset_name {name!r}: choose one of {list(HUB_COLUMNS)}, or pass local CSVs.")
    try:
        dataset = load_dataset(name)
    except Exception as exc:  # offline, no cache: say what to do instead
        raise OSError(
            f"Could not load {name} from the Hub ({type(exc).__name__}: {exc}). "
            "Pass --data_dir with the original E2E CSVs (trainset.csv, devset.csv, testset_w_refs.csv), "
            "or --train_file/--test_file."
        ) from exc
    mr_col, ref_col = HUB_COLUMNS[name]
    out = {}
    for split in ("train", "validation", "test"):
        if split not in dataset:
            continue
        data = dataset[split]
        missing = [c for c in (mr_col, ref_col) if c not in data.column_names]
        if missing:
            raise ValueError(f"{name}/{split} has columns {data.column_names}; expected {mr_col!r} and {ref_col!r}.")
        if split == "train" and max_train is not None:
            data = data.select(range(min(max_train, len(data))))
        mrs, refs = [m.strip() for m in data[mr_col]], [r.strip() for r in data[ref_col]]
        for i, mr in enumerate(mrs):
            parse_mr(mr, f"{name}/{split} row {i}")
        if split != "train" and "references" in data.column_names:
            mrs, refs = _expand_references(mrs, data["references"])
        part = E2ESplit(mrs, refs, f"{name}/{split}")
        out[split] = part if split == "train" else limit_mrs(part, max_eval_mrs)
    for split in ("train", "test"):
        if split not in out:
            raise ValueError(f"{name} has no {split} split (found {list(dataset)}).")
    return out


def _expand_references(mrs: list[str], references: list[list[str]]) -> tuple[list[str], list[str]]:
    """GEM's evaluation rows carry every reference of their MR in ``references``: one row per (MR, reference)."""
    out_mrs, out_refs, seen = [], [], set()
    for mr, group in zip(mrs, references):
        if mr in seen:  # GEM repeats an MR's full list on each of its rows
            continue
        seen.add(mr)
        for ref in group:
            out_mrs.append(mr)
            out_refs.append(ref.strip())
    return out_mrs, out_refs


def encode_example(tokenizer, mr: str, ref: str, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = context + eos + ``" " + reference`` + eos; ``labels`` are -100 on context and first eos.

    Sequences over ``max_length`` lose the end of the reference (E2E examples are far below 512 tokens).
    """
    eos = tokenizer.eos_token_id
    context = tokenizer(format_mr(mr), add_special_tokens=False)["input_ids"] + [eos]
    completion = tokenizer(" " + tokenize_text(ref), add_special_tokens=False)["input_ids"] + [eos]
    ids = (context + completion)[:max_length]
    labels = ([-100] * len(context) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer, mr: str) -> list[int]:
    """The generation prompt of an MR: its context followed by the end-of-text token."""
    return tokenizer(format_mr(mr), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def write_references(path: str, groups: Sequence[Sequence[str]]) -> None:
    """References grouped by MR with a blank line between groups (the layout ``measure_scores.py`` reads)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(group) for group in groups) + "\n")


def write_predictions(path: str, predictions: Sequence[str]) -> None:
    """One output per line, in MR order; newlines inside an output would shift every later line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(" ".join(p.split()) + "\n" for p in predictions))
