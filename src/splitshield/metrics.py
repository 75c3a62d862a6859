"""Reconstruction and utility metrics: MSE, PSNR, SSIM and top-1 accuracy; the conditional-entropy MSE floor
(an estimate) and the Gaussian-channel bound on what a noised feature carries (certified).

All image metrics take a reconstruction ``x_hat`` and the original ``x``, both float tensors of
shape ``[N, C, H, W]`` holding intensities in ``[0, data_range]`` (``[0, 1]`` by convention). Each
metric is computed per image and then, for ``reduction="mean"``, averaged over the N images: this
is the protocol of He et al. (2019), who report PSNR and SSIM per image averaged over a test set.

Everything is plain torch (no scipy or scikit-image at run time), so the metrics run on any device,
on whole batches at once, and are differentiable (an attack may use ``1 - ssim`` as a loss).

SSIM is offered in the two conventions the model-inversion literature uses; both reproduce
``skimage.metrics.structural_similarity`` to better than 1e-4:

- ``window="uniform"`` (He et al.): scikit-image's defaults, a 7x7 uniform window with the sample
  covariance (N/(N-1) factor), K1=0.01, K2=0.03.
- ``window="gaussian"`` (CEM and Wang et al. 2004): an 11x11 Gaussian window, sigma=1.5, population
  covariance; i.e. scikit-image with ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from splitshield.errors import ConfigError

__all__ = ["accuracy", "conditional_entropy_floor", "gaussian_channel_bound", "mse", "psnr", "ssim"]

Reduction = Literal["mean", "none"]
Window = Literal["uniform", "gaussian"]

_REDUCTIONS = ("mean", "none")

# SSIM stabilising constants of Wang et al. (2004), also scikit-image's defaults.
_K1 = 0.01
_K2 = 0.03

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class _WindowSpec:
    """How one SSIM convention weights the pixels of a local window."""

    size: int
    """Side of the square window, in pixels (odd)."""
    sigma: float | None
    """Gaussian standard deviation in pixels; ``None`` for a uniform window."""
    sample_covariance: bool
    """Whether (co)variances get scikit-image's N/(N-1) factor, N = size**2."""


_WINDOWS: dict[str, _WindowSpec] = {
    "uniform": _WindowSpec(size=7, sigma=None, sample_covariance=True),
    # scipy truncates the Gaussian at radius int(3.5 * sigma + 0.5) = 5 (the truncate=3.5 that
    # scikit-image passes), hence 11 taps.
    "gaussian": _WindowSpec(size=11, sigma=1.5, sample_covariance=False),
}


