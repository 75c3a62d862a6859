"""Black-box model inversion by model reconstruction (He et al., ACSAC 2019, Table 8).

The attacker queries the device on its auxiliary images X, as the inverse network does, but uses the
(xᵢ, f1(xᵢ)) pairs the other way round: it fits a stand-in head f1' to the device's map,

    f1' = argmin_g (1/m) Σ ||g(xᵢ) − f1(xᵢ)||²,

then runs rMLE against f1' with the observed feature as the target, as the white-box attack does against f1.
He et al. compare it with the inverse network in their Table 8 ("model reconstruction").

A black-box attacker knows the image and feature shapes, not the head's architecture, so the stand-in is
built from the shapes (``shadow="different"``, :func:`~splitshield.attacks.stand_in.different_head`, ending in
a ReLU when every queried feature is non-negative), or is He et al.'s "diff net" at their split points
(``shadow="he2019"``), or any module the user gives (an attacker who guesses the architecture). Against a
defended device the oracle returns defended features, so the stand-in learns the defended map; rMLE then
inverts it without knowing the defense, which is what a black-box attacker can do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._params import flag, module_or, non_negative_int, positive, positive_int
from ._rmle import rmle
from .base import BlackBoxView, InversionAttack, seeded
from .stand_in import build_stand_in, train_stand_in
from .whitebox import check_rmle_params, rmle_settings

#: Auxiliary images per oracle call.
_QUERY_BATCH = 512


class ModelReconstruction(InversionAttack):
    """Fit a stand-in head to query pairs from auxiliary data, then rMLE on the stand-in.

    Parameters
    ----------
    shadow:
        ``"different"`` (built from the shapes), ``"he2019"`` (He et al.'s diff net for their split points) or an
        ``nn.Module`` mapping images [B, C, H, W] to features shaped like the device's (trained as a copy).
    steps, batch_size, lr:
        The stand-in's training (each > 0): Adam (amsgrad, eps 1e-3) on the mean squared feature error,
        cosine-decayed learning rate.
    iters, rmle_lr, tv, l2:
        The rMLE stage (iters, rmle_lr > 0; tv, l2 >= 0); ``None`` takes the white-box table's value for the
        split point.
    seed:
        Seeds the stand-in's initialisation, the batch order, the oracle's noise and rMLE.
    progress:
        Show progress bars over the training and the rMLE iterations.

    Fitted attributes
    -----------------
    shadow_head_:
        The trained stand-in (frozen).
    fit_error_:
        Its relative error ``Σ‖f1'(x) − f1(x)‖² / Σ‖f1(x)‖²`` on the auxiliary images: how closely it
        reproduces the device's answers to the attacker's queries.
    iters_, rmle_lr_, tv_, l2_:
        The rMLE settings in use, ``None`` resolved for the victim's split point.
    input_shape_:
        (C, H, W) of the images to recover.
    residual_:
        Set by each ``invert``: per image [B], ``‖f1'(x̂) − z‖² / ‖z‖²``.
    """

    threats = ("black_box",)  # with the head's weights, a white-box attacker has no map to reconstruct
    name = "model_reconstruction"

    def __init__(self, shadow: str | nn.Module = "different", steps: int = 3000, batch_size: int = 64,
                 lr: float = 1e-3, iters: int | None = None, rmle_lr: float | None = None, tv: float | None = None,
                 l2: float | None = None, seed: int = 0, progress: bool = True):
        self.shadow = module_or("shadow", shadow, ("different", "he2019"))
        self.steps, self.batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
        self.lr = positive("lr", lr)
        self.iters, self.rmle_lr, self.tv, self.l2 = check_rmle_params(iters, rmle_lr, tv, l2, lr_field="rmle_lr")
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: BlackBoxView) -> ModelReconstruction:  # type: ignore[override]
        from ..measure import derived_seed

        aux = view.require_aux(type(self).__name__)
        x_all, _ = aux.tensors()
        # One query per auxiliary image, as the inverse network asks: the two black-box attacks spend one budget.
        z_all = torch.cat([view.query(x_all[i : i + _QUERY_BATCH]) for i in range(0, len(x_all), _QUERY_BATCH)])
        x_all = x_all.to(z_all.device)  # the oracle's device, where the observed features will arrive too
        # The attacker sees the features: never negative means the head most likely ends in a ReLU.
        final = nn.ReLU if bool((z_all >= 0).all()) else None
        with seeded(derived_seed(self.seed, "shadow head")):
            head = build_stand_in(self.shadow, view.point, view.input_shape, view.feature_shape, final)
        head = head.to(z_all.device)
        self.shadow_head_ = train_stand_in(
            head, lambda _, idx: F.mse_loss(head(x_all[idx]), z_all[idx]), len(x_all), steps=self.steps,
            batch_size=self.batch_size, lr=self.lr, seed=self.seed, desc="reconstruct the head",
            progress=self.progress)
        with torch.no_grad():
            error = sum(float((head(x) - z).pow(2).sum())
                        for x, z in zip(x_all.split(_QUERY_BATCH), z_all.split(_QUERY_BATCH), strict=True))
        self.fit_error_ = error / max(float(z_all.pow(2).sum()), 1e-30)
        self.iters_, self.rmle_lr_, self.tv_, self.l2_ = rmle_settings(
            view.point, self.iters, self.rmle_lr, self.tv, self.l2)
        self.input_shape_ = view.input_shape
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        z = z.detach()
        with seeded(self.seed):
            x = rmle(self.shadow_head_, z, self.input_shape_, iters=self.iters_, lr=self.rmle_lr_, tv=self.tv_,
                     l2=self.l2_, progress=self.progress, desc="model-reconstruction rMLE")
        with torch.no_grad():
            self.residual_ = ((self.shadow_head_(x) - z).pow(2).flatten(1).sum(1)
                              / z.pow(2).flatten(1).sum(1).clamp_min(1e-30))
        return x

    def config(self) -> dict:
        shadow = self.shadow if isinstance(self.shadow, str) else type(self.shadow).__name__
        return {"name": self.name, "shadow": shadow, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "iters": self.iters, "rmle_lr": self.rmle_lr, "tv": self.tv, "l2": self.l2,
                "seed": self.seed}
