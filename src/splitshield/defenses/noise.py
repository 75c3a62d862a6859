"""Additive noise: He, Zhang, Lee (IoT-J 2020, "Attacking and protecting data privacy in edge-cloud
collaborative inference systems"), §IV: on the feature, v = f1(x) + ε, or on the input, v = f1(x + ε), with ε
Gaussian or Laplace (ALGORITHMS §A.7).

Input noise is added to the images in [0, 1], before the model's own normalisation, and is not clipped
(clipping would bias it): σ on the input equals σ/std in He et al.'s normalised space (std = 0.3081 on
MNIST). It is not feature noise: it does not count in :func:`noise_std`, so neither the
conditional-entropy floor nor CEM's threshold uses it.

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

from ._params import choice, non_negative
from .base import Defense


def laplace_like(z: torch.Tensor, scale: float) -> torch.Tensor:
    """Laplace(0, scale) noise shaped, typed and placed like ``z``: the difference of two Exp(1) draws."""
    return scale * (torch.empty_like(z).exponential_() - torch.empty_like(z).exponential_())


class _AdditiveNoise(Defense):
    """Element-wise noise added on the feature (``on="feature"``) or on the input images (``on="input"``)."""

    def __init__(self, on: str = "feature"):
        super().__init__()
        self.on = choice("on", on, ("feature", "input"))

    @property
    def std(self) -> float:
        """Standard deviation of the added noise."""
        raise NotImplementedError

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped, typed and placed like ``like``."""
        raise NotImplementedError

    def std_for(self, dim: int) -> float:
        """Feature-noise standard deviation per element of a ``dim``-element feature (0 for input noise)."""
        return self.std if self.on == "feature" else 0.0

    def perturb(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        return x + self.draw(x) if self.on == "input" and self.std else x

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z + self.draw(z) if self.on == "feature" and self.std else z


class GaussianNoise(_AdditiveNoise):
    """z + N(0, σ²) element-wise (or x + N(0, σ²) with ``on="input"``).

    Parameters
    ----------
    sigma:
        Standard deviation σ >= 0, in the feature's units (the image's [0, 1] units with ``on="input"``).
    on:
        ``"feature"`` (default) or ``"input"``.
    """

    name = "gaussian_noise"

    def __init__(self, sigma: float = 0.1, on: str = "feature"):
        super().__init__(on)
        self.sigma = non_negative("sigma", sigma)

    @property
    def std(self) -> float:
        """Standard deviation of the added noise, σ."""
        return self.sigma

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return self.sigma * torch.randn_like(like)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "on": self.on}


class LaplaceNoise(_AdditiveNoise):
    """z + Laplace(0, b) element-wise (or x + Laplace(0, b) with ``on="input"``); standard deviation √2·b.

    Parameters
    ----------
    scale:
        The Laplace scale b >= 0 (He et al.'s "b"), in the feature's units (the image's with ``on="input"``).
    on:
        ``"feature"`` (default) or ``"input"``.
    """

    name = "laplace_noise"

    def __init__(self, scale: float = 0.1, on: str = "feature"):
        super().__init__(on)
        self.scale = non_negative("scale", scale)

    @property
    def std(self) -> float:
        """Standard deviation of the added noise, √2·b."""
        return math.sqrt(2.0) * self.scale

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return laplace_like(like, self.scale)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "on": self.on}


def noise_std(defense: Defense, feature_shape: tuple[int, ...]) -> float:
    """Standard deviation per element of all the additive noise ``defense`` puts on a feature of ``feature_shape``.

    Independent noises add in variance. Defenses with a fixed noise level expose ``std_for(dim)``
    (Gaussian, Laplace, DP noise); others (learned or multiplicative ones) count as 0.
    """
    dim = math.prod(feature_shape)
    parts = getattr(defense, "parts", [defense])
    variance = sum(part.std_for(dim) ** 2 for part in parts if callable(getattr(part, "std_for", None)))
    return math.sqrt(variance)
