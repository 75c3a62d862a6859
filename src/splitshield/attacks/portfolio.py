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
(clamped to the range seen on the held-out images) and keeps, per image, the member with the highest
prediction. The residual alone cannot rank members: an optimisation attack (rMLE) fits the features more
closely than a decoder even where its images are worse. If on the held-out images the per-image choice does
worse than the best member alone, the portfolio is that member; a member that gives no number (NaN) is never
chosen; with a single member nothing is held back.

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
#: Draws of the oracle's noise each residual is averaged over.
RESIDUAL_DRAWS = 4
#: What the default members run with beyond their own defaults: settings that only make a member stronger, off by
#: default in the member itself so that its stored cells keep their hashes. They enter the portfolio's config.
MEMBER_DEFAULTS: dict[str, dict[str, Any]] = {"inverse_network": {"refit": True}}
#: Attacks a portfolio runs only when its ``members`` name them. Model reconstruction came after portfolios with the
#: default members were stored under the same cell hashes; it joins the default members when RESULTS_REVISION
#: is next raised (every cell measured again).
OPT_IN_MEMBERS = ("model_reconstruction",)


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
        inversion attack whose threats include the view's, with its default parameters updated by
        :data:`MEMBER_DEFAULTS` (the inverse network refits its decoder's last layer).
    holdout:
        Auxiliary images (>= 4) kept apart from the members' fitting to calibrate the prediction.
    seed:
        Member ``k`` is seeded with ``seed + k``; the oracle's noise in the residuals with draws derived from it.
    progress:
        Show the members' progress bars.

    Fitted attributes
    -----------------
    members_:
        The fitted member attacks, in order.
    calibration_:
        Per member (``"k:name"``), ``(a, b, lowest, highest, mean PSNR)`` of its prediction on the held-out
        images (``{}`` with one member).
    fallback_:
        The index of the member used for every image when the per-image choice did worse on the held-out
        images than that member alone (or the only member), else ``None``.
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
        specs = self.members or [{"name": name, **MEMBER_DEFAULTS.get(name, {})}
                                 for name in allowed_members(view.threat)]
        for spec in specs:
            if view.threat not in ATTACKS[spec["name"]].threats:
                raise ConfigError(f"members: {spec['name']!r} cannot run under {view.threat}; remove it")
        if len(specs) == 1:  # nothing to choose between: the member alone, on all the aux data
            self.members_ = [_build(specs[0], self.seed, self.progress).fit(view)]
            self.calibration_, self.fallback_, self.view_ = {}, 0, view
            return self
        if len(aux) < 2 * self.holdout:
            raise ConfigError(f"strongest needs at least {2 * self.holdout} auxiliary images (holdout={self.holdout} "
                              f"of them calibrate), got {len(aux)}: pass more aux data or a smaller holdout")
        held = aux.subset(list(range(len(aux) - self.holdout, len(aux))))
        rest = dataclasses.replace(view, aux=aux.subset(list(range(len(aux) - self.holdout))))
        x_held, _ = held.tensors()
        z_held = oracle(x_held)
        self.members_ = []
        self.calibration_: dict[str, tuple[float, float, float, float, float]] = {}
        psnrs, predictions = [], []
        for k, spec in enumerate(specs):
            member = _build(spec, self.seed + k, self.progress).fit(rest)
            x_hat = member.invert(z_held)
            psnr = metrics.psnr(x_hat, x_held.to(x_hat), reduction="none").clamp(max=_PSNR_CAP).cpu()
            log_r = self._log_residual(oracle, x_hat, z_held)
            a, b = _fit_line(log_r, psnr)
            low, high = _finite_range(psnr)
            self.members_.append(member)
            self.calibration_[f"{k}:{member.name}"] = (a, b, low, high, float(psnr.nan_to_num(-math.inf).mean()))
            psnrs.append(psnr.nan_to_num(-math.inf))
            predictions.append(_predict(a, b, low, high, log_r))
        # The attacker's own check of its choice on the held-out images: a member alone may do better.
        chosen = torch.stack(predictions).argmax(0)
        portfolio = torch.stack(psnrs)[chosen, torch.arange(len(chosen))].mean()
        best = max(range(len(specs)), key=lambda k: float(psnrs[k].mean()))
        self.fallback_ = best if float(psnrs[best].mean()) > float(portfolio) else None
        self.view_ = view
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...]: per image, the member whose
        predicted PSNR is highest (or every image from ``fallback_``)."""
        self._check_fitted()
        if self.fallback_ is not None:
            self.chosen_ = torch.full((z.shape[0],), self.fallback_, dtype=torch.long)
            return self.members_[self.fallback_].invert(z)
        oracle = _oracle(self.view_)
        candidates, predicted = [], []
        for member, (a, b, low, high, _) in zip(self.members_, self.calibration_.values(), strict=True):
            x_hat = member.invert(z)
            candidates.append(x_hat)
            predicted.append(_predict(a, b, low, high, self._log_residual(oracle, x_hat, z)))
        self.chosen_ = torch.stack(predicted).argmax(0)  # [B]
        stacked = torch.stack(candidates)  # [K, B, C, H, W]
        return stacked[self.chosen_.to(stacked.device), torch.arange(z.shape[0], device=stacked.device)]

    def kept(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """The members' names (``k:name`` where a name repeats) and per image the index of the member kept."""
        self._check_fitted()
        names = [member.name for member in self.members_]
        return tuple(n if names.count(n) == 1 else f"{k}:{n}" for k, n in enumerate(names)), self.chosen_

    @torch.no_grad()
    def _log_residual(self, oracle: Callable[[torch.Tensor], torch.Tensor], x_hat: torch.Tensor,
                      z: torch.Tensor) -> torch.Tensor:
        """log of ‖oracle(x̂) − z‖² / ‖z‖² per image [B], averaged over ``RESIDUAL_DRAWS`` draws of the oracle's
        noise: the attacker's own draws (never the device's), the same for every member and call."""
        from ..measure import derived_seed

        z = z.detach()
        total = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        for draw in range(RESIDUAL_DRAWS):
            with seeded(derived_seed(self.seed, f"portfolio residual {draw}")):
                total += (oracle(x_hat) - z).pow(2).flatten(1).sum(1).double()
        r = total / RESIDUAL_DRAWS / z.pow(2).flatten(1).sum(1).double().clamp_min(1e-30)
        return r.clamp_min(_RESIDUAL_FLOOR).log().float().cpu()

    def config(self) -> dict:
        config = {"name": self.name, "members": self.members, "holdout": self.holdout, "seed": self.seed}
        # Cells of the default members from before MEMBER_DEFAULTS existed ran without them: another hash.
        return config | ({"member_defaults": MEMBER_DEFAULTS} if self.members is None else {})


