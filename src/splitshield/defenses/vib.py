"""VIB / MID: a variational information bottleneck on the feature (Alemi et al., "Deep Variational
Information Bottleneck", ICLR 2017; as a model-inversion defense "MID", Wang et al., "Improving Robustness
to Model Inversion Attacks via Mutual Information Regularization", AAAI 2021; code followed: CEM's
``BiDO/engine.train_vib``, ALGORITHMS §D).

A learned per-position linear map over channels turns the head's feature into statistics (μ, s); the
feature sent is z = μ + σ⊙ε with σ = softplus(s − 5), ε ~ N(0, I), in training **and** at inference
(the randomness is the defense). The loss adds β·KL(N(μ, σ²) ‖ N(0, I)),
KL = −½ Σ (1 + 2 log σ − μ² − σ²), summed over feature elements and averaged over the batch.
Unlike the BiDO code the latent keeps the head's shape (so any tail fits unchanged); the map starts as
the identity for μ and gives σ = softplus(−5) ≈ 0.0067.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._params import non_negative, positive_int
from .base import Defense


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample [B], summed over all other dimensions."""
    kl = -0.5 * (1 + 2 * torch.log(sigma) - mu.pow(2) - sigma.pow(2))
    return kl.flatten(1).sum(1)


class VIB(Defense):
    """Variational information bottleneck with weight β.

    Parameters
    ----------
    channels:
        Channels of the feature (its dimension 1), e.g. 16 for LeNet at ReLU2.
    beta:
        KL weight β >= 0 (BiDO sweeps 0.001 to 0.25, default 0.1).
    """

    name = "vib"

    def __init__(self, channels: int, beta: float = 0.01):
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.beta = non_negative("beta", beta)
        self.stats = nn.Linear(channels, 2 * channels)
        with torch.no_grad():
            self.stats.weight.zero_()
            self.stats.weight[:channels].copy_(torch.eye(channels))
            self.stats.bias.zero_()

    def statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ), each shaped like ``z`` [B, C, ...]."""
        out = self.stats(z.movedim(1, -1)).movedim(-1, 1)
        mu, s = out.chunk(2, dim=1)
        return mu, F.softplus(s - 5.0)

    def clean(self, z: torch.Tensor) -> torch.Tensor:
        return self.statistics(z)[0]

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        mu, sigma = self.statistics(z)
        return mu + sigma * torch.randn_like(mu)

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        if not self.beta:
            return None
        mu, sigma = self.statistics(z)
        return self.beta * gaussian_kl(mu, sigma).mean()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.channels, "beta": self.beta}
