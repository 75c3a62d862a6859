"""The strongest attacker splitshield can field: every inversion attack the threat model allows, and per
image the reconstruction the attacker itself expects to be best.

The attacker cannot look at the private images, so it cannot pick by PSNR. What it can do, when its view
computes the features of images it chooses (a white-box ``send`` or a black-box ``query``), is test each
member on images it owns. It keeps ``holdout`` of its auxiliary images apart, fits every member on the
rest, inverts the held-out images' features with each member and learns, per member, how the quality of a
reconstruction follows from its feature residual r = ‖query(x̂) − z‖² / ‖z‖², a number it can compute for
any reconstruction:

    PSNR_k ≈ a_k + b_k·log r        (least squares on the held-out images, b_k ≤ 0).

On the observed features it computes each member's reconstruction and residual, predicts each one's PSNR
and keeps, per image, the member with the highest prediction. The residual alone cannot rank members: an
optimisation attack (rMLE) fits the features more closely than a decoder even where its images are worse.

Without a way to compute features of chosen images (query-free and weaker threats) nothing the attacker
holds ranks the members, so the portfolio runs under white-box and black-box threats only; there, run the
attacks as separate cells (the audit holds every cell to the bar).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import metrics
from ..errors import ConfigError
from ._params import flag, non_negative_int, positive_int
from .base import InversionAttack, VictimView, seeded

#: PSNR cap (dB) in the calibration: exact inversions (infinite PSNR) are equally good.
_PSNR_CAP = 100.0
#: Residuals below this are exact inversions; the floor keeps log r finite.
_RESIDUAL_FLOOR = 1e-12


def _oracle(view: VictimView) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The view's way to compute the features of chosen images, if it has one."""
    return getattr(view, "query", None)


