"""Figures shared by every analysis: heatmaps, ROC curves (linear and log), Pareto curves.

Every figure is stamped with the script that made it, so a reader can regenerate it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from memprobe.io import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, *, script: str | None = None) -> Path:
    """Save `fig` as PNG with a footer naming the script that produced it, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    script = script or Path(sys.argv[0]).name
    fig.text(0.995, 0.005, f"made by {script}", ha="right", va="bottom", fontsize=6, color="0.5")
    try:
        with atomic_path(path) as tmp:  # the temp name ends in .tmp: the format comes from `path`
            fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def heatmap(
    values: np.ndarray,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cbar_label: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = False,
) -> plt.Figure:
    """A labelled heatmap (rows x columns), e.g. site kind x layer."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * values.shape[1] + 2), max(2.5, 0.45 * values.shape[0] + 1.5)))
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(row_labels)), row_labels)
    step = max(1, len(col_labels) // 30)
    ax.set_xticks(range(0, len(col_labels), step), [col_labels[i] for i in range(0, len(col_labels), step)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if annotate:
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    return fig


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str) -> plt.Figure:
    """ROC curves side by side on linear and log false-positive axes ({name: (fpr, tpr)})."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, log in zip(axes, (False, True), strict=True):
        for name, (fpr, tpr) in curves.items():
            ax.plot(fpr, tpr, label=name)
        ax.plot([1e-4, 1], [1e-4, 1], ls="--", c="0.6", lw=0.8)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1.02)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{title} ({'log' if log else 'linear'})")
    axes[1].legend(fontsize=7, loc="lower right")
    return fig
