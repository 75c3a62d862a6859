"""Threat models and the attack interface.

The owner of a split model builds a :class:`Victim` (model, defense, threat model, auxiliary data).
An attack never touches the victim's model: ``attack.fit(victim)`` receives only the *view* its threat
model allows, an object that physically lacks everything else:

=================  ==========================================================================
threat             what the attacker holds
=================  ==========================================================================
white_box          the head's weights (a frozen copy), the defense's mechanism, query access, aux data
black_box          a query oracle ``x -> z'`` (the defended feature of any chosen input) and aux data
query_free         the tail's weights (a frozen copy), the defense's mechanism, labelled aux data;
                   no queries
architecture_only  the head's architecture (untrained) and the defense's mechanism; no weights, no
                   queries, no data
=================  ==========================================================================

In a U-shaped split (:attr:`SplitModel.u_shaped`) the cloud runs only the middle of the model and returns
its features to the device, which runs the classifier: every view holds ``cloud``, a frozen copy of that
middle part, which is the cloud's own (a model completion attacker fine-tunes a copy of it, as Fu et al. do
the bottom model). The query-free attack needs the classifier, which the cloud then lacks.

*Adaptive* (default): the attacker knows the defense and its parameters, not its random draws, so the
oracle returns defended features and the white-box/query-free/architecture-only attackers optimise through
the defense's obfuscation. *Non-adaptive* (``adaptive=False``): the attacker ignores the defense: it is
given the undefended head (white-box), clean features (black-box) or no obfuscation (query-free,
architecture-only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .._random import seeded
from ..data import ImageSet
from ..defenses.base import Defense, NoDefense
from ..errors import ConfigError, ThreatModelError
from ..models.split import SplitModel, fresh_copy

THREATS = ("white_box", "black_box", "query_free", "architecture_only")
#: Test images whose features the evaluation hands the cloud as the traffic it has observed.
TRAFFIC_IMAGES = 1000


def _frozen(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@dataclass(frozen=True)
class VictimView:
    """Base of the attacker's views: shapes, auxiliary data and whether the attack is adaptive."""

    threat: str
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    aux: ImageSet | None
    adaptive: bool
    point: str
    #: The cloud's part of a U-shaped split (features [B, *feature_shape] -> the features it returns), a frozen
    #: copy; ``None`` in a two-part split, where the cloud's part is the tail and returns the prediction itself.
    cloud: nn.Module | None

    def require_aux(self, attack: str) -> ImageSet:
        if self.aux is None or len(self.aux) == 0:
            raise ConfigError(f"{attack} needs auxiliary data: pass aux=<ImageSet> to Victim(...)")
        return self.aux


