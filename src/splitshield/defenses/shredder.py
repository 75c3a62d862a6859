"""Shredder: learned additive noise (Mireshghallah et al., "Shredder: Learning Noise Distributions to
Protect Inference Privacy", ASPLOS 2020).

Shredder learns a noise tensor added to the feature, trading task loss against "information
degradation" with a knob λ; at inference the noise is drawn from a distribution fitted to what was
learned. The exact loss is not public in the material we could read (ALGORITHMS §D); this is the
faithful reimplementation given there, with the noise made a learnable distribution so it can be both
trained and sampled:

- per feature element, noise n ~ Laplace(μ, b) with learnable location μ (initialised from Laplace(0, b₀),
  as Shredder initialises its tensors) and learnable scale b = exp(log_b) (initialised to b₀);
- training draws n by reparameterisation (n = μ + b·(E₁ − E₂), E ~ Exp(1)), so the gradient reaches μ
  and b: **the noise parameters are in the trainer's optimiser** (they are this module's parameters;
  a known bug elsewhere created them outside the optimiser so they never moved);
- loss term −λ·E|n| with E|n| = b·exp(−|μ|/b) + |μ| in closed form (more noise = more degradation);
- inference draws from the same learned distribution.

Adam (the trainer's optimiser) normalises gradients, so each log-scale moves by at most about the learning
rate per step whatever λ is (n steps at learning rate η scale b by at most about e^(nη)): over a short
training ``init_scale`` sets the noise level and λ mostly whether it grows. ``examples/cem_lenet.yaml``
therefore sweeps b₀; what it measures is on the generated results page, ``benchmarks/results/README.md``.

All of Shredder's training state is its parameters: μ and log b are saved with the defense (``defense.*``)
and their Adam state with the trainer's (``optim.*``), and the noise is drawn from torch's global RNG,
which the trainer seeds per epoch; so training resumes from a checkpoint as if uninterrupted.

Shredder keeps the pretrained network frozen; to reproduce that, set ``requires_grad_(False)`` on the
split model's parameters before training (the trainer then only moves the noise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._params import non_negative, positive, positive_int
from .base import Defense
from .noise import laplace_like


class Shredder(Defense):
    """Learned element-wise Laplace noise on the feature, rewarded for its magnitude.

    Parameters
    ----------
    feature_shape:
        Shape of one feature (without the batch dimension), e.g. ``(16, 8, 8)``.
    lam:
        Weight λ >= 0 of the noise-magnitude reward.
    init_scale:
        Initial Laplace scale b₀ > 0.
    seed:
        Seeds the initial location draw.
    """

    name = "shredder"

    def __init__(self, feature_shape: tuple[int, ...] | list[int], lam: float = 0.01, init_scale: float = 0.1,
                 seed: int = 0):
        super().__init__()
        self.feature_shape = tuple(positive_int("feature_shape", int(s)) for s in feature_shape)
        self.lam = non_negative("lam", lam)
        self.init_scale = positive("init_scale", init_scale)
        self.seed = int(seed)
        g = torch.Generator().manual_seed(self.seed)
        e1 = torch.empty(self.feature_shape).exponential_(generator=g)
        e2 = torch.empty(self.feature_shape).exponential_(generator=g)
        self.loc = nn.Parameter(self.init_scale * (e1 - e2))
        self.log_scale = nn.Parameter(torch.full(self.feature_shape, math.log(self.init_scale)))

    def noise_magnitude(self) -> torch.Tensor:
        """E|n| averaged over elements (a differentiable 0-d tensor)."""
        b = self.log_scale.exp()
        return (b * torch.exp(-self.loc.abs() / b) + self.loc.abs()).mean()

    def learned_std(self) -> float:
        """The random part's standard deviation per element, root-mean-square over elements: √(2·mean(b²))."""
        return math.sqrt(2 * self.log_scale.detach().exp().pow(2).mean().item())

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        b = self.log_scale.exp()
        return z + self.loc + laplace_like(z, 1.0) * b

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        return -self.lam * self.noise_magnitude() if self.lam else None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "feature_shape": list(self.feature_shape), "lam": self.lam,
                "init_scale": self.init_scale, "seed": self.seed}
