"""Parameter checks of the attacks: the defenses' one-line ``ConfigError`` checks, and a few more.

Each check takes the parameter's name and value and returns the value, or raises a ``ConfigError``
(a ``ValueError``) naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from typing import TypeVar

from torch import nn

from ..defenses._params import choice, non_negative, positive, positive_int
from ..errors import ConfigError

__all__ = ["choice", "flag", "module_or", "non_negative", "non_negative_int", "one_of", "optional", "positive",
           "positive_int"]

T = TypeVar("T")


def optional(check: Callable[[str, T], T], field: str, value: T | None) -> T | None:
    """``None``, or ``value`` passed by ``check``."""
    return None if value is None else check(field, value)


def flag(field: str, value: bool) -> bool:
    """``value``, or ``ConfigError`` unless it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


def non_negative_int(field: str, value: int) -> int:
    """``value`` as an int, or ``ConfigError`` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ConfigError(f"{field} must be an integer >= 0, got {value!r}")
    return int(value)


def one_of(field: str, value: T, options: tuple[T, ...]) -> T:
    """``value``, or ``ConfigError`` unless it is one of ``options`` (any values, ``None`` too)."""
    if value not in options:
        raise ConfigError(f"{field} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def module_or(field: str, value: str | nn.Module | None, options: tuple[str | None, ...]) -> str | nn.Module | None:
    """``value``, or ``ConfigError`` unless it is an ``nn.Module`` or one of ``options``."""
    if not isinstance(value, nn.Module) and value not in options:
        allowed = ", ".join(repr(o) for o in options)
        raise ConfigError(f"{field} must be an nn.Module or one of {allowed}, got {value!r}")
    return value
