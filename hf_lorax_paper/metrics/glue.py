"""GLUE metrics in numpy: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.

``evaluate.load("glue", ...)`` fetches its script from the Hub and fails offline; these match
scikit-learn / scipy (tests/test_glue.py checks them against both when installed).
"""

from __future__ import annotations

import numpy as np


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean())


def f1_binary(predictions, labels, positive: int = 1) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    tp = np.sum((predictions == positive) & (labels == positive))
    fp = np.sum((predictions == positive) & (labels != positive))
    fn = np.sum((predictions != positive) & (labels == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    confusion = np.array([[np.sum((labels == t) & (predictions == p)) for p in classes] for t in classes], float)
    n, correct = confusion.sum(), np.trace(confusion)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * n - true_counts @ pred_counts
    denominator = np.sqrt((n**2 - pred_counts @ pred_counts) * (n**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    x, y = np.asarray(predictions, float), np.asarray(labels, float)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / denominator) if denominator else 0.0


def _rank(values) -> np.ndarray:
    """Ranks with ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2 + 1
            start = end
    return ranks


def spearman(predictions, labels) -> float:
    return pearson(_rank(predictions), _rank(labels))


METRIC_FUNCTIONS = {
    "accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corrcoef,
    "pearson": pearson, "spearmanr": spearman,
}