def allowed_members(threat: str) -> list[str]:
    """Names of the registered inversion attacks that run under ``threat``, but for :data:`OPT_IN_MEMBERS` (the
    portfolio's default members)."""
    from . import ATTACKS

    return [name for name, cls in ATTACKS.items() if issubclass(cls, InversionAttack)
            and cls is not StrongestAttack and threat in cls.threats and name not in OPT_IN_MEMBERS]


def member_specs(members: Sequence[str | dict[str, Any]] | Mapping[str, Mapping[str, Any] | None] | None,
                 ) -> list[dict[str, Any]] | None:
    """``members`` as a list of ``{"name": ..., **params}``, names resolved and checked against the registry and
    each attack's parameters (``ConfigError`` naming the bad entry)."""
    if members is None:
        return None
    if isinstance(members, Mapping):
        entries = []
        for name, params in members.items():
            if params is not None and not isinstance(params, Mapping):
                raise ConfigError(f"members.{name}: give the attack's parameters as a mapping, e.g. {{iters: 2000}}")
            if params and "name" in params:
                raise ConfigError(f"members.{name}: remove 'name' from its parameters (the key names the attack)")
            entries.append({"name": name, **(params or {})})
        members = entries
    if isinstance(members, str) or not isinstance(members, Sequence):
        raise ConfigError(f"members: a list of attack names or a mapping {{name: params}}, got {members!r}")
    return [_member_spec(m) for m in members]


def _member_spec(member: str | dict[str, Any]) -> dict[str, Any]:
    import inspect

    from . import ATTACKS, attack_name

    if isinstance(member, str):
        member = {"name": member}
    if not isinstance(member, dict) or not isinstance(member.get("name"), str):
        raise ConfigError(f"members: each entry is an attack name or a dict with a 'name', got {member!r}; in a "
                          "spec write members: {rmle: {}, inverse_network: {}} (a list there is a grid)")
    name = attack_name(member["name"])
    cls = ATTACKS.get(name)
    if cls is None or not issubclass(cls, InversionAttack) or cls is StrongestAttack:
        known = ", ".join(n for n, c in ATTACKS.items() if issubclass(c, InversionAttack) and c is not StrongestAttack)
        raise ConfigError(f"members: {member['name']!r} is not an inversion attack a portfolio can run; known: {known}")
    params = {k: v for k, v in member.items() if k != "name"}
    if {"seed", "progress"} & set(params):
        raise ConfigError("members: seed and progress are set by the portfolio; remove them")
    accepted = inspect.signature(cls).parameters
    for key, value in params.items():
        if key not in accepted:
            raise ConfigError(f"members.{name}.{key}: {name} has no such parameter; "
                              f"it takes {', '.join(k for k in accepted if k not in ('seed', 'progress'))}")
        if isinstance(value, list):
            raise ConfigError(f"members.{name}.{key}: one value, not a list (a portfolio's members are not grids)")
    cls(**params)  # its own checks, now rather than after the targets are trained
    return {"name": name, **params}


def _build(spec: dict[str, Any], seed: int, progress: bool) -> InversionAttack:
    from . import ATTACKS

    params = {k: v for k, v in spec.items() if k != "name"}
    return ATTACKS[spec["name"]](**params, seed=seed, progress=progress)


def _fit_line(u: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """Least-squares (a, b) of v ≈ a + b·u over the finite pairs, with b <= 0 (a larger residual never
    predicts a better image); (−inf, 0) when no pair is finite (the member gave no number)."""
    keep = torch.isfinite(u) & torch.isfinite(v)
    u, v = u[keep].double(), v[keep].double().cpu()
    if len(u) == 0:
        return -math.inf, 0.0
    var = float(((u - u.mean()) ** 2).mean())
    b = 0.0 if var == 0 else min(0.0, float(((u - u.mean()) * (v - v.mean())).mean()) / var)
    return float(v.mean()) - b * float(u.mean()), b


def _finite_range(v: torch.Tensor) -> tuple[float, float]:
    finite = v[torch.isfinite(v)]
    return (float(finite.min()), float(finite.max())) if len(finite) else (-math.inf, -math.inf)


def _predict(a: float, b: float, low: float, high: float, log_r: torch.Tensor) -> torch.Tensor:
    """Predicted PSNR per image [B], clamped to [low, high] (never extrapolated beyond the held-out range);
    −inf where the member gave no number."""
    if not math.isfinite(a):
        return torch.full_like(log_r, -math.inf)
    return (a + b * log_r).clamp(low, high).nan_to_num(nan=-math.inf)
