"""Defenses: what the edge does to a feature before it leaves the device.

Every defense is a :class:`Defense` (see ``base.py`` for the protocol); ``a + b`` composes two.
:func:`build_defense` rebuilds one from the ``config()`` dict stored with checkpoints and results.
"""

from __future__ import annotations

import inspect
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


#: Constructor arguments a defense may leave to the target it protects: name -> value from the feature shape.
_FROM_FEATURE = {"feature_shape": lambda shape: list(shape), "channels": lambda shape: shape[0]}


def build_defense(config: dict[str, Any], feature_shape: tuple[int, ...] | None = None) -> Defense:
    """Rebuild a defense from its ``config()``: ``{"name": ..., **parameters}``.

    With ``feature_shape`` (the target's, [C, H, W] or [D]), the arguments that describe the feature
    (``feature_shape`` of Shredder, ``channels`` of VIB) may be left out of ``config``: they are taken from it,
    so one spec entry fits every model and split.
    """
    params = dict(config)
    name = params.pop("name", None)
    if name == "compose":
        return Compose(*(build_defense(part, feature_shape) for part in params.get("parts", [])))
    if name not in DEFENSES:
        raise ConfigError(f"defense: unknown name {name!r}; known: {', '.join(sorted(DEFENSES))}")
    if feature_shape is not None:
        wanted = inspect.signature(DEFENSES[name]).parameters
        params.update({k: fill(tuple(feature_shape)) for k, fill in _FROM_FEATURE.items()
                       if k in wanted and k not in params})
    try:
        return DEFENSES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"defense {name!r}: {exc}") from None


__all__ = ["DEFENSES", "Compose", "Defense", "NoDefense", "build_defense",
           "CEM", "VIB", "AdversarialReconstruction", "DPNoise", "Dropout", "FeatureBound", "GaussianNoise",
           "InfoScissors", "LaplaceNoise", "NoPeek", "Quantize", "Shredder", "TopKPrune", "distance_correlation",
           "noise_std"]
