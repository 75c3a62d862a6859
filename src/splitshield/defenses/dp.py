"""Differentially private feature release: clip each sample's feature, then add calibrated noise.

The Laplace and Gaussian mechanisms (Dwork & Roth, "The Algorithmic Foundations of Differential
Privacy", 2014, Thm 3.6 and Thm A.1), applied to the feature as local DP; the CEM code's ``local_dp``
(ALGORITHMS §D) calibrates the same way but assumes a sensitivity of 1 without clipping, which
guarantees nothing. Here the feature is first scaled to norm at most C, so the sensitivity is known:

- after clipping, any two inputs give features at distance at most 2C in the clipping norm, so the
  sensitivity is Δ = 2C in that norm; the L2 ball is inside the L1 ball (Δ₂ <= Δ₁), and an L2-clipped
  d-dimensional feature has Δ₁ <= 2C·√d;
- **Laplace**: b = Δ₁ / ε gives ε-DP;
- **Gaussian**: σ = Δ₂·√(2 ln(1.25/δ)) / ε gives (ε, δ)-DP, proven for 0 < ε < 1 only (larger ε raise).

What is guaranteed: one released feature vector of one input is ε- (or (ε, δ)-) DP with respect to
replacing that input by **any** other input (local DP of a single query), whatever the head, as long
as the head and the clipping run on the device. What is **not** guaranteed: anything about repeated
queries of the same or correlated inputs (ε adds up under composition); anything about the training
data (this is not DP-SGD); usefulness (at small ε the noise, of norm ~2C·√d/ε, dwarfs the feature).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ._params import choice, positive
from .base import Defense
from .noise import laplace_like


def laplace_scale(epsilon: float, sensitivity_l1: float) -> float:
    """Laplace mechanism scale b = Δ₁ / ε."""
    return positive("sensitivity", sensitivity_l1) / positive("epsilon", epsilon)


def gaussian_sigma(epsilon: float, delta: float, sensitivity_l2: float) -> float:
    """Classical Gaussian mechanism σ = Δ₂·√(2 ln(1.25/δ)) / ε, valid for 0 < ε < 1, 0 < δ < 1."""
    positive("epsilon", epsilon)
    if epsilon >= 1:
        raise ConfigError(f"epsilon must be < 1 for the classical Gaussian mechanism, got {epsilon!r}; "
                          "use mechanism='laplace' for larger epsilon")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return positive("sensitivity", sensitivity_l2) * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def clip_norm(z: torch.Tensor, bound: float, norm: str) -> torch.Tensor:
    """Scale each sample of ``z`` [B, ...] down to ``norm`` ("l1" or "l2") at most ``bound``."""
    flat = z.flatten(1)
    size = flat.abs().sum(1) if norm == "l1" else flat.norm(dim=1)
    factor = (bound / size.clamp_min(1e-12)).clamp(max=1.0)
    return (flat * factor[:, None]).view_as(z)


class DPNoise(Defense):
    """Per-sample norm clipping to C, then Laplace (ε-DP) or Gaussian ((ε, δ)-DP) noise.

    Parameters
    ----------
    epsilon:
        Privacy budget ε > 0 of one release (< 1 for the Gaussian mechanism).
    clip:
        Norm bound C > 0, in the feature's units.
    mechanism:
        ``"laplace"`` or ``"gaussian"``.
    delta:
        δ in (0, 1) of the Gaussian mechanism (ignored by Laplace).
    norm:
        Clipping norm, ``"l1"`` or ``"l2"``; ``None`` takes the mechanism's natural one (L1 for
        Laplace, L2 for Gaussian). Laplace with L2 clipping uses Δ₁ = 2C·√d.
    """

    name = "dp_noise"

    def __init__(self, epsilon: float = 0.5, clip: float = 1.0, mechanism: str = "laplace", delta: float = 1e-5,
                 norm: str | None = None):
        super().__init__()
        self.epsilon = positive("epsilon", epsilon)
        self.clip = positive("clip", clip)
        self.mechanism = choice("mechanism", mechanism, ("laplace", "gaussian"))
        self.delta = float(delta)
        self.norm = choice("norm", norm or ("l1" if mechanism == "laplace" else "l2"), ("l1", "l2"))
        if self.mechanism == "gaussian":
            gaussian_sigma(self.epsilon, self.delta, 1.0)  # validates epsilon and delta now, not at first use

    def sensitivity(self, dim: int) -> float:
        """Sensitivity in the mechanism's norm (L1 for Laplace, L2 for Gaussian) for a ``dim``-element feature."""
        if self.mechanism == "laplace" and self.norm == "l2":
            return 2.0 * self.clip * math.sqrt(dim)
        return 2.0 * self.clip

    def std_for(self, dim: int) -> float:
        """Standard deviation of each noise element for a ``dim``-element feature."""
        if self.mechanism == "laplace":
            return math.sqrt(2.0) * laplace_scale(self.epsilon, self.sensitivity(dim))
        return gaussian_sigma(self.epsilon, self.delta, self.sensitivity(dim))

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        clipped = clip_norm(z, self.clip, self.norm)
        dim = z[0].numel()
        if self.mechanism == "laplace":
            return clipped + laplace_like(clipped, laplace_scale(self.epsilon, self.sensitivity(dim)))
        return clipped + gaussian_sigma(self.epsilon, self.delta, self.sensitivity(dim)) * torch.randn_like(clipped)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "epsilon": self.epsilon, "clip": self.clip, "mechanism": self.mechanism,
                "delta": self.delta, "norm": self.norm}
