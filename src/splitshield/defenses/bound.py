"""FeatureBound: fix the feature's scale so that noise added after it is a real defense.

Additive noise only protects a feature whose scale the training cannot inflate: trained with noise
on an unbounded ReLU feature, the head simply learns larger features and the signal-to-noise ratio
stays put (ALGORITHMS §F.6). CEM (Xia et al., CVPR 2025) bounds its bottleneck with a sigmoid for
this reason. Put ``FeatureBound`` first, e.g. ``FeatureBound("tanh") + GaussianNoise(0.1) + CEM()``,
so the noise level is relative to a fixed range.
"""

from __future__ import annotations

from typing import Any

import torch

from ._params import choice
from .base import Defense

KINDS = ("sigmoid", "tanh", "standardize")


class FeatureBound(Defense):
    """A fixed, parameter-free squashing of the feature; deterministic (it is its own ``clean``).

    Parameters
    ----------
    kind:
        ``"sigmoid"`` maps to (0, 1); ``"tanh"`` maps to (-1, 1), and a ReLU feature to [0, 1);
        ``"standardize"`` rescales each sample to zero mean and unit variance over all its elements
        (a normalisation without affine parameters, so the scale cannot be learned back).
    """

    name = "bound"

    def __init__(self, kind: str = "tanh"):
        super().__init__()
        self.kind = choice("kind", kind, KINDS)

    def clean(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "sigmoid":
            return torch.sigmoid(z)
        if self.kind == "tanh":
            return torch.tanh(z)
        flat = z.flatten(1)
        mean = flat.mean(1, keepdim=True)
        std = flat.std(1, keepdim=True, unbiased=False)
        return ((flat - mean) / (std + 1e-6)).view_as(z)

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return self.clean(z)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}
