"""White-box model inversion: regularised MLE (He et al., ACSAC 2019, §4, Algorithm 1).

The attacker holds the head's weights f1 and an observed feature z0, and solves

    x* = argmin_x  mean((f1(x) - z0)²) + λ_TV·TV(x) + λ_l2·mean((x - ½)²),   x ∈ [0, 1]

with Adam from a grey image. Against a defended model the attack is adaptive: f1 is followed by the
defense's obfuscation, re-sampled at every step (an expectation-over-transformation estimate).
The table's settings per split are the authors' values (ALGORITHMS §A.2). Their code optimises the normalised
image x' = (x − m)/s, where the values mean on pixels λ_TV/s² and an Adam step of lr·s (on MNIST, s = ½:
their λ_TV = 1, lr 1e-2 are λ_TV = 4, lr 5e-3 on x). ``search=None`` applies them to x in [0, 1] as they
stand; ``search="he2019"`` optimises x' as their code does, with the head's own normalisation, so their values
mean what they meant to them. Either way x is projected onto [0, 1] after every step, where their code clips
only the result.

By default (``search="auto"``) the attacker tunes the attack to the model it holds, never looking at the
private images: the setting (λ_TV, λ_l2, lr) is the one that inverts the attacker's own auxiliary images
best (their features computed through the same view), then one run inverts the observed features. The
feature residual alone cannot choose λ_TV: a smaller λ_TV always fits the features at least as well,
which at a non-injective cut is the wrong image. Without auxiliary data the priors are the table's and the
step size is chosen per image, as the run reaching the lowest objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import metrics
from ..errors import ConfigError, SplitError
from ..models.zoo import Normalize
from ._params import flag, non_negative, non_negative_int, one_of, optional, positive, positive_int
from ._rmle import rmle, total_variation
from .base import InversionAttack, WhiteBoxView, seeded

#: He et al.'s per-split (iterations, lr, λ_TV, λ_l2) for their named split points, as their code states them
#: for normalised images (see the module docstring for what they mean on [0, 1] pixels).
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
#: ``search="auto"``: the λ_TV values tried (with the table's), and the multiples of the table's lr.
TV_GRID = (0.0, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
LR_FACTORS = (0.1, 1.0, 10.0)
SEARCHES = ("auto", "he2019", None)
#: Auxiliary images the auto search inverts to choose λ_TV, and noise draws averaging each objective.
CALIBRATION_IMAGES = 8
OBJECTIVE_DRAWS = 8
#: PSNR cap (dB) when scoring λ_TV on the aux images: exact inversions (infinite PSNR) tie.
_PSNR_CAP = 100.0


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


#: The network of He et al.'s that each of the table's split points belongs to (zoo names).
HE2019_NETWORKS = {"conv1": "lenet", "ReLU2": "lenet", "conv11": "cifar-cnn", "ReLU22": "cifar-cnn",
                   "ReLU32": "cifar-cnn", "fc1": "cifar-cnn", "fc2": "cifar-cnn"}


def he2019_normalisation(point: str, head: nn.Module, input_shape: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The per-channel (mean, std) [C] of ``head``'s input normalisation, in which ``search="he2019"`` optimises;
    ``ConfigError`` unless ``head`` (images ``input_shape``) is He et al.'s network cut at one of the table's
    points (the name, a ``Normalize`` layer, and the features their network has there)."""
    from ..models import build_model, split

    points = "; ".join(f"{net}: {', '.join(p for p, n in HE2019_NETWORKS.items() if n == net)}"
                       for net in dict.fromkeys(HE2019_NETWORKS.values()))
    fix = (f"He et al.'s setting exists for their networks' split points ({points}): use search 'auto' or None "
           "(null in a spec)")
    network = HE2019_NETWORKS.get(point)
    if network is None:
        raise ConfigError(f"search='he2019' at {point!r}: {fix}")
    norm = next((layer for layer in head.modules() if isinstance(layer, Normalize)), None)
    if norm is None:
        raise ConfigError(f"search='he2019' at {point!r}: this head is not their {network} (no input "
                          f"normalisation); {fix}")
    try:
        theirs = tuple(split(build_model(network, input_shape=input_shape), point,
                             input_shape=input_shape).feature_shape())
    except (ConfigError, SplitError) as exc:
        raise ConfigError(f"search='he2019' at {point!r}: this head is not their {network} ({exc}); {fix}") from None
    with torch.no_grad():
        ours = tuple(head(torch.zeros(1, *input_shape, device=norm.mean.device)).shape[1:])
    if ours != theirs:
        raise ConfigError(f"search='he2019' at {point!r}: this head is not their {network} (features {list(ours)}, "
                          f"not {list(theirs)}); {fix}")
    return norm.mean.flatten(), norm.std.flatten()


