"""Information filters on the feature: random dropout, top-k pruning, n-bit quantisation.

- Dropout: He, Zhang, Lee (IoT-J 2020) §IV drop feature elements with probability r at inference,
  **without** the 1/(1 − r) rescaling, on the unchanged model (ALGORITHMS §A.7); CEM's ``dropoutR``
  does the same in training and inference (§B.4). ``rescale=True`` gives standard (inverted) dropout.
- Top-k pruning: CEM's ``topkpruneR`` (Xia et al., CVPR 2025, code; §B.4) zeroes the R-fraction of
  smallest elements. We prune per sample by magnitude (the batch-wide version of the code would make a
  user's feature depend on other users' inputs); for a ReLU feature magnitude and value agree.
- Quantisation: uniform n-bit quantisation between each sample's min and max (the codec's scheme);
  the rounding passes gradients straight through so the head can be trained and attacked through it.

All three act in training and at inference, and keep shape, dtype and device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ._params import fraction, positive_int
from .base import Defense


class Dropout(Defense):
    """Zero each element with probability ``rate``; He et al.'s variant does not rescale.

    Parameters
    ----------
    rate:
        Drop probability r in [0, 1).
    rescale:
        Multiply the kept elements by 1/(1 − r) (standard dropout) instead of He et al.'s no-rescale.
    """

    name = "dropout"

    def __init__(self, rate: float = 0.5, rescale: bool = False):
        super().__init__()
        self.rate = fraction("rate", rate)
        self.rescale = bool(rescale)

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.rate:
            return z
        mask = (torch.rand_like(z) >= self.rate).to(z.dtype)
        out = z * mask
        return out / (1.0 - self.rate) if self.rescale else out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate, "rescale": self.rescale}


class TopKPrune(Defense):
    """Keep, per sample, the ceil((1 − ratio)·d) largest-magnitude elements; zero the rest.

    Parameters
    ----------
    ratio:
        Fraction of elements pruned, in [0, 1).
    """

    name = "topk"

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        self.ratio = fraction("ratio", ratio)

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.ratio:
            return z
        flat = z.flatten(1)
        keep = max(1, math.ceil((1.0 - self.ratio) * flat.shape[1]))
        index = flat.abs().topk(keep, dim=1).indices
        mask = torch.zeros_like(flat).scatter_(1, index, 1.0)
        return (flat * mask).view_as(z)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": self.ratio}


class Quantize(Defense):
    """Uniform ``bits``-bit quantisation of each sample between its min and max (straight-through gradient).

    Parameters
    ----------
    bits:
        Bits per element, 1 to 16 (2**bits levels).
    """

    name = "quantize"

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = positive_int("bits", bits)
        if self.bits > 16:
            raise ConfigError(f"bits must be <= 16, got {bits!r}")

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        flat = z.flatten(1)
        lo = flat.min(1, keepdim=True).values
        step = (flat.max(1, keepdim=True).values - lo).clamp_min(1e-12) / (2**self.bits - 1)
        quantized = torch.round((flat - lo) / step) * step + lo
        # Straight-through: the forward value is quantised, the gradient is the identity's.
        return (quantized.detach() + (flat - flat.detach())).view_as(z)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}
