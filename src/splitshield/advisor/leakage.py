"""How much a cut leaks: two fast attacks, the conditional-entropy floor and the GPZ statistic.

- **Fast attacks**, each fitted by the one measurement pipeline (:func:`~splitshield.measure.fit_attack`) with a
  small fixed budget and scored by PSNR/SSIM of its reconstructions of the same held-out test images:
  the black-box inverse network of ``splitshield attack --attack inverse_network`` (:class:`FastAttack`), and
  white-box rMLE with the head's weights (:class:`FastWhiteBox`). Both, because they can part ways with depth: on
  a residual network the input survives deep into the head, where full-budget white-box rMLE still finds it but a
  black-box decoder trained briefly no longer does (``benchmarks/advisor_validity.py``).
- **CE floor**: the conditional-entropy MSE floor (:func:`~splitshield.metrics.conditional_entropy_floor`) for
  Gaussian noise of ``noise`` times the feature's standard deviation, so that one setting is the same
  signal-to-noise ratio at every point. Fitted on a small sample, it is an estimate for comparing points.
- **GPZ statistic** (Liu et al., arXiv 2506.15412; ALGORITHMS §G.6): the mean intra-class radius
  R̄² = mean_c mean_{i∈c} ‖z_i − μ_c‖² of the flattened features under the model's predicted labels, raw and
  divided by the total variance V = mean_i ‖z_i − μ‖², and its relative drop between neighbouring points.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import Dataset, ImageSet
from ..errors import ConfigError
from ..metrics import conditional_entropy_floor, psnr, ssim
from ..models.split import SplitModel


def _check_budget(budget: Any, names: tuple[str, ...]) -> None:
    """``ConfigError`` unless each field of ``names`` of the frozen dataclass ``budget`` is a positive integer."""
    for name in names:
        value = getattr(budget, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{type(budget).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class FastAttack:
    """The fixed budget of the fast black-box estimate: the inverse network (the black-box one of the fast attacks).

    Attributes
    ----------
    aux_images:
        The attacker's auxiliary images: the first of the dataset's holdout (same distribution, never trained on).
    steps, batch_size:
        The decoder's optimiser steps and batch size.
    refit:
        After training, solve the decoder's last layer by least squares (:class:`~splitshield.attacks.InverseNetwork`'s
        ``refit``: a tenth of the auxiliary images is held out of training to choose the ridge). A few hundred steps
        leave a shallow decoder far from its optimum: He et al.'s single transposed convolution at the CIFAR
        network's ``conv11`` stays far from the least-squares fit, which the refit reaches in one solve.
    """

    threat: ClassVar[str] = "black_box"
    aux_images: int = 512
    steps: int = 300
    batch_size: int = 32
    refit: bool = True

    def __post_init__(self) -> None:
        _check_budget(self, ("aux_images", "steps", "batch_size"))
        if not isinstance(self.refit, bool):
            raise ConfigError(f"FastAttack.refit must be True or False, got {self.refit!r}")

    def setting(self) -> dict[str, Any]:
        """The attack setting (as an experiment spec states it) that :func:`~splitshield.measure.fit_attack` fits."""
        return {"name": "inverse_network", "threat": self.threat, "aux": "same_distribution",
                "aux_n": self.aux_images, "adaptive": True,
                "params": {"steps": self.steps, "batch_size": self.batch_size, "refit": self.refit}}

    def describe(self) -> str:
        """The budget in words, as the report states it."""
        refit = " (a tenth held out), its last layer then solved by least squares" if self.refit else ""
        return f"inverse network (black box), {self.steps} steps on {self.aux_images} auxiliary images{refit}"


@dataclass(frozen=True)
class FastWhiteBox:
    """The fixed budget of the fast white-box estimate: rMLE through the head's weights from a grey image, without
    priors (λ_TV = λ_l2 = 0), Adam with step ``lr`` on [0, 1] pixels. Adam's step does not scale with the
    gradient, so one ``lr`` serves heads whose features have any scale.

    Attributes
    ----------
    iters, lr:
        Adam's steps and step size. Every step runs the head forward and back on the scored images, so the cost
        grows with the head's depth.
    """

    threat: ClassVar[str] = "white_box"
    iters: int = 100
    lr: float = 0.05

    def __post_init__(self) -> None:
        _check_budget(self, ("iters",))
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"FastWhiteBox.lr must be a positive finite number, got {lr!r}")

    def setting(self) -> dict[str, Any]:
        """The attack setting (as an experiment spec states it) that :func:`~splitshield.measure.fit_attack` fits;
        its auxiliary images are not used (no setting search)."""
        return {"name": "rmle", "threat": self.threat, "aux": "same_distribution", "aux_n": 1, "adaptive": True,
                "params": {"iters": self.iters, "lr": float(self.lr), "tv": 0.0, "l2": 0.0, "search": None}}

    def describe(self) -> str:
        """The budget in words, as the report states it."""
        return f"rMLE through the head's weights (white box), {self.iters} steps of lr {self.lr:g}"


#: A fast attack's budget.
FastBudget = FastAttack | FastWhiteBox
#: The fast attacks ``advise`` runs by default.
FAST_ATTACKS: tuple[FastBudget, ...] = (FastAttack(), FastWhiteBox())
#: Held-out test images every fast attack scores by default: one per class of a 10-class dataset
#: (:func:`held_out_index`), the protocol of He et al. and of ``benchmarks/advisor_validity.py``.
FAST_IMAGES = 10


@dataclass(frozen=True)
class Inversion:
    """A fast attack's result: mean PSNR (dB) and SSIM (7×7 uniform window) over the scored images, the
    images [N, C, H, W] and their reconstructions [N, C, H, W], both in [0, 1]."""

    psnr: float
    ssim: float
    originals: torch.Tensor
    reconstructions: torch.Tensor


def held_out_index(test: ImageSet, n: int) -> list[int]:
    """Positions of ``n`` test images taken one class after the other (the first image of each class, then the
    second of each, ...): balanced over the classes, whatever order the split is stored in."""
    per_class = [(test.labels == c).nonzero().flatten().tolist() for c in range(test.num_classes)]
    order = [i for turn in itertools.zip_longest(*per_class) for i in turn if i is not None]
    return order[:n]


def fast_inversion(target: SplitModel, data: Dataset, attack: FastBudget, seed: int, images: int = FAST_IMAGES,
                   device: str | torch.device = "cpu") -> Inversion:
    """Fit the fast ``attack`` on ``target`` (no defense) through the measurement pipeline, seeded as
    ``splitshield attack`` seeds it, and score it on :func:`held_out_index`'s first ``images`` test images."""
    from ..measure import attack_seed, fit_attack  # the experiment layer (pydantic) on first use only

    setting = attack.setting()
    fitted = fit_attack(target, None, data, setting, images=1, seed=attack_seed(seed, setting))
    x, _ = data.test.subset(held_out_index(data.test, images)).tensors(device)
    x_hat = fitted.attack.invert(fitted.victim.observe(x)).detach().cpu()
    x = x.cpu()
    return Inversion(float(psnr(x_hat, x)), float(ssim(x_hat, x)), x, x_hat)


