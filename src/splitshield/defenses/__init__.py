"""Defenses: what the edge does to a feature before it leaves the device.

Every defense is a :class:`Defense` (see ``base.py`` for the protocol); ``a + b`` composes two.
:func:`build_defense` rebuilds one from the ``config()`` dict stored with checkpoints and results.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adversarial import AdversarialReconstruction
from .base import Compose, Defense, NoDefense
from .bound import FeatureBound
from .cem import CEM
from .dp import DPNoise
from .filters import Dropout, Quantize, TopKPrune
from .infoscissors import InfoScissors
from .noise import GaussianNoise, LaplaceNoise, noise_std
from .nopeek import NoPeek, distance_correlation
from .shredder import Shredder
from .vib import VIB

DEFENSES: dict[str, type[Defense]] = {"none": NoDefense}
DEFENSES.update({cls.name: cls for cls in (
    FeatureBound, GaussianNoise, LaplaceNoise, DPNoise, Dropout, TopKPrune, Quantize, Shredder, NoPeek, VIB,
    AdversarialReconstruction, InfoScissors, CEM,
)})


def build_defense(config: dict[str, Any]) -> Defense:
    """Rebuild a defense from its ``config()``: ``{"name": ..., **parameters}``."""
    params = dict(config)
    name = params.pop("name", None)
    if name == "compose":
        return Compose(*(build_defense(part) for part in params.get("parts", [])))
    if name not in DEFENSES:
        raise ConfigError(f"defense: unknown name {name!r}; known: {', '.join(sorted(DEFENSES))}")
    try:
        return DEFENSES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"defense {name!r}: {exc}") from None


__all__ = ["DEFENSES", "Compose", "Defense", "NoDefense", "build_defense",
           "CEM", "VIB", "AdversarialReconstruction", "DPNoise", "Dropout", "FeatureBound", "GaussianNoise",
           "InfoScissors", "LaplaceNoise", "NoPeek", "Quantize", "Shredder", "TopKPrune", "distance_correlation",
           "noise_std"]
