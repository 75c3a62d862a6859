"""Figures: reconstruction grids and Pareto plots (PNG via matplotlib). Images are float tensors in [0, 1], NCHW."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, top: float = 1.0) -> Path:
    """Lay out ``fig`` below ``top`` (a fraction of its height: the space above is left to a title), write it as a
    PNG to ``path`` (creating its folder), close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reconstruction_grid(originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                        title: str | None = None) -> Path:
    """Save a grid: ``originals`` [N, C, H, W] on the first row, then one labelled row per reconstruction.

    Parameters
    ----------
    originals:
        The private images, [N, C, H, W] in [0, 1].
    rows:
        (label, images [N, C, H, W]) pairs, e.g. ``("ReLU2 · white-box · 19.9 dB", x_hat)``.
    path:
        Output PNG path (parent folders are created).
    """
    plt = _pyplot()
    all_rows = [("original", originals), *rows]
    n = originals.shape[0]
    title_inches = 0.4 if title else 0.0
    height = 0.95 * len(all_rows) + title_inches
    fig, axes = plt.subplots(len(all_rows), n, figsize=(0.9 * n + 2.6, height), squeeze=False)
    for r, (label, images) in enumerate(all_rows):
        if images.shape != originals.shape:
            raise ValueError(f"row {label!r}: shape {tuple(images.shape)} differs from {tuple(originals.shape)}")
        for c in range(n):
            ax = axes[r][c]
            img = images[c].detach().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:  # in its own strip: tight_layout alone lets a tall grid's first row run into it
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / height, va="top")
    return _save(fig, path, top=1 - title_inches / height)


def pareto_plot(costs: Sequence[float], leakage: Sequence[float], labels: Sequence[str], front: Sequence[int],
                path: str | Path, xlabel: str, ylabel: str, title: str | None = None,
                highlight: int | None = None) -> Path:
    """Save a scatter of leakage against a cost, one labelled dot per point, the Pareto front joined by a line.

    Parameters
    ----------
    costs, leakage, labels:
        One entry per point: its cost (x), its leakage (y) and its name.
    front:
        Indices of the Pareto-optimal points, drawn larger and joined in order of cost.
    path:
        Output PNG path (parent folders are created).
    xlabel, ylabel, title:
        Axis labels (with units) and an optional title. A cost axis spanning more than 100× is logarithmic.
    highlight:
        Index of a point drawn as a star (the recommended one).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(costs, leakage, s=18, color="#999999", zorder=2)
    on_front = sorted(front, key=lambda i: costs[i])
    ax.plot([costs[i] for i in on_front], [leakage[i] for i in on_front], "-o", color="#2b6cb0", markersize=6,
            label="Pareto front", zorder=3)
    if highlight is not None:
        ax.scatter([costs[highlight]], [leakage[highlight]], marker="*", s=260, color="#d69e2e", edgecolor="k",
                   label="recommended", zorder=4)
    for i, label in enumerate(labels):
        ax.annotate(label, (costs[i], leakage[i]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                    color="#222222" if i in front else "#888888")
    positive = [c for c in costs if c > 0]
    if positive and max(positive) > 100 * min(positive):
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
