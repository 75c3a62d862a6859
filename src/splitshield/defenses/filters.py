"""Information filters on the feature: random dropout, top-k pruning, n-bit quantisation.

- Dropout: He, Zhang, Lee (IoT-J 2020) §IV drop feature elements with probability r at inference,
  **without** the 1/(1 − r) rescaling, on the unchanged model (ALGORITHMS §A.7); CEM's ``dropoutR``
  does the same in training and inference (§B.4). ``rescale=True`` gives standard (inverted) dropout.
- Top-k pruning: CEM's ``topkpruneR`` (Xia et al., CVPR 2025, code; §B.4) zeroes the R-fraction of
  smallest elements. We prune per sample by magnitude (the batch-wide version of the code would make a
  user's feature depend on other users' inputs); for a ReLU feature magnitude and value agree.
- Quantisation: uniform n-bit quantisation between each sample's min and max, by the quantiser the wire
  codec's uint8/uint4 encodings use (:mod:`splitshield._quantize`), so ``Quantize(8)`` of a sample equals
  its uint8 wire round trip; the rounding passes gradients straight through so the head can be trained
  and attacked through it.

All three act in training and at inference, and keep shape, dtype and device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._quantize import MAX_BITS, fake_quantize
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

    Per sample ``z[i]``: ``offset = min``, ``scale = (max - min) / (2**bits - 1)`` rounded toward zero to a
    float32, values ``scale * round((z - offset) / scale) + offset`` (see :mod:`splitshield._quantize`).

    Parameters
    ----------
    bits:
        Bits per element, 1 to 16 (2**bits levels).
    """

    name = "quantize"

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = positive_int("bits", bits)
        if self.bits > MAX_BITS:
            raise ConfigError(f"bits must be <= {MAX_BITS}, got {bits!r}")

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return fake_quantize(z, self.bits, per_sample=True)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}
