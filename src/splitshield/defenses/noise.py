"""Additive feature noise: He, Zhang, Lee (IoT-J 2020, "Attacking and protecting data privacy in edge-cloud
collaborative inference systems"), §IV: v = f1(x) + ε with ε Gaussian or Laplace (ALGORITHMS §A.7).

The noise is drawn afresh for every element, in training and at inference (it is the deployed defense).
Laplace noise is parametrised by its **scale** b, as in the authors' code (`np.random.laplace(scale=b)`);
its standard deviation is √2·b, not b (the paper calls b a standard deviation). ``std`` always gives the
true standard deviation, which is what the conditional-entropy floor and CEM's threshold use.

Noise defends only a feature of fixed scale (ALGORITHMS §F.6): compose with
:class:`~splitshield.defenses.FeatureBound` first when the head is trained with the noise, and report
σ relative to the feature's scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._params import non_negative
from .base import Defense


def laplace_like(z: torch.Tensor, scale: float) -> torch.Tensor:
    """Laplace(0, scale) noise shaped, typed and placed like ``z``: the difference of two Exp(1) draws."""
    return scale * (torch.empty_like(z).exponential_() - torch.empty_like(z).exponential_())


class GaussianNoise(Defense):
    """z + N(0, σ²) element-wise.

    Parameters
    ----------
    sigma:
        Standard deviation σ >= 0, in the feature's units.
    """

    name = "gaussian_noise"

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = non_negative("sigma", sigma)

    @property
    def std(self) -> float:
        """Standard deviation of the added noise."""
        return self.sigma

    def std_for(self, dim: int) -> float:
        """Noise standard deviation per element of a ``dim``-element feature (σ, whatever ``dim``)."""
        return self.sigma

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z + self.sigma * torch.randn_like(z) if self.sigma else z

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma}


class LaplaceNoise(Defense):
    """z + Laplace(0, b) element-wise; standard deviation √2·b.

    Parameters
    ----------
    scale:
        The Laplace scale b >= 0 (He et al.'s "b"), in the feature's units.
    """

    name = "laplace_noise"

    def __init__(self, scale: float = 0.1):
        super().__init__()
        self.scale = non_negative("scale", scale)

    @property
    def std(self) -> float:
        """Standard deviation of the added noise, √2·b."""
        return math.sqrt(2.0) * self.scale

    def std_for(self, dim: int) -> float:
        """Noise standard deviation per element of a ``dim``-element feature (√2·b, whatever ``dim``)."""
        return self.std

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z + laplace_like(z, self.scale) if self.scale else z

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


def noise_std(defense: Defense, feature_shape: tuple[int, ...]) -> float:
    """Standard deviation per element of all the additive noise ``defense`` puts on a feature of ``feature_shape``.

    Independent noises add in variance. Defenses with a fixed noise level expose ``std_for(dim)``
    (Gaussian, Laplace, DP noise); others (learned or multiplicative ones) count as 0.
    """
    dim = math.prod(feature_shape)
    parts = getattr(defense, "parts", [defense])
    variance = sum(part.std_for(dim) ** 2 for part in parts if callable(getattr(part, "std_for", None)))
    return math.sqrt(variance)
