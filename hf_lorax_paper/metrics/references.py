"""Validation of the ``(predictions, references)`` pairs that multi-reference text metrics take."""

from __future__ import annotations

from collections.abc import Iterable


def _is_collection(value: object) -> bool:
    """Lists, tuples, numpy arrays, dataset columns: anything iterable except a bare string."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def check_inputs(
    predictions: Iterable[str], references: Iterable[Iterable[str]]
) -> tuple[list[str], list[list[str]]]:
    """Validate and copy the inputs; every problem is a ValueError naming the offending item."""
    if not _is_collection(predictions):
        raise ValueError("predictions must be a list of strings, one per item")
    if not _is_collection(references):
        raise ValueError("references must be a list of lists of strings (all references of each item)")
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} reference lists: lengths differ"
        )
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] is {type(prediction).__name__}, not a string")
    return predictions, [_check_reference_list(i, item) for i, item in enumerate(references)]


def _check_reference_list(i: int, item: Iterable[str]) -> list[str]:
    if not _is_collection(item):
        raise ValueError(f"references[{i}] must be a list of reference strings, got {type(item).__name__}")
    item = list(item)
    if not item:
        raise ValueError(
            f"references[{i}] is an empty reference list: every item needs at least one reference"
        )
    for j, ref in enumerate(item):
        if not isinstance(ref, str):
            raise ValueError(f"references[{i}][{j}] is {type(ref).__name__}, not a string")
    return list(item)
