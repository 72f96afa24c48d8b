"""A PNG heatmap of the compatibility matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.evaluate import CompatReport


def plot_matrix(report: CompatReport, path: str | Path, metrics: tuple[str, ...] = ("top1", "mAP")) -> Path:
    """One heatmap per metric; rows are query models, columns gallery models, blank where dims differ."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and never pop a window from a library
    import matplotlib.pyplot as plt

    names = report.models
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(1.6 + 1.5 * len(names) * len(metrics), 1.2 + 1.1 * len(names))
    )
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics, strict=True):
        grid = np.full((len(names), len(names)), np.nan)
        for i, q in enumerate(names):
            for j, g in enumerate(names):
                c = report.cell(q, g)
                if c:
                    grid[i, j] = c[metric]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.3f}",
                        ha="center",
                        va="center",
                        color="white" if grid[i, j] < 0.6 else "black",
                        fontsize=9,
                    )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("gallery model")
        ax.set_ylabel("query model")
        ax.set_title(metric)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