def search_grid(point: str, lr: float | None, tv: float | None,
                l2: float | None) -> tuple[tuple[tuple[float, float], ...], tuple[float, ...]]:
    """The priors ((λ_TV, λ_l2), ...) and the lr values ``search="auto"`` tries at ``point``.

    λ_TV in ``TV_GRID`` and the table's, λ_l2 in {0, the table's}, lr in ``LR_FACTORS`` × the table's; a given
    ``tv``, ``l2`` or ``lr`` is the only value of its kind.
    """
    _, lr0, tv0, l20 = HE2019_SETTINGS.get(point, _FALLBACK)
    tvs = (tv,) if tv is not None else tuple(sorted({*TV_GRID, tv0}))
    l2s = (l2,) if l2 is not None else tuple(sorted({0.0, l20}))
    lrs = (lr,) if lr is not None else tuple(f * lr0 for f in LR_FACTORS)
    return tuple((t, w) for t in tvs for w in l2s), lrs


def run_settings(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, input_shape: tuple[int, ...],
                 settings: Sequence[tuple[float, float, float]], *, iters: int, seed: int, progress: bool = False,
                 desc: str = "rMLE", normalised: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """rMLE through ``forward`` of every setting (λ_TV, λ_l2, lr) on every feature of ``z`` [B, ...], as one
    batched run (in the normalised space ``normalised`` when given, see :func:`rmle`): reconstructions
    [K·B, C, H, W] in [0, 1], setting-major."""
    grid = torch.tensor(settings, dtype=torch.float64)  # [K, 3]
    k = len(grid)
    zz = z.detach().repeat(k, *([1] * (z.dim() - 1)))
    tv, l2, lr = (grid[:, i].repeat_interleave(z.shape[0]) for i in range(3))
    with seeded(seed):
        return rmle(forward, zz, input_shape, iters=iters, lr=lr if k > 1 else float(lr[0]),
                    tv=tv.float() if k > 1 else float(tv[0]), l2=l2.float() if k > 1 else float(l2[0]),
                    normalised=normalised, progress=progress, desc=desc)


def calibrate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              settings: Sequence[tuple[float, float, float]], *, iters: int, seed: int,
              progress: bool = False) -> tuple[tuple[float, float, float], dict[tuple[float, float, float], float]]:
    """The setting (λ_TV, λ_l2, lr) that inverts the attacker's own images ``x`` [B, C, H, W] best through
    ``forward``, and every setting's mean PSNR in dB (capped at 100) on them. Among ties, the weakest priors.

    Every setting is tried: step size and priors interact (at few iterations a small TV weight helps a
    small step and hurts a large one), so choosing one after the other can miss the best pair.
    """
    with torch.no_grad(), seeded(seed + 1):  # the features of x under the noise draws of a fixed seed
        z = forward(x)
    x_hat = run_settings(forward, z, tuple(x.shape[1:]), settings, iters=iters, seed=seed, progress=progress,
                         desc="rMLE calibration")
    truth = x.repeat(len(settings), 1, 1, 1).to(x_hat)
    psnr = metrics.psnr(x_hat, truth, reduction="none").clamp(max=_PSNR_CAP).view(len(settings), -1)
    scores = dict(zip(settings, psnr.mean(1).tolist(), strict=True))
    def rank(st: tuple[float, float, float]) -> tuple[float, float]:  # a setting that gave NaN never wins
        return (scores[st] if math.isfinite(scores[st]) else -math.inf, -st[0] - st[1])

    return max(settings, key=rank), scores


