"""NoPeek: minimise the distance correlation between the input and the feature sent (Vepakomma, Gupta,
Gupta, Raskar, "NoPeek: Information leakage reduction to share activations in distributed deep
learning", ICDMW 2020). Loss = CE + α·DCor(x, z_sent) per batch; the estimator is the CEM code's
``utils.dist_corr`` (ALGORITHMS §D), with ε = 1e-7.
"""

from __future__ import annotations

from typing import Any

import torch

from ._params import non_negative
from .base import Defense

_EPS = 1e-7


def _double_centered_distances(a: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(a, a)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of paired samples ``a`` [n, ...] and ``b`` [n, ...], in [0, 1].

    1 for ``b`` a scaled rotation of ``a``; close to 0 (a positive bias of order 1/√n) for independent samples.
    """
    A = _double_centered_distances(a.flatten(1))
    B = _double_centered_distances(b.flatten(1).to(A.dtype))
    n2 = A.shape[0] ** 2
    dcov = torch.sqrt(_EPS + (A * B).sum() / n2)
    dvar_a = torch.sqrt(_EPS + (A * A).sum() / n2)
    dvar_b = torch.sqrt(_EPS + (B * B).sum() / n2)
    return dcov / (torch.sqrt(dvar_a * dvar_b) + _EPS)


class NoPeek(Defense):
    """Penalise α·DCor(x, z_sent) in training.

    Parameters
    ----------
    alpha:
        Weight α >= 0 of the distance correlation (the CEM code comment uses 0.1; it is usually swept).
    """

    name = "nopeek"

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        self.alpha = non_negative("alpha", alpha)

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        return self.alpha * distance_correlation(x, z_sent) if self.alpha else None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}
