"""Parameter checks shared by the defenses: one-line ``ConfigError`` messages naming the field."""

from __future__ import annotations

import math

from ..errors import ConfigError


def non_negative(field: str, value: float) -> float:
    """``value`` as a float, or ``ConfigError`` unless it is finite and >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{field} must be >= 0, got {value!r}")
    return float(value)


def positive(field: str, value: float) -> float:
    """``value`` as a float, or ``ConfigError`` unless it is finite and > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field} must be > 0, got {value!r}")
    return float(value)


def fraction(field: str, value: float, *, allow_one: bool = False) -> float:
    """``value`` as a float in [0, 1) (or [0, 1] with ``allow_one``), else ``ConfigError``."""
    upper_ok = value <= 1 if allow_one else value < 1
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or not upper_ok:
        bound = "]" if allow_one else ")"
        raise ConfigError(f"{field} must be in [0, 1{bound}, got {value!r}")
    return float(value)


def positive_int(field: str, value: int) -> int:
    """``value``, or ``ConfigError`` unless it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    return value


def choice(field: str, value: str, options: tuple[str, ...]) -> str:
    """``value``, or ``ConfigError`` unless it is one of ``options``."""
    if value not in options:
        raise ConfigError(f"{field} must be one of {', '.join(options)}, got {value!r}")
    return value
