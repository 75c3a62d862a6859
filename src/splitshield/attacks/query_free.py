"""Query-free model inversion with a shadow head (He et al., ACSAC 2019, §6, Algorithm 3, Eq. 6).

The attacker holds the cloud's tail f2 and labelled auxiliary data, but cannot query the device. It
trains a shadow head f1' so that the frozen tail classifies its output correctly,

    f1' = argmin_g (1/m) Σ CE(f2(g(xᵢ)), yᵢ),

then runs rMLE against f1' with the observed feature as the target. With ``search="auto"`` the rMLE setting is
tuned as the white-box attack tunes its own, on the attacker's auxiliary images; but their features it can
only compute through its shadow, which rMLE inverts more easily than the device's head, so the search leans
to weak priors and large steps. That helps where the shadow is close to the head and hurts where it is not,
so the table's setting stays the default.

Many heads satisfy the tail, and rMLE through a shadow whose features differ from the device's inverts
the wrong map. The cloud also sees what the device sends to it for other users (its traffic), so when the
view holds the traffic's moments the shadow is also pulled towards them, per channel and in units of the
traffic's standard deviation σ_c(z) (weight β = ``match_traffic``; 0 gives He et al.'s attack):

    + β · mean_c[((μ_c(f1'(x)) − μ_c(z))² + (σ_c(f1'(x)) − σ_c(z))²) / σ_c(z)²].

The traffic is data the cloud holds, not knowledge of the defense: a non-adaptive attacker uses it too.

Whether the pull helps depends on the cut: a moment-matched shadow can fit the tail and the moments with a map
further from the device's head than He et al.'s. With ``match_traffic="auto"`` the attacker trains a shadow for
every weight of ``TRAFFIC_WEIGHTS`` (He et al.'s 0 among them), inverts each observed feature through every
shadow and keeps, per image, the reconstruction whose shadow features fit the observed ones best (the lowest
relative residual ‖f1'(x̂) − z‖² / ‖z‖²). The residual measures how far the observed feature lies from what
that shadow can produce: a proxy for how much the shadow resembles the device's head, not a guarantee of the
better image. It uses the observed feature alone, never the private image.

The shadow head (:mod:`.stand_in`) is either the head's own architecture, freshly initialised
(``shadow="same"``, He et al.'s "same net"), or a different one built from the shapes (``shadow="different"``:
3×3 convolutions with pooling, He et al.'s "diff net" idea generalised to any split), or He et al.'s own
"diff net" for their split points (``shadow="he2019"``), or any module the user gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ._params import flag, module_or, non_negative, non_negative_int, one_of, positive, positive_int
from ._rmle import rmle
from .base import FeatureMoments, InversionAttack, QueryFreeView, seeded
from .stand_in import build_stand_in, train_stand_in
from .whitebox import (
    CALIBRATION_IMAGES,
    calibrate,
    check_rmle_params,
    relative_residual,
    rmle_settings,
    search_grid,
)

#: The moment-matching weights β ``match_traffic="auto"`` trains a shadow for: He et al.'s and the default.
TRAFFIC_WEIGHTS = (0.0, 3.0)


class QueryFreeInversion(InversionAttack):
    """Shadow-head training through the frozen tail, then rMLE on the shadow head.

    Parameters
    ----------
    shadow:
        ``"same"`` (the head's architecture), ``"different"`` (built from shapes), ``"he2019"`` (He et al.'s
        diff net for their split points: :func:`~splitshield.attacks.stand_in.he2019_different_head`) or an
        ``nn.Module`` (trained as a copy: the module given is left untouched).
    steps, batch_size, lr:
        Shadow training (each > 0): Adam (amsgrad, eps 1e-3), cosine-decayed learning rate.
    match_traffic:
        Weight β >= 0 of the moment-matching term (see the module docstring); used when the victim's view
        holds traffic. ``"auto"``: a shadow per weight of ``TRAFFIC_WEIGHTS``, and per image the reconstruction
        whose shadow fits the observed feature best (without traffic: β = 0 alone).
    iters, rmle_lr, tv, l2:
        The rMLE stage (iters, rmle_lr > 0; tv, l2 >= 0); ``None`` takes the white-box table's value for the
        split point, or with ``search="auto"`` is searched for.
    search:
        ``"auto"``: at ``fit``, the rMLE setting (λ_TV, λ_l2, lr) of the white-box search grid
        (:func:`~splitshield.attacks.whitebox.search_grid`) that inverts the first ``CALIBRATION_IMAGES``
        aux images best through the shadow head (:func:`~splitshield.attacks.whitebox.calibrate`); ``None``
        (default): the table's setting.
    seed:
        Seeds the shadow's initialisation, the batch order and the defense's noise the attacker draws.
    progress:
        Show progress bars over the shadow's training and the rMLE iterations.

    Fitted attributes
    -----------------
    match_traffic_:
        The moment-matching weights the shadows were trained with: ``(match_traffic,)``, or with ``"auto"``
        ``TRAFFIC_WEIGHTS`` (``(0.0,)`` without traffic).
    shadow_heads_:
        The trained shadow heads (frozen), one per weight of ``match_traffic_``, built afresh by every ``fit``
        from the same initialisation.
    shadow_accuracy_:
        Per shadow, the frozen tail's accuracy on its features over the last 100 training batches.
    iters_, rmle_lr_, tv_, l2_:
        The rMLE settings in use (every shadow's), ``None`` resolved for the victim's split point (or searched).
    calibration_:
        ``search="auto"``: {(λ_TV, λ_l2, lr): mean PSNR in dB (capped at 100) on the aux images through the
        first shadow}, else ``{}``.
    chosen_, residual_:
        Set by each ``invert``: per image the index of the kept shadow [B], and its relative residual [B].
    view_:
        The query-free view of the victim (its defense mechanism and shapes).
    """

    threats = ("query_free",)
    name = "shadow_head"

    def __init__(self, shadow: str | nn.Module = "same", steps: int = 3000, batch_size: int = 64,
                 lr: float = 1e-3, match_traffic: float | str = 3.0, iters: int | None = None,
                 rmle_lr: float | None = None, tv: float | None = None, l2: float | None = None,
                 search: str | None = None, seed: int = 0, progress: bool = True):
        self.shadow = module_or("shadow", shadow, ("same", "different", "he2019"))
        self.steps, self.batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
        self.lr = positive("lr", lr)
        self.match_traffic = (match_traffic if isinstance(match_traffic, str) and one_of(
            "match_traffic", match_traffic, ("auto",)) else non_negative("match_traffic", match_traffic))
        self.iters, self.rmle_lr, self.tv, self.l2 = check_rmle_params(iters, rmle_lr, tv, l2, lr_field="rmle_lr")
        # Not "he2019": their setting is for their heads, not a shadow trained to stand in for one.
        self.search = one_of("search", search, ("auto", None))
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: QueryFreeView) -> QueryFreeInversion:  # type: ignore[override]
        aux = view.require_aux(type(self).__name__)
        if self.match_traffic != "auto":
            self.match_traffic_: tuple[float, ...] = (self.match_traffic,)
        else:
            self.match_traffic_ = TRAFFIC_WEIGHTS if view.traffic is not None else (0.0,)
        trained = [self._train_shadow(view, aux, weight) for weight in self.match_traffic_]
        self.shadow_heads_ = tuple(head for head, _ in trained)
        self.shadow_accuracy_ = tuple(accuracy for _, accuracy in trained)
        self.iters_, self.rmle_lr_, self.tv_, self.l2_ = rmle_settings(
            view.point, self.iters, self.rmle_lr, self.tv, self.l2
        )
        self.view_ = view
        self.calibration_: dict[tuple[float, float, float], float] = {}
        priors, lrs = search_grid(view.point, self.rmle_lr, self.tv, self.l2)
        if self.search == "auto" and len(priors) * len(lrs) > 1:
            x, _ = aux.take(CALIBRATION_IMAGES).tensors()
            settings = [(t, w, r) for t, w in priors for r in lrs]
            (self.tv_, self.l2_, self.rmle_lr_), self.calibration_ = calibrate(
                self._through(self.shadow_heads_[0]), x, settings, iters=self.iters_, seed=self.seed,
                progress=self.progress)
        return self

    def _train_shadow(self, view: QueryFreeView, aux: ImageSet, weight: float) -> tuple[nn.Module, float]:
        """A shadow head trained through the frozen tail with moment-matching weight ``weight`` (frozen), and the
        tail's accuracy on its features over the last 100 batches."""
        from ..measure import derived_seed

        # Not the attack's seed itself: with seed 0 a fresh head would start from the weights build_model(seed=0)
        # gave the victim, a head start no attacker has.
        with seeded(derived_seed(self.seed, "shadow head")):
            head = build_stand_in(self.shadow, view.point, view.input_shape, view.feature_shape,
                                  view.head_final_activation, same=view.head_architecture)
        x_all, y_all = aux.tensors()
        moments = view.traffic if weight > 0 else None
        correct = seen = 0

        def batch_loss(step: int, idx: torch.Tensor) -> torch.Tensor:
            nonlocal correct, seen
            features = view.obfuscate(head(view.perturb(x_all[idx])))
            logits = view.tail(features)
            loss = F.cross_entropy(logits, y_all[idx])
            if moments is not None:
                loss = loss + weight * _moment_distance(features, moments)
            if step >= self.steps - 100:  # accuracy over the last 100 batches, for the record
                correct += int((logits.argmax(1) == y_all[idx]).sum())
                seen += len(idx)
            return loss

        train_stand_in(head, batch_loss, len(x_all), steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                       seed=self.seed, desc="train shadow head", progress=self.progress)
        return head, correct / max(seen, 1)

    def _through(self, head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``head`` would send for images ``x`` [B, C, H, W], through the defense's mechanism."""
        view = self.view_
        return lambda x: view.obfuscate(head(view.perturb(x)))

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        z = z.detach()
        runs, residuals = [], []
        for head in self.shadow_heads_:
            send = self._through(head)
            with seeded(self.seed):
                x = rmle(send, z, self.view_.input_shape, iters=self.iters_, lr=self.rmle_lr_, tv=self.tv_,
                         l2=self.l2_, progress=self.progress, desc="query-free rMLE")
            runs.append(x)
            residuals.append(relative_residual(send, x, z, self.seed))
        residual = torch.stack(residuals)  # [shadows, B]
        self.chosen_ = residual.argmin(0)
        self.residual_ = residual.gather(0, self.chosen_[None]).squeeze(0)
        return torch.stack(runs)[self.chosen_, torch.arange(z.shape[0], device=z.device)]

    def kept(self) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """With several shadows (``match_traffic="auto"``): ``match_traffic=β`` per shadow, and per image the
        index of the shadow kept; ``None`` with one shadow."""
        self._check_fitted()
        if len(self.match_traffic_) < 2:
            return None
        return tuple(f"match_traffic={w:g}" for w in self.match_traffic_), self.chosen_

    def config(self) -> dict:
        shadow = self.shadow if isinstance(self.shadow, str) else type(self.shadow).__name__
        return {"name": self.name, "shadow": shadow, "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "match_traffic": self.match_traffic, "iters": self.iters, "rmle_lr": self.rmle_lr,
                "tv": self.tv, "l2": self.l2, "search": self.search, "seed": self.seed}


def _moment_distance(features: torch.Tensor, moments: FeatureMoments) -> torch.Tensor:
    """Mean over channels of the squared differences of mean and std, in units of the traffic's std."""
    # Channels that never vary (dead ReLUs) must not weigh without bound.
    unit = moments.std.clamp_min(1e-3 * moments.std.mean().item() + 1e-12)
    mean, std = features.mean(moments.dims), features.std(moments.dims, correction=0)
    return (((mean - moments.mean) / unit) ** 2 + ((std - moments.std) / unit) ** 2).mean()
