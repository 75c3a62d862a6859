"""White-box model inversion: regularised MLE (He et al., ACSAC 2019, §4, Algorithm 1).

The attacker holds the head's weights f1 and an observed feature z0, and solves

    x* = argmin_x  mean((f1(x) - z0)²) + λ_TV·TV(x) + λ_l2·mean((x - ½)²),   x ∈ [0, 1]

with Adam from a grey image. Against a defended model the attack is adaptive: f1 is followed by the
defense's obfuscation, re-sampled at every step (an expectation-over-transformation estimate).
Defaults follow the authors' code per split (ALGORITHMS §A.2), translated to pixel space.
"""

from __future__ import annotations

import torch

from ._params import flag, non_negative, non_negative_int, optional, positive, positive_int
from ._rmle import rmle
from .base import InversionAttack, WhiteBoxView, seeded

#: He et al.'s per-split (iterations, lr, λ_TV, λ_l2) for their named split points.
HE2019_SETTINGS: dict[str, tuple[int, float, float, float]] = {
    "conv1": (5000, 1e-2, 0.0, 0.0),
    "ReLU2": (5000, 1e-2, 1.0, 0.0),
    "conv11": (5000, 1e-2, 0.0, 0.0),
    "ReLU22": (5000, 1e-2, 10.0, 0.0),
    "ReLU32": (5000, 1e-2, 1e3, 0.0),
    "fc1": (5000, 1e-3, 1e4, 0.0),
    "fc2": (500, 1e-1, 5e2, 1e2),
}
_FALLBACK = (3000, 1e-2, 1.0, 0.0)


def check_rmle_params(iters: int | None, lr: float | None, tv: float | None, l2: float | None,
                      lr_field: str = "lr") -> tuple[int | None, float | None, float | None, float | None]:
    """The rMLE settings checked (``ConfigError`` otherwise): ``None``, or iters > 0 an int, lr > 0, tv, l2 >= 0."""
    return (optional(positive_int, "iters", iters), optional(positive, lr_field, lr),
            optional(non_negative, "tv", tv), optional(non_negative, "l2", l2))


def rmle_settings(point: str, iters: int | None, lr: float | None, tv: float | None,
                  l2: float | None) -> tuple[int, float, float, float]:
    """Fill the ``None`` entries of (iters, lr, tv, l2) with He et al.'s values for ``point``."""
    defaults = HE2019_SETTINGS.get(point, _FALLBACK)
    given = (iters, lr, tv, l2)
    return tuple(d if v is None else v for v, d in zip(given, defaults, strict=True))  # type: ignore[return-value]


class WhiteBoxInversion(InversionAttack):
    """rMLE inversion with the head's weights.

    Parameters
    ----------
    iters, lr, tv, l2:
        Adam steps (> 0), step size (> 0), TV weight and L2 weight (>= 0); ``None`` takes He et al.'s value
        for the split point's name when it is one of theirs, else (3000, 1e-2, 1.0, 0.0).
    seed:
        Seeds the defense's noise the adaptive attacker draws while it optimises.
    progress:
        Show a progress bar over iterations.

    Fitted attributes
    -----------------
    iters_, lr_, tv_, l2_:
        The settings in use, ``None`` resolved for the victim's split point.
    view_:
        The white-box view of the victim.
    """

    threats = ("white_box",)
    name = "rmle"

    def __init__(self, iters: int | None = None, lr: float | None = None, tv: float | None = None,
                 l2: float | None = None, seed: int = 0, progress: bool = True):
        self.iters, self.lr, self.tv, self.l2 = check_rmle_params(iters, lr, tv, l2)
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: WhiteBoxView) -> WhiteBoxInversion:  # type: ignore[override]
        self.iters_, self.lr_, self.tv_, self.l2_ = rmle_settings(view.point, self.iters, self.lr, self.tv, self.l2)
        self.view_ = view
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        with seeded(self.seed):
            return rmle(self.view_.send, z, self.view_.input_shape, iters=self.iters_, lr=self.lr_, tv=self.tv_,
                        l2=self.l2_, progress=self.progress, desc="white-box rMLE")

    def config(self) -> dict:
        return {"name": self.name, "iters": self.iters, "lr": self.lr, "tv": self.tv, "l2": self.l2, "seed": self.seed}
