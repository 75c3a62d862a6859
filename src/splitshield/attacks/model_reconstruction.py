"""Black-box model inversion by model reconstruction (He et al., ACSAC 2019, Table 8).

The attacker queries the device on its auxiliary images X, as the inverse network does, but uses the
(xᵢ, f1(xᵢ)) pairs the other way round: it fits a stand-in head f1' to the device's map,

    f1' = argmin_g (1/m) Σ ||g(xᵢ) − f1(xᵢ)||²,

then runs rMLE against f1' with the observed feature as the target, as the white-box attack does against f1.
He et al. compare it with the inverse network in their Table 8 ("model reconstruction").

A black-box attacker knows the image and feature shapes, not the head's architecture, so the stand-in is
built from the shapes (``shadow="different"``, :func:`~splitshield.attacks.query_free.different_head`, ending in
a ReLU when every queried feature is non-negative), or is He et al.'s "diff net" at their split points
(``shadow="he2019"``), or any module the user gives (an attacker who guesses the architecture). Against a
defended device the oracle returns defended features, so the stand-in learns the defended map; rMLE then
inverts it without knowing the defense, which is what a black-box attacker can do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._params import flag, module_or, non_negative_int, positive, positive_int
from ._rmle import rmle
from .base import BlackBoxView, InversionAttack, seeded
from .query_free import build_shadow
from .whitebox import check_rmle_params, relative_residual, rmle_settings

#: The first auxiliary images, queried before training: the features' range and the fit error are read on them.
_PROBE = 512


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
        Its relative error ``Σ‖f1'(x) − f1(x)‖² / Σ‖f1(x)‖²`` on the first ``_PROBE`` auxiliary images: how
        closely it reproduces the device's map on the attacker's own images.
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
        # Queried batch by batch as training goes (features of a whole training set need not fit in memory);
        # the first batch also tells what the attacker sees of the features' range.
        probe = x_all[:_PROBE]
        z_probe = view.query(probe)
        device = z_probe.device  # the oracle's: where the observed features will arrive too
        # Never negative means the head most likely ends in a ReLU.
        final = nn.ReLU if bool((z_probe >= 0).all()) else None
        with seeded(derived_seed(self.seed, "shadow head")):
            head = build_shadow(self.shadow, view.point, view.input_shape, view.feature_shape, final).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=self.lr, eps=1e-3, amsgrad=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps, eta_min=self.lr * 0.01)
        g = torch.Generator().manual_seed(self.seed)
        head.train()
        for _ in tqdm(range(self.steps), desc="reconstruct the head", disable=not self.progress, leave=False):
            idx = torch.randint(len(x_all), (min(self.batch_size, len(x_all)),), generator=g)
            x = x_all[idx].to(device)
            loss = F.mse_loss(head(x), view.query(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            error = float((head(probe.to(device)) - z_probe).pow(2).sum())
        self.fit_error_ = error / max(float(z_probe.pow(2).sum()), 1e-30)
        self.shadow_head_ = head
        self.iters_, self.rmle_lr_, self.tv_, self.l2_ = rmle_settings(
            view.point, self.iters, self.rmle_lr, self.tv, self.l2)
        self.input_shape_ = view.input_shape
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        z = z.detach()
        with seeded(self.seed):
            x = rmle(self.shadow_head_, z, self.input_shape_, iters=self.iters_, lr=self.rmle_lr_,
                     tv=self.tv_, l2=self.l2_, progress=self.progress, desc="model-reconstruction rMLE")
        self.residual_ = relative_residual(self.shadow_head_, x, z, self.seed)
        return x

    def config(self) -> dict:
        shadow = self.shadow if isinstance(self.shadow, str) else type(self.shadow).__name__
        return {"name": self.name, "shadow": shadow, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "iters": self.iters, "rmle_lr": self.rmle_lr, "tv": self.tv, "l2": self.l2,
                "seed": self.seed}
