"""Task metrics computed locally (the Hub's ``evaluate.load(...)`` modules are unreachable offline)."""

from .glue import accuracy, f1_binary, matthews_corrcoef, pearson, spearman

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef", "pearson", "spearman"]
