"""Figures: reconstruction grids (PNG via matplotlib). Images are float tensors in [0, 1], NCHW."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_rows = [("original", originals), *rows]
    n = originals.shape[0]
    fig, axes = plt.subplots(len(all_rows), n, figsize=(0.9 * n + 2.6, 0.95 * len(all_rows) + (0.4 if title else 0)),
                             squeeze=False)
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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
