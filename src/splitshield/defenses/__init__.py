"""Defenses: what the edge does to a feature before it leaves the device.

Every defense is a :class:`Defense` (see ``base.py`` for the protocol); ``a + b`` composes two.
:func:`build_defense` rebuilds one from the ``config()`` dict stored with checkpoints and results.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Compose, Defense, NoDefense

DEFENSES: dict[str, type[Defense]] = {"none": NoDefense}


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


__all__ = ["DEFENSES", "Compose", "Defense", "NoDefense", "build_defense"]