@dataclass(frozen=True)
class FeatureMoments:
    """Mean and standard deviation of the features the cloud received from other users (its traffic).

    Per channel for feature maps [N, C, H, W] (``dims = (0, 2, 3)``), per value for other features
    (``dims = (0,)``); ``count`` features went into them. Statistics only: no feature of any one user.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int
    dims: tuple[int, ...]


@torch.no_grad()
def feature_moments(batches: Iterable[torch.Tensor], feature_shape: tuple[int, ...]) -> FeatureMoments | None:
    """The :class:`FeatureMoments` of features ``[B, *feature_shape]`` given in batches
    (per channel for feature maps, per value otherwise, as a query-free view holds its traffic's); ``None`` for
    fewer than two features."""
    dims = (0, 2, 3) if len(feature_shape) == 3 else (0,)
    total = square = count = images = 0
    for z in batches:
        z = z.double()
        total, square = total + z.sum(dims), square + z.pow(2).sum(dims)
        count += z.numel() // total.numel()
        images += len(z)
    if images < 2:
        return None
    mean = total / count
    std = (square / count - mean.pow(2)).clamp_min(0).sqrt()
    return FeatureMoments(mean.float(), std.float(), images, dims)


@dataclass(frozen=True)
class WhiteBoxView(VictimView):
    """Frozen head weights and the defense mechanism: ``send(x) = obfuscate(head(perturb(x)))`` is differentiable."""

    head: nn.Module
    perturb: Callable[[torch.Tensor], torch.Tensor]
    obfuscate: Callable[[torch.Tensor], torch.Tensor]

    def send(self, x: torch.Tensor) -> torch.Tensor:
        """The device's feature for images ``x``, differentiable in ``x`` (input and feature defenses included)."""
        return self.obfuscate(self.head(self.perturb(x)))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.send(x)


@dataclass(frozen=True)
class BlackBoxView(VictimView):
    """A query oracle: images [B, C, H, W] in [0, 1] -> the features the device would send."""

    query: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QueryFreeView(VictimView):
    """Frozen tail weights, the defense mechanism, and the head's architecture.

    ``head_architecture()`` returns a new head, its weights initialised from the global RNG (the caller seeds it).
    """

    tail: nn.Module
    perturb: Callable[[torch.Tensor], torch.Tensor]
    obfuscate: Callable[[torch.Tensor], torch.Tensor]
    head_architecture: Callable[[], nn.Module]
    head_final_activation: type[nn.Module] | None
    traffic: FeatureMoments | None


@dataclass(frozen=True)
class ArchitectureOnlyView(VictimView):
    """The head's architecture and the defense mechanism: no weights, no query oracle, no data (``aux`` is ``None``).

    ``head_architecture()`` returns a new head, its weights initialised from the global RNG (the caller seeds it).
    """

    perturb: Callable[[torch.Tensor], torch.Tensor]
    obfuscate: Callable[[torch.Tensor], torch.Tensor]
    head_architecture: Callable[[], nn.Module]


class Victim:
    """A split model, its defense, and what an attacker may learn of it.

    Parameters
    ----------
    target:
        The trained split model (its ``input_shape`` must be set).
    defense:
        The defense deployed on the device (``None``: none).
    threat:
        ``white_box``, ``black_box``, ``query_free`` or ``architecture_only``.
    aux:
        The attacker's auxiliary images (see :meth:`splitshield.data.Dataset.aux`).
    adaptive:
        Whether the attacker knows the defense (see the module docstring).
    seed:
        Seeds the defense's random draws in :meth:`observe` and the traffic's. The oracle and the views'
        ``send``/``obfuscate`` draw from the caller's global RNG: an attack seeds them with its own seed.
    traffic:
        Other users' images (never the attacked ones), whose features, as the device sends them, the cloud
        has received. A query-free view holds their :class:`FeatureMoments`, nothing else of them.
    """

    def __init__(self, target: SplitModel, defense: Defense | None = None, threat: str = "black_box",
                 aux: ImageSet | None = None, adaptive: bool = True, seed: int = 0,
                 traffic: ImageSet | None = None):
        if threat not in THREATS:
            raise ConfigError(f"threat must be one of {', '.join(THREATS)}, got {threat!r}")
        if target.input_shape is None:
            raise ConfigError("target.input_shape is not set: split(model, at=..., input_shape=(C, H, W))")
        self.target = target.eval()
        self.defense = (defense or NoDefense()).eval()
        self.threat, self.aux, self.adaptive = threat, aux, adaptive
        self._generator_seed = seed
        self.device = next(target.parameters()).device
        self.traffic = traffic

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """The features the cloud receives for the private images ``x`` [B, C, H, W] in [0, 1]."""
        _check_images(x, self.target.input_shape)
        with seeded(self._generator_seed):
            return self.defense.send(self.target.head, x.to(self.device))

    def view(self) -> VictimView:
        """The attacker's view under this victim's threat model."""
        common = dict(threat=self.threat, input_shape=tuple(self.target.input_shape),
                      feature_shape=self.target.feature_shape(), aux=self.aux, adaptive=self.adaptive,
                      point=self.target.point, cloud=_frozen(self.target.cloud) if self.target.u_shaped else None)
        defense = _frozen(self.defense) if self.adaptive else NoDefense()

        def perturb(x: torch.Tensor) -> torch.Tensor:
            return defense.perturb(x, training=False)

        def obfuscate(z: torch.Tensor) -> torch.Tensor:
            return defense.obfuscate(z, training=False)

        if self.threat == "white_box":
            return WhiteBoxView(**common, head=_frozen(self.target.head), perturb=perturb, obfuscate=obfuscate)
        if self.threat == "black_box":
            # Locals only: the oracle must not reach the victim (and through it the model's other parts).
            head, input_shape, device = _frozen(self.target.head), tuple(self.target.input_shape), self.device

            # The oracle is the deployed device: defended features unless the evaluation is non-adaptive.
            def query(x: torch.Tensor) -> torch.Tensor:
                _check_images(x, input_shape)
                with torch.no_grad():
                    return obfuscate(head(perturb(x.to(device))))

            return BlackBoxView(**common, query=query)
        if self.threat == "architecture_only":
            return ArchitectureOnlyView(**{**common, "aux": None}, perturb=perturb, obfuscate=obfuscate,
                                        head_architecture=self._head_architecture())
        if self.target.u_shaped:
            raise ThreatModelError(f"query_free trains a shadow head through the cloud's tail to the labels; in the "
                                   f"U-shaped split {self.target.point!r} the classifier stays on the device, so the "
                                   "cloud cannot: use white_box or black_box attacks")
        last = list(self.target.head.modules())[-1]
        final = type(last) if isinstance(last, (nn.ReLU, nn.Sigmoid, nn.Tanh)) else None
        return QueryFreeView(**common, tail=_frozen(self.target.tail), perturb=perturb, obfuscate=obfuscate,
                             head_architecture=self._head_architecture(), head_final_activation=final,
                             traffic=self._traffic_moments())

    def _head_architecture(self) -> Callable[[], nn.Module]:
        """Builds new heads of the head's architecture, each initialised from the global RNG."""
        # Re-initialised now, so the view holds no reference to the trained head's weights.
        with seeded(self._generator_seed):
            template = fresh_copy(self.target.head)
        return lambda: fresh_copy(template)

    @torch.no_grad()
    def _traffic_moments(self) -> FeatureMoments | None:
        """Moments of the traffic's features as sent, in batches (bounded memory), one seed for all draws."""
        if self.traffic is None or len(self.traffic) < 2:
            return None
        with seeded(self._generator_seed + 1):  # not observe()'s draws: other users, other noise
            return feature_moments((self.defense.send(self.target.head, x)
                                    for x, _ in self.traffic.batches(256, device=self.device)),
                                   self.target.feature_shape())


def _check_images(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"images: expected shape [N, {', '.join(map(str, shape))}] (float in [0, 1]), got {got}")


class Attack:
    """Base of every attack: ``fit(victim)`` with the view its threat model allows, then use it.

    Like scikit-learn estimators and ART attacks, an attack checks its parameters when it is built
    (``ConfigError`` naming the bad one), ``fit`` never changes them (what it learns or resolves is kept in
    attributes ending in ``_``, rebuilt by every ``fit``), and its randomness comes from its ``seed`` alone:
    the global RNG is left as it was.
    """

    #: Threat models under which the attack can run, weakest first.
    threats: tuple[str, ...] = THREATS
    #: The attack's name in :data:`splitshield.attacks.ATTACKS`.
    name: str = "attack"
    #: Seeds every random draw of ``fit`` (and of ``invert`` where it draws any); set by each attack's ``__init__``.
    seed: int = 0

    def _view_for(self, victim: Victim | VictimView) -> VictimView:
        view = victim.view() if isinstance(victim, Victim) else victim
        if view.threat not in self.threats:
            raise ThreatModelError(
                f"{type(self).__name__} needs {' or '.join(self.threats)} access; the victim gives {view.threat}"
            )
        return view

    def _check_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(victim) first")

    def fit(self, victim: Victim | VictimView) -> Attack:
        """Learn what the attack needs from the view of ``victim`` its threat model allows; returns ``self``.

        Every random draw (initialisation, the oracle's or the defense's noise) comes from ``self.seed``.
        """
        view = self._view_for(victim)
        with seeded(self.seed):
            return self._fit(view)

    def _fit(self, view: VictimView) -> Attack:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable parameters of the attack."""
        return {"name": self.name}


class InversionAttack(Attack):
    """Reconstructs the input from a feature: ``invert(z) -> x_hat`` in [0, 1]."""

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct images [B, C, H, W] in [0, 1] from observed features ``z`` [B, ...]."""
        raise NotImplementedError

    def kept(self) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """For an attack that keeps each image's reconstruction from one of several alternatives worth naming
        (a portfolio's members, shadows trained differently), after ``invert``: their names (distinct) and per
        image [B] the index of the one kept. ``None`` (the default) otherwise, also where the alternatives are
        interchangeable draws (restarts, step sizes)."""
        return None


class CompletionAttack(Attack):
    """Infers the label from a feature: ``predict(z) -> logits``."""

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
