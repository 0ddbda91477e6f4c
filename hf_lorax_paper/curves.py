"""The training-curve PNG every run writes (loss and eval metrics against the step)."""

from __future__ import annotations


def plot_training_curve(log_history: list[dict], path: str) -> str | None:
    """Training loss and every logged eval metric against the step, as a PNG; None when nothing was logged."""
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = {k: [(e["step"], e[k]) for e in log_history if k in e] for e in log_history for k in e
             if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "epoch"))}
    if not losses and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    if losses:
        axes[0][0].plot(*zip(*losses), label="train loss")
    axes[0][0].set(xlabel="step", ylabel="loss", title="training loss")
    for name, points in sorted(evals.items()):
        axes[0][-1 if name != "eval_loss" else 0].plot(*zip(*points), marker="o", label=name)
    if evals:
        axes[0][1].set(xlabel="step", title="evaluation")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