@torch.no_grad()
def relative_residual(send: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, z: torch.Tensor,
                      seed: int) -> torch.Tensor:
    """``‖send(x) − z‖² / ‖z‖²`` per image [B], averaged over ``OBJECTIVE_DRAWS`` draws of the defense's noise,
    drawn from ``seed`` (the same draws in every call: runs compared on one image see the same noise)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for draw in range(OBJECTIVE_DRAWS):
        with seeded(seed + 1 + draw):
            total += (send(x) - z).pow(2).flatten(1).sum(1).double()
    return (total / OBJECTIVE_DRAWS / z.pow(2).flatten(1).sum(1).double().clamp_min(1e-30)).float()


class WhiteBoxInversion(InversionAttack):
    """rMLE inversion with the head's weights.

    Parameters
    ----------
    iters, lr, tv, l2:
        Adam steps (> 0), step size (> 0), TV weight and L2 weight (>= 0); ``None`` takes He et al.'s value
        for the split point's name when it is one of theirs, else (3000, 1e-2, 1.0, 0.0), or with
        ``search="auto"`` is searched for.
    search:
        ``"auto"`` (default): tune the settings to the model by the attacker's own criteria (module
        docstring): at ``fit``, the settings of :func:`search_grid` invert the first ``CALIBRATION_IMAGES``
        aux images (:func:`calibrate`) and the one with the best mean PSNR on them is kept; ``invert`` then
        runs it alone.
        Without aux data, the table's priors, and per image the lr whose run reaches the lowest objective
        (feature mean-squared error, averaged over ``OBJECTIVE_DRAWS`` draws of the defense's noise, plus
        the priors), all lrs in one batched run. A given ``tv``, ``l2`` or ``lr`` is not searched.
        ``"he2019"``: He et al.'s setting as their code means it, one run: the table's values (or the given
        ones) for the normalised image, optimised in the head's own normalised space
        (:func:`he2019_normalisation`; ``ConfigError`` at ``fit`` unless the head is their network cut at one
        of the table's points).
        ``None``: the table's settings above applied to [0, 1] pixels as they stand, one run.
    seed:
        Seeds the defense's noise the adaptive attacker draws while it optimises.
    progress:
        Show a progress bar over iterations.

    Fitted attributes
    -----------------
    iters_, lr_, tv_, l2_:
        The settings in use, ``None`` resolved for the victim's split point; with ``search="auto"`` and
        no aux data, ``lr_`` is the tuple of step sizes ``invert`` tries per image.
    normalised_:
        ``search="he2019"``: the per-channel (mean, std) of the space the attack optimises in, else ``None``.
    calibration_:
        ``search="auto"`` with aux data: {(λ_TV, λ_l2, lr): mean PSNR in dB (capped at 100) on the aux
        images} of every setting tried, else ``{}``.
    view_:
        The white-box view of the victim.
    chosen_, residual_:
        Set by each ``invert``: per image the (λ_TV, λ_l2, lr) of the kept run [B, 3], and its relative
        feature residual ``‖send(x̂) − z‖² / ‖z‖²`` [B] (averaged over the noise draws).
    """

    threats = ("white_box",)
    name = "rmle"

    def __init__(self, iters: int | None = None, lr: float | None = None, tv: float | None = None,
                 l2: float | None = None, search: str | None = "auto", seed: int = 0, progress: bool = True):
        self.iters, self.lr, self.tv, self.l2 = check_rmle_params(iters, lr, tv, l2)
        self.search = one_of("search", search, SEARCHES)
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: WhiteBoxView) -> WhiteBoxInversion:  # type: ignore[override]
        self.iters_, self.lr_, self.tv_, self.l2_ = rmle_settings(view.point, self.iters, self.lr, self.tv, self.l2)
        self.normalised_ = (he2019_normalisation(view.point, view.head, view.input_shape)
                            if self.search == "he2019" else None)
        self.view_ = view
        self.calibration_: dict[tuple[float, float, float], float] = {}
        if self.search == "auto":
            priors, lrs = search_grid(view.point, self.lr, self.tv, self.l2)
            if len(priors) * len(lrs) > 1 and view.aux is not None and len(view.aux) > 0:
                x, _ = view.aux.take(CALIBRATION_IMAGES).tensors()
                settings = [(t, w, r) for t, w in priors for r in lrs]
                (self.tv_, self.l2_, self.lr_), self.calibration_ = calibrate(
                    view.send, x, settings, iters=self.iters_, seed=self.seed, progress=self.progress)
            else:  # no aux data to choose the priors on: the table's, and the lr per image
                self.lr_ = lrs if len(lrs) > 1 else lrs[0]
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        lrs = self.lr_ if isinstance(self.lr_, tuple) else (self.lr_,)
        settings = tuple((self.tv_, self.l2_, r) for r in lrs)
        x = run_settings(self.view_.send, z, self.view_.input_shape, settings, iters=self.iters_,
                         seed=self.seed, progress=self.progress, desc="white-box rMLE",
                         normalised=self.normalised_)
        b = z.shape[0]
        residual = self._residual(x, z.detach().repeat(len(settings), *([1] * (z.dim() - 1))), b)
        grid = torch.tensor(settings, dtype=torch.float64).repeat_interleave(b, 0)  # [K·B, 3]
        if len(settings) > 1:  # per image, the lr whose run reaches the lowest objective
            objective = (residual * z.detach().pow(2).flatten(1).mean(1).repeat(len(settings))
                         + self.tv_ * total_variation(x) + self.l2_ * (x - 0.5).pow(2).flatten(1).mean(1))
            rows = (objective.view(len(settings), b).argmin(0).cpu() * b + torch.arange(b)).to(x.device)
            x, grid, residual = x[rows], grid[rows.cpu()], residual[rows]
        self.chosen_, self.residual_ = grid, residual
        return x

    def _residual(self, x: torch.Tensor, z: torch.Tensor, block: int) -> torch.Tensor:
        """Relative residual per row [N] (:func:`relative_residual`) in blocks of ``block`` rows (one per setting):
        every block sees the same draws, so the runs compared for one image are compared under the same noise."""
        return torch.cat([relative_residual(self.view_.send, x[i : i + block], z[i : i + block], self.seed)
                          for i in range(0, x.shape[0], block)])

    def config(self) -> dict:
        return {"name": self.name, "iters": self.iters, "lr": self.lr, "tv": self.tv, "l2": self.l2,
                "search": self.search, "seed": self.seed}
