"""The rank-utilization figure: a layers × module-types heatmap and utilization over training steps."""

from __future__ import annotations

import os

from .report import ModuleStats, layer_index, module_type


def plot_rank_utilization(stats: list[ModuleStats], history: list[dict], path: str, title: str) -> str:
    """Write a PNG to ``path``: heatmap of the latest utilization, and mean utilization per step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    types = sorted({module_type(s) for s in stats})
    layers = sorted({layer_index(s.module) for s in stats if layer_index(s.module) is not None}) or [None]
    grid = [[float("nan")] * len(types) for _ in layers]
    for s in stats:
        row = layers.index(layer_index(s.module)) if layer_index(s.module) in layers else 0
        grid[row][types.index(module_type(s))] = s.utilization

    fig, (heat, line) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.35 * len(layers) + 1.5)))
    image = heat.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    heat.set_xticks(range(len(types)), types, rotation=30, ha="right")
    heat.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    heat.set(xlabel="module", ylabel="layer", title="utilization = effective rank / r")
    fig.colorbar(image, ax=heat, fraction=0.046)

    steps = [h["step"] for h in history]
    if steps:
        line.plot(steps, [h["summary"].get("rank_utilization/mean", 0) for h in history], label="mean", lw=2)
        for kind in types:
            key = f"rank_utilization/type/{kind}/mean"
            line.plot(steps, [h["summary"].get(key, float("nan")) for h in history], label=kind, lw=1, alpha=0.8)
        line.legend(fontsize=8)
    line.set(xlabel="step", ylabel="utilization", ylim=(0, 1.05), title="over training")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