@torch.no_grad()
def gpz_radius(z: torch.Tensor, labels: torch.Tensor) -> tuple[float | None, float]:
    """The GPZ statistic of one batch of features.

    Parameters
    ----------
    z:
        Features [N, ...] (flattened to [N, D]).
    labels:
        Class of each feature [N] (the model's predictions).

    Returns
    -------
    r2, variance:
        R̄², the mean over the classes with at least 2 members of mean_{i∈c} ‖z_i − μ_c‖² (``None`` when there is
        none: a lone member's radius is 0 whatever the features), and the total variance V = mean_i ‖z_i − μ‖²,
        both in squared feature units.
    """
    flat = z.flatten(1)
    labels = labels.to(flat.device)
    counts, means, radii = [], [], []
    for c in labels.unique():
        members = flat[labels == c].double()  # one class at a time: a float64 copy of all features can be large
        counts.append(len(members))
        means.append(members.mean(0))
        radii.append(float((members - means[-1]).pow(2).sum(1).mean()))
    weights = [k / len(flat) for k in counts]
    mean = sum(w * m for w, m in zip(weights, means, strict=True))
    # The law of total variance: the spread within the classes plus the spread of the class means.
    variance = sum(w * (r + float((m - mean).pow(2).sum())) for w, r, m in zip(weights, radii, means, strict=True))
    spread = [r for r, k in zip(radii, counts, strict=True) if k > 1]
    return (sum(spread) / len(spread) if spread else None), variance


def relative_drops(values: Sequence[float | None]) -> list[float | None]:
    """Δ_ℓ = (v_{ℓ−1} − v_ℓ) / v_{ℓ−1} for each point after the first (``None`` for the first, or where a value is
    missing or the previous one is 0)."""
    drops: list[float | None] = [None]
    for prev, cur in zip(values[:-1], values[1:], strict=True):
        drops.append(None if prev is None or cur is None or prev == 0 else (prev - cur) / prev)
    return drops


#: Liu et al.'s zone spans to the second largest drop of R̄² when every drop between the two exceeds this.
GPZ_EXTEND_DROP = 0.2


def gpz_zone(drops: Sequence[float | None]) -> list[int]:
    """Liu et al.'s Golden Partition Zone, as indices into ``drops`` (from :func:`relative_drops`).

    The zone starts at the point after the largest drop of R̄² (the point whose drop it is) and spans to the
    point of the second largest drop when that one comes later and it and every drop in between exceed
    :data:`GPZ_EXTEND_DROP`; otherwise it is that one point. ``[]`` when no drop was measured.
    """
    ranked = sorted((d, i) for i, d in enumerate(drops) if d is not None)
    if not ranked:
        return []
    first = ranked[-1][1]
    if len(ranked) > 1:
        second = ranked[-2][1]
        if second > first and all(d is not None and d > GPZ_EXTEND_DROP for d in drops[first + 1 : second + 1]):
            return list(range(first, second + 1))
    return [first]


@torch.no_grad()
def ce_floor(x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, noise: float) -> float:
    """The conditional-entropy MSE floor of features ``z`` [N, ...] of images ``x`` [N, C, H, W] in [0, 1] sent with
    Gaussian noise of standard deviation ``noise`` × std(z), one mixture component per class of ``labels`` [N].

    Returns the floor in squared pixel units (comparable to :func:`~splitshield.metrics.mse`).

    Raises
    ------
    ConfigError
        A constant feature (no noise scale), or a class with fewer than 2 images (no mixture component).
    """
    sigma = noise * float(z.float().std())
    if sigma <= 0:
        raise ConfigError("the feature is constant, so noise relative to it is 0")
    try:
        return float(conditional_entropy_floor(x.cpu(), z.cpu(), sigma, labels=labels.cpu())["mse_floor"])
    except ConfigError as exc:  # a class with too few images: more images give it a mixture component
        raise ConfigError(f"{exc}; measure on more test images (images, --images), or a larger test split") from exc