class StrongestAttack(InversionAttack):
    """Every inversion attack the threat model allows; per image, the best by the attacker's own prediction.

    Parameters
    ----------
    members:
        The attacks to run: a list of registry names or ``{"name": ..., **params}`` dicts, or a mapping
        ``{name: params}`` (the form for specs, where lists are grids); ``None`` (default): every registered
        inversion attack whose threats include the view's, with its default parameters.
    holdout:
        Auxiliary images (>= 4) kept apart from the members' fitting to calibrate the prediction.
    seed:
        Member ``k`` is seeded with ``seed + k``.
    progress:
        Show the members' progress bars.

    Fitted attributes
    -----------------
    members_:
        The fitted member attacks, in order.
    calibration_:
        Per member name, ``(a, b, mean PSNR)`` of its prediction on the held-out images.
    chosen_:
        Set by each ``invert``: per image [B] the index in ``members_`` of the reconstruction kept.
    """

    threats = ("black_box", "white_box")
    name = "strongest"

    def __init__(self, members: Sequence[str | dict[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
                 holdout: int = 16, seed: int = 0, progress: bool = True):
        self.members = member_specs(members)
        if self.members is not None and not self.members:
            raise ConfigError("members must name at least one attack, or be None for every allowed one")
        self.holdout = positive_int("holdout", holdout)
        if self.holdout < 4:
            raise ConfigError(f"holdout must be >= 4 images to calibrate a line, got {holdout}")
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: VictimView) -> StrongestAttack:
        from . import ATTACKS

        oracle = _oracle(view)
        assert oracle is not None  # both threats allowed give one
        aux = view.require_aux("strongest")
        if len(aux) < 2 * self.holdout:
            raise ConfigError(f"strongest needs at least {2 * self.holdout} auxiliary images (holdout={self.holdout} "
                              f"of them calibrate), got {len(aux)}: pass more aux data or a smaller holdout")
        specs = self.members or [{"name": name} for name in allowed_members(view.threat)]
        held = aux.subset(list(range(len(aux) - self.holdout, len(aux))))
        rest = dataclasses.replace(view, aux=aux.subset(list(range(len(aux) - self.holdout))))
        x_held, _ = held.tensors()
        z_held = oracle(x_held)
        self.members_: list[InversionAttack] = []
        self.calibration_: dict[str, tuple[float, float, float]] = {}
        for k, spec in enumerate(specs):
            params = {key: value for key, value in spec.items() if key != "name"}
            cls = ATTACKS.get(spec["name"])
            if cls is None or not issubclass(cls, InversionAttack):
                raise ConfigError(f"members: {spec['name']!r} is not an inversion attack")
            if view.threat not in cls.threats:
                raise ConfigError(f"members: {spec['name']!r} cannot run under {view.threat}")
            member = cls(**params, seed=self.seed + k, progress=self.progress).fit(rest)
            x_hat = member.invert(z_held)
            psnr = metrics.psnr(x_hat, x_held, reduction="none").clamp(max=_PSNR_CAP)
            a, b = _fit_line(_log_residual(oracle, x_hat, z_held), psnr)
            self.members_.append(member)
            self.calibration_[f"{k}:{member.name}"] = (a, b, float(psnr.mean()))
        self.view_ = view
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...]: per image, the member whose
        predicted PSNR is highest."""
        self._check_fitted()
        oracle = _oracle(self.view_)
        candidates, predicted = [], []
        for k, (member, (a, b, _)) in enumerate(zip(self.members_, self.calibration_.values(), strict=True)):
            x_hat = member.invert(z)
            candidates.append(x_hat)
            with seeded(self.seed + k):  # the oracle's noise draws, the same for every call
                predicted.append(a + b * _log_residual(oracle, x_hat, z))
        self.chosen_ = torch.stack(predicted).argmax(0)  # [B]
        stacked = torch.stack(candidates)  # [K, B, C, H, W]
        return stacked[self.chosen_, torch.arange(z.shape[0])]

    def config(self) -> dict:
        return {"name": self.name, "members": self.members, "holdout": self.holdout, "seed": self.seed}


def allowed_members(threat: str) -> list[str]:
    """Names of the registered inversion attacks that run under ``threat`` (the portfolio's default members)."""
    from . import ATTACKS

    return [name for name, cls in ATTACKS.items() if issubclass(cls, InversionAttack)
            and cls is not StrongestAttack and threat in cls.threats]


def member_specs(members: Sequence[str | dict[str, Any]] | Mapping[str, Mapping[str, Any]] | None,
                 ) -> list[dict[str, Any]] | None:
    """``members`` as a list of ``{"name": ..., **params}`` (``ConfigError`` on a malformed entry)."""
    if members is None:
        return None
    if isinstance(members, Mapping):
        if not all(isinstance(p, Mapping) for p in members.values()):
            raise ConfigError("members: a mapping gives each attack's parameters as a mapping, e.g. {rmle: {}}")
        members = [{"name": name, **params} for name, params in members.items()]
    if isinstance(members, str) or not isinstance(members, Sequence):
        raise ConfigError(f"members: a list of attack names or a mapping {{name: params}}, got {members!r}")
    return [_member_spec(m) for m in members]


def _member_spec(member: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(member, str):
        return {"name": member}
    if isinstance(member, dict) and isinstance(member.get("name"), str):
        if {"seed", "progress"} & set(member):
            raise ConfigError("members: seed and progress are set by the portfolio; remove them")
        return dict(member)
    raise ConfigError(f"members: each entry is an attack name or a dict with a 'name', got {member!r}")


@torch.no_grad()
def _log_residual(oracle: Callable[[torch.Tensor], torch.Tensor], x_hat: torch.Tensor,
                  z: torch.Tensor) -> torch.Tensor:
    """log of ‖oracle(x̂) − z‖² / ‖z‖² per image [B]."""
    z = z.detach()
    r = (oracle(x_hat) - z).pow(2).flatten(1).sum(1) / z.pow(2).flatten(1).sum(1).clamp_min(1e-30)
    return r.clamp_min(_RESIDUAL_FLOOR).log().float().cpu()


def _fit_line(u: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """Least-squares (a, b) of v ≈ a + b·u with b <= 0 (a larger residual never predicts a better image)."""
    u, v = u.double(), v.double().cpu()
    var = float(((u - u.mean()) ** 2).mean())
    b = 0.0 if var == 0 else min(0.0, float(((u - u.mean()) * (v - v.mean())).mean()) / var)
    a = float(v.mean()) - b * float(u.mean())
    return a, (b if math.isfinite(b) else 0.0)
