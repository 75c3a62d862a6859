"""The model registry: each model is registered once, with what the rest of splitshield needs to know of it.

In torchvision's ``register_model`` style, a decorator on the builder records a frozen :class:`ModelInfo`:
the native input shape, the image sizes the model takes, the normalisation it applies and its named split
points. Specs, experiments and the CLI read names and shapes from here, never from lists of their own.

A *family* is registered once for many models (``members`` lists their names): all of torchvision's
classifiers are one entry, and :func:`get_model_info` resolves a member's name to the family's metadata
with the builder bound to that name.

>>> get_model_info("lenet").input_shape
(1, 28, 28)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from types import MappingProxyType
from typing import TypeVar

from torch import nn

from ..errors import ConfigError

#: Per-channel (mean, std).
Normalization = tuple[tuple[float, ...], tuple[float, ...]]
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelInfo:
    """A registered model (or family of models) and what is known of it before it is built.

    Attributes
    ----------
    name:
        The name :func:`~splitshield.models.build_model` takes (a family's own name is not buildable).
    builder:
        ``builder(num_classes=, in_channels=, image_size=)`` returns the uncut, randomly initialised model
        (a family's builder takes the member's name first).
    input_shape:
        The native image shape (C, H, W): what ``build_model`` builds for when not told otherwise.
    sizes:
        Which other image shapes the model takes, in words (shape errors quote it).
    normalization:
        The per-channel (mean, std) the model's first layer applies to its [0, 1] input at the native
        shape, or ``None`` when the model does not normalise.
    split_points:
        The points users typically cut at (the papers' points); each is a name of
        :func:`~splitshield.models.split_points` of the model at its native shape.
    members:
        A family's member names (called when needed: torchvision is imported only then); ``None`` for one model.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    sizes: str
    normalization: Normalization | None = None
    split_points: tuple[str, ...] = ()
    members: Callable[[], Collection[str]] | None = None


_MODELS: dict[str, ModelInfo] = {}
_FAMILIES: dict[str, ModelInfo] = {}
#: The registered models by name (a live, read-only view).
MODELS: Mapping[str, ModelInfo] = MappingProxyType(_MODELS)
#: The registered families by name (a live, read-only view).
FAMILIES: Mapping[str, ModelInfo] = MappingProxyType(_FAMILIES)


def register_model(name: str, *, input_shape: tuple[int, int, int], sizes: str,
                   normalization: Normalization | None = None, split_points: Sequence[str] = (),
                   members: Callable[[], Collection[str]] | None = None) -> Callable[[Builder], Builder]:
    """Register the decorated builder as model ``name`` (a family when ``members`` is given).

    The fields are those of :class:`ModelInfo`. Returns a decorator that records the builder and
    returns it unchanged; registering a taken name raises :class:`ValueError`.
    """

    def register(builder: Builder) -> Builder:
        if name in _MODELS or name in _FAMILIES:
            raise ValueError(f"model {name!r} is already registered")
        info = ModelInfo(name, builder, tuple(input_shape), sizes, normalization, tuple(split_points), members)
        (_MODELS if members is None else _FAMILIES)[name] = info
        return builder

    return register


def unregister_model(name: str) -> None:
    """Remove model or family ``name`` from the registry (a plug-in's or a test's temporary model)."""
    if _MODELS.pop(name, None) is None and _FAMILIES.pop(name, None) is None:
        raise KeyError(f"model {name!r} is not registered")


def get_model_info(name: str) -> ModelInfo:
    """The metadata of model ``name``: a registered model, or a member of a registered family.

    A member gets its family's metadata under its own name, with the builder bound to that name.
    An unknown name raises :class:`~splitshield.errors.ConfigError` listing the known ones.
    """
    if name in _MODELS:
        return _MODELS[name]
    for family in _FAMILIES.values():
        if family.members is not None and name in family.members():
            return replace(family, name=name, builder=partial(family.builder, name), members=None)
    families = "".join(f", or any {family} classifier name" for family in _FAMILIES)
    raise ConfigError(f"unknown model {name!r}; zoo models: {', '.join(_MODELS)}{families}")


def list_models(*, include_families: bool = False) -> list[str]:
    """The registered models' names in registration order; with ``include_families``, then every family
    member's (sorted; this imports torchvision)."""
    names = list(_MODELS)
    if include_families:
        names += [member for family in _FAMILIES.values() if family.members is not None
                  for member in sorted(family.members())]
    return names