def mse(x_hat: torch.Tensor, x: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per image.

    Parameters
    ----------
    x_hat : torch.Tensor
        Reconstructions, float, shape ``[N, C, H, W]``.
    x : torch.Tensor
        Originals, same shape as ``x_hat``.
    reduction : {"mean", "none"}
        ``"mean"`` averages the per-image errors over the N images; ``"none"`` keeps them.

    Returns
    -------
    torch.Tensor
        Mean over C, H and W of the squared difference, in squared intensity units: a 0-d tensor
        for ``"mean"``, shape ``[N]`` for ``"none"``.

    Raises
    ------
    ConfigError
        If the inputs are not float 4-D tensors of the same shape, or ``reduction`` is unknown.
    """
    _check_images(x_hat, x, reduction)
    per_image = (x_hat - x).pow(2).mean(dim=(1, 2, 3))
    return _reduce(per_image, reduction)


def psnr(
    x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 1.0, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 * log10(data_range**2 / mse_i)``.

    The PSNR is computed for each image and only then averaged (He et al.'s protocol), which is not
    the same as the PSNR of the batch-mean MSE.

    Parameters
    ----------
    x_hat : torch.Tensor
        Reconstructions, float, shape ``[N, C, H, W]``.
    x : torch.Tensor
        Originals, same shape as ``x_hat``.
    data_range : float
        Peak-to-peak intensity range of the images (1.0 for images in ``[0, 1]``).
    reduction : {"mean", "none"}
        ``"mean"`` averages the per-image PSNRs over the N images; ``"none"`` keeps them.

    Returns
    -------
    torch.Tensor
        PSNR in decibels: a 0-d tensor for ``"mean"``, shape ``[N]`` for ``"none"``. An image
        identical to its original (MSE 0) has PSNR ``+inf``, so the mean over a batch containing
        one is ``+inf`` too; no error is raised, but the gradient there is NaN.

    Raises
    ------
    ConfigError
        If the inputs are not float 4-D tensors of the same shape, ``data_range <= 0``, or
        ``reduction`` is unknown.
    """
    _check_images(x_hat, x, reduction)
    _check_data_range(data_range)
    # Division by a zero MSE gives inf and log10(inf) = inf, which is exactly the answer we want.
    per_image = 10.0 * torch.log10(data_range**2 / mse(x_hat, x, reduction="none"))
    return _reduce(per_image, reduction)


def ssim(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    window: Window = "uniform",
    data_range: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity per image, equal to scikit-image's ``structural_similarity``.

    Local SSIM is computed at every position where the window fits entirely inside the image
    (scikit-image filters with reflect padding and then crops ``(size - 1) // 2`` pixels at each
    border, which discards every padded value, so a 'valid' convolution gives the same numbers).
    The local map is averaged over those positions for each channel, the channels are averaged
    (scikit-image's ``channel_axis`` behaviour), giving one value per image.

    Parameters
    ----------
    x_hat : torch.Tensor
        Reconstructions, float, shape ``[N, C, H, W]``, with ``H`` and ``W`` at least the window
        size (7 for ``"uniform"``, 11 for ``"gaussian"``).
    x : torch.Tensor
        Originals, same shape as ``x_hat``.
    window : {"uniform", "gaussian"}
        ``"uniform"``: 7x7 uniform window with sample covariance (He et al.; scikit-image's
        defaults). ``"gaussian"``: 11x11 Gaussian window, sigma 1.5 pixels, population covariance
        (CEM; Wang et al. 2004).
    data_range : float
        Peak-to-peak intensity range of the images (1.0 for images in ``[0, 1]``); it scales the
        stabilising constants ``C1 = (0.01 * data_range)**2`` and ``C2 = (0.03 * data_range)**2``.
    reduction : {"mean", "none"}
        ``"mean"`` averages the per-image SSIMs over the N images; ``"none"`` keeps them.

    Returns
    -------
    torch.Tensor
        SSIM (dimensionless, at most 1, 1 for identical images), in the dtype of the inputs: a 0-d
        tensor for ``"mean"``, shape ``[N]`` for ``"none"``.

    Raises
    ------
    ConfigError
        If the inputs are not float 4-D tensors of the same shape, ``window`` or ``reduction`` is
        unknown, ``data_range <= 0``, or the images are smaller than the window.

    Notes
    -----
    The filtered maps are held in float64 (float32 on Apple MPS, which has no float64), so memory
    is about ``5 * N * C * H * W * 8`` bytes: batch large sets.
    """
    _check_images(x_hat, x, reduction)
    _check_data_range(data_range)
    if window not in _WINDOWS:
        raise ConfigError(f"window must be one of {sorted(_WINDOWS)}, got {window!r}")
    spec = _WINDOWS[window]
    height, width = x.shape[-2:]
    if height < spec.size or width < spec.size:
        raise ConfigError(
            f"ssim with window={window!r} needs images at least {spec.size}x{spec.size} pixels, "
            f"got x of {height}x{width}; use larger images or another metric"
        )

    out_dtype = torch.result_type(x_hat, x)
    # The variances are differences of nearly equal window means (E[x^2] - E[x]^2). In float32 that
    # cancellation left errors up to 8e-6 against scikit-image on CIFAR-10; float64 leaves 3e-8.
    compute_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    a = x_hat.to(compute_dtype)
    b = x.to(compute_dtype)

    channels = x.shape[1]
    # One grouped convolution filters all five moment maps of all channels at once.
    moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = 5 * channels
    taps = _window_taps(spec, compute_dtype, x.device)
    # The window is separable (uniform or Gaussian), so two 1-D passes replace a k x k kernel.
    vertical = taps.view(1, 1, -1, 1).repeat(groups, 1, 1, 1)
    horizontal = taps.view(1, 1, 1, -1).repeat(groups, 1, 1, 1)
    filtered = F.conv2d(F.conv2d(moments, vertical, groups=groups), horizontal, groups=groups)
    mu_a, mu_b, mean_aa, mean_bb, mean_ab = filtered.chunk(5, dim=1)

    cov_norm = spec.size**2 / (spec.size**2 - 1) if spec.sample_covariance else 1.0
    var_a = cov_norm * (mean_aa - mu_a * mu_a)
    var_b = cov_norm * (mean_bb - mu_b * mu_b)
    cov_ab = cov_norm * (mean_ab - mu_a * mu_b)

    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    # Every channel has the same number of valid positions, so the mean over (C, H', W') equals
    # scikit-image's per-channel mean followed by the mean over channels.
    per_image = ssim_map.mean(dim=(1, 2, 3)).to(out_dtype)
    return _reduce(per_image, reduction)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: the fraction of rows whose highest logit is at the true label.

    Parameters
    ----------
    logits : torch.Tensor
        Class scores, shape ``[N, K]`` (logits, probabilities or anything argmax-compatible).
    labels : torch.Tensor
        True class indices in ``[0, K)``, integer, shape ``[N]``.

    Returns
    -------
    float
        Fraction in ``[0, 1]`` of the N samples classified correctly.

    Raises
    ------
    ConfigError
        If ``logits`` is not 2-D, ``labels`` is not a 1-D integer tensor of the same length, or
        N is 0.
    """
    if logits.dim() != 2:
        raise ConfigError(f"logits must be 2-D [N, K], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ConfigError(
            f"labels must be 1-D with one entry per row of logits ({logits.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in _INTEGER_DTYPES:
        raise ConfigError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if logits.shape[0] == 0:
        raise ConfigError("logits must hold at least one row; accuracy of an empty batch is undefined")
    correct = logits.argmax(dim=1) == labels.to(logits.device)
    return correct.double().mean().item()


def _check_images(x_hat: torch.Tensor, x: torch.Tensor, reduction: str) -> None:
    """Raise ConfigError unless ``x_hat`` and ``x`` are same-shape float NCHW batches."""
    for name, t in (("x_hat", x_hat), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ConfigError(
                f"{name} must be a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}; "
                "add a batch dimension with .unsqueeze(0) for a single image"
            )
        if not t.is_floating_point():
            raise ConfigError(f"{name} must be a float tensor in [0, data_range], got dtype {t.dtype}")
    if x_hat.shape != x.shape:
        raise ConfigError(
            f"x_hat and x must have the same shape, got x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ConfigError("x must hold at least one image (N >= 1)")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")


def _check_data_range(data_range: float) -> None:
    """Raise ConfigError unless ``data_range`` is a positive finite number."""
    # isfinite also rejects NaN, which would otherwise propagate silently into every result.
    if not (math.isfinite(data_range) and data_range > 0):
        raise ConfigError(
            f"data_range must be a positive finite number (1.0 for [0, 1] images), got {data_range}"
        )


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """Average ``per_image`` (shape ``[N]``) over images, or return it unchanged."""
    return per_image.mean() if reduction == "mean" else per_image


def _window_taps(spec: _WindowSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D window of ``spec``, shape ``[spec.size]``, summing to 1.

    The Gaussian taps are scipy.ndimage's: ``exp(-x**2 / (2 sigma**2))`` at integer offsets, then
    normalised over the truncated support, not the continuous density.
    """
    if spec.sigma is None:
        return torch.full((spec.size,), 1.0 / spec.size, dtype=dtype, device=device)
    radius = spec.size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / spec.sigma) ** 2)
    return taps / taps.sum()


def conditional_entropy_floor(
    x: torch.Tensor,
    z_clean: torch.Tensor,
    sigma: float,
    labels: torch.Tensor | None = None,
    pixel_variance: float = 1.0 / (12 * 255**2),
) -> dict[str, float]:
    """An **estimate** (not a certified bound) of the smallest per-pixel MSE any inversion of the sent feature can
    reach, from CEM's conditional-entropy argument (ALGORITHMS §B.1) with Gaussian models of the images.

    The feature is sent as z = ẑ + N(0, σ²I), ẑ = f(x); d = dim x. The chain, each step marked:

    1. *Dequantisation (exact).* Stored images are 8-bit, so x has no density. Let x' = x + u, with u uniform on
       each pixel's quantisation step and independent of everything, of variance ``pixel_variance`` per pixel
       (1/(12·255²) for 8-bit levels). For every reconstruction x̂(z), E‖x − x̂‖²/d = E‖x' − x̂‖²/d − pixel_variance
       (u has mean 0 and is independent of x and z), and Cov(x') = Cov(x) + pixel_variance·I. This holds for any
       ``pixel_variance`` > 0; the 8-bit value makes x' the density of the stored pixel levels.
    2. *Estimation-entropy bound (exact):* E‖x' − x̂‖²/d >= exp(2·h(x'|z)/d) / (2πe).
    3. *Data processing (exact):* h(x'|z) = h(x') − I(x'; z) >= h(x') − I(ẑ; z), since x' → x → ẑ → z.
    4. *Channel bound (exact for the true covariances; here they are sampled):* with the classes of ``labels``
       as mixture components (weights π_c, feature covariances Σ_c), I(ẑ; z) <= H(π) + Σ_c π_c·½·log det(I + Σ_c/σ²)
       (a Gaussian input carries the most information through a Gaussian channel for its covariance).
    5. *The estimate:* h(x') is replaced by ĥ = Σ_c π_c·½·log det(2πe·(Σ^x_c + pixel_variance·I)), the class
       average of the entropies of Gaussians with each class's image covariance. A Gaussian has the *most*
       entropy for its covariance, so ĥ is an upper bound on h(x'|class), and h(x'|class) <= h(x') <=
       h(x'|class) + H(π): ĥ can exceed h(x') by however far the classes are from Gaussian, and the floor, which
       grows with ĥ, can then err high. Nothing bounds that error.

    Result: ``mse_floor`` = max(0, exp(2·(ĥ − Î)/d) / (2πe) − pixel_variance). It is also loose by construction:
    for Gaussian images and a Gaussian feature it is the geometric mean of the eigenvalues of the posterior
    covariance, where the least possible MSE is their arithmetic mean, so directions of almost no variance
    (constant border pixels, left with only the dequantisation's variance) pull it far below any attack's
    MSE, and it moves with ``pixel_variance``. The certified part alone is step 4 (and, per dimension,
    :func:`gaussian_channel_bound`): how much z can carry about x, whatever the images are.

    Parameters
    ----------
    x : torch.Tensor
        Images [N, C, H, W] in [0, 1].
    z_clean : torch.Tensor
        The noise-free features ẑ [N, ...] of the same images.
    sigma : float
        Standard deviation of the Gaussian noise added to ẑ (0: no noise, the floor is 0).
    labels : torch.Tensor, optional
        Class labels [N] defining the mixture components; each needs at least 2 samples (and, for a
        full-rank covariance, more samples than pixels).
    pixel_variance : float
        Variance per pixel of the dequantisation noise u (squared intensity units; 1/(12·255²): 8-bit images).

    Returns
    -------
    dict
        ``h_x`` (nats, the estimate ĥ of h(x')), ``mi_upper`` (nats, the bound Î on I(ẑ; z)), ``h_x_given_z``
        (nats, ĥ − Î), ``mse_floor`` (per-pixel squared error, comparable to :func:`mse`), ``sigma``,
        ``components``.
    """
    if x.dim() != 4 or z_clean.shape[0] != x.shape[0]:
        raise ConfigError(f"x must be [N, C, H, W] and z_clean [N, ...] with the same N, got "
                          f"{tuple(x.shape)} and {tuple(z_clean.shape)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"sigma must be >= 0, got {sigma!r}")
    if not pixel_variance > 0:
        raise ConfigError(f"pixel_variance must be > 0, got {pixel_variance!r}")
    n, d = x.shape[0], x[0].numel()
    groups = torch.zeros(n, dtype=torch.long) if labels is None else labels.detach().cpu().long()
    xs = x.detach().cpu().flatten(1).double()
    zs = z_clean.detach().cpu().flatten(1).double()
    h_x = mi = 0.0
    components = 0
    for g in torch.unique(groups):
        member = groups == g
        count = int(member.sum())
        if count < 2:
            raise ConfigError(f"class {int(g)} has {count} sample(s); each mixture component needs at least 2")
        weight = count / n
        components += 1
        lam_x = _covariance_eigenvalues(xs[member], d).clamp_min(0) + pixel_variance
        h_x += weight * 0.5 * torch.log(2 * math.pi * math.e * lam_x).sum().item()
        if sigma > 0:
            lam_z = _covariance_eigenvalues(zs[member], zs.shape[1]).clamp_min(0)
            mi += weight * 0.5 * torch.log1p(lam_z / sigma**2).sum().item() - weight * math.log(weight)
    if sigma == 0:
        return {"h_x": h_x, "mi_upper": math.inf, "h_x_given_z": -math.inf, "mse_floor": 0.0, "sigma": 0.0,
                "components": components}
    h_cond = h_x - mi
    floor = max(0.0, math.exp(2 * h_cond / d) / (2 * math.pi * math.e) - pixel_variance)
    return {"h_x": h_x, "mi_upper": mi, "h_x_given_z": h_cond, "mse_floor": floor, "sigma": float(sigma),
            "components": components}


def gaussian_channel_bound(z_clean: torch.Tensor, sigma: float) -> float:
    """A certified upper bound, in nats per image, on the information I(x; z) the sent feature carries about the
    image x, when z = ẑ + N(0, σ²I) with ẑ the clean feature of x.

    With D = dim ẑ and v_i the variance of ẑ's i-th element over the images,

        I(x; z) <= I(ẑ; z) = h(z) − h(noise) <= ½·log det(I + Cov(ẑ)/σ²) <= Σ_i ½·log(1 + v_i/σ²)

    by, in turn, data processing (x → ẑ → z), a Gaussian having the most entropy for its covariance
    (Cov(z) = Cov(ẑ) + σ²I), and Hadamard's inequality. Assumptions: the noise is Gaussian with variance σ² in
    every dimension and independent of x and ẑ (ẑ may itself be random, e.g. dropout before the noise), and each
    v_i is finite. Nothing is assumed about the images or the shape of ẑ's distribution. The bound is reached
    when ẑ is Gaussian with uncorrelated elements.

    The one statistical step is the v_i, estimated as the (unbiased) sample variances of ``z_clean`` over its
    images: the bound holds for the distribution the images were drawn from, up to that estimate's error.

    Parameters
    ----------
    z_clean : torch.Tensor
        Noise-free features ẑ [N, ...] of N >= 2 images.
    sigma : float
        Standard deviation of the Gaussian noise (> 0: without noise I(x; z) is not bounded).

    Returns
    -------
    float
        The bound Σ_i ½·log(1 + v_i/σ²), in nats per image (divide by log 2 for bits).
    """
    if z_clean.dim() < 2 or z_clean.shape[0] < 2:
        raise ConfigError(f"z_clean must be [N, ...] with N >= 2 images, got shape {tuple(z_clean.shape)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be > 0 (without noise I(x; z) is not bounded), got {sigma!r}")
    variances = z_clean.detach().cpu().flatten(1).double().var(0)
    return 0.5 * torch.log1p(variances / sigma**2).sum().item()


def _covariance_eigenvalues(samples: torch.Tensor, dim: int) -> torch.Tensor:
    """All ``dim`` eigenvalues of the (population) covariance of ``samples`` [n, dim], zeros included.

    With fewer samples than dimensions the non-zero eigenvalues are those of the n×n Gram matrix, which
    is much cheaper than the dim×dim covariance.
    """
    centred = samples - samples.mean(0, keepdim=True)
    n = centred.shape[0]
    small = centred @ centred.T if n < dim else centred.T @ centred
    eig = torch.linalg.eigvalsh(small / n)
    return torch.cat([eig, eig.new_zeros(dim - eig.numel())])
