"""Task metrics computed locally (the Hub's ``evaluate.load(...)`` modules are unreachable offline)."""

from .glue import accuracy, f1_binary, matthews_corrcoef, pearson, spearman

__all__ = ["accuracy", "e2e_scores", "f1_binary", "matthews_corrcoef", "pearson", "spearman"]


def __getattr__(name: str):
    """Import ``e2e_scores`` on first use: its module loads ``evaluate`` and ``datasets`` (seconds)."""
    if name == "e2e_scores":
        from .e2e import e2e_scores

        return e2e_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
