"""The one affine quantiser: the ``quantize`` defense and the codec's uint8/uint4 encodings both use it.

With ``qmax = 2**bits - 1``, a range ``[lo, hi]`` of the values (over the whole tensor, or per sample)::

    offset = lo                                    (the real value of code 0, exact)
    scale  = (hi - lo) / qmax, rounded toward zero to a float32, floored at the smallest normal float32
    q      = clip(round((x - offset) / scale), 0, qmax)      round half to even, computed in float64
    x_hat  = scale * q + offset                              computed in float64, then cast

So ``|x - x_hat| <= scale / 2`` plus one rounding of the cast, the top code never decodes past ``hi``,
and a constant range round-trips exactly (every code is 0) without dividing by zero. ``scale`` and
``offset`` are float32-representable, which is what lets the codec carry them in a frame header.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["MAX_BITS", "affine_range", "dequantize", "fake_quantize", "quantize"]

MAX_BITS = 16
_F32_TINY = float(torch.finfo(torch.float32).tiny)


def _qmax(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return 2**bits - 1


def affine_range(x: torch.Tensor, bits: int, *, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantisation step and offset for ``x``.

    Parameters
    ----------
    x : torch.Tensor
        Floating-point, non-empty; with ``per_sample`` at least 1-D, samples along dim 0.
    bits : int
        1 to :data:`MAX_BITS`; ``2**bits`` levels.
    per_sample : bool
        One range per sample ``x[i]`` (the defense) instead of one for the whole tensor (a codec frame).

    Returns
    -------
    scale, offset : torch.Tensor
        float64, shape ``()`` or, per sample, ``[B, 1, ..., 1]`` (broadcasts against ``x``); in the units
        of ``x`` per code and in the units of ``x``. ``scale > 0``; ``offset`` is the range's minimum.
    """
    qmax = _qmax(bits)
    v = x.detach()
    if per_sample:
        flat = v.reshape(v.shape[0], -1)
        keep = (v.shape[0],) + (1,) * (v.dim() - 1)
        lo, hi = flat.amin(1).reshape(keep), flat.amax(1).reshape(keep)
    else:
        lo, hi = v.amin(), v.amax()
    lo, hi = lo.double(), hi.double()
    step = (hi - lo) / qmax
    scale = step.float()
    # Toward zero, so scale * qmax + lo <= hi: the top code never decodes past the maximum (FLT_MAX stays finite).
    scale = torch.where(scale.double() > step, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return scale.double().clamp_min(_F32_TINY), lo


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int) -> torch.Tensor:
    # A float64 copy, so (x - offset) / scale is not rounded before round(); in place to save memory.
    return x.detach().to(torch.float64, copy=True).sub_(offset).div_(scale).round_().clamp_(0, qmax)


def _values(codes: torch.Tensor, scale: torch.Tensor | float, offset: torch.Tensor | float,
            dtype: torch.dtype) -> torch.Tensor:
    # ``codes`` is a float64 tensor this module owns: overwritten in place.
    return codes.mul_(scale).add_(offset).to(dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clip(round((x - offset) / scale), 0, 2**bits - 1)``, same shape as ``x``.

    ``scale`` and ``offset`` come from :func:`affine_range`. The codes are uint8 for ``bits <= 8``,
    else int32; no gradient.
    """
    return _codes(x, scale, offset, _qmax(bits)).to(torch.uint8 if bits <= 8 else torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor | float, offset: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values ``scale * codes + offset``, computed in float64 and cast to ``dtype``.

    Out-of-range results (a hostile frame's scale) become inf without a warning; the codec rejects them.
    """
    return _values(codes.to(torch.float64, copy=True), scale, offset, dtype)


def fake_quantize(x: torch.Tensor, bits: int, *, per_sample: bool = False) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype and device, with a straight-through gradient.

    The forward value is quantised; the gradient with respect to ``x`` is the identity's, so a model
    can be trained (and attacked) through the quantiser.
    """
    scale, offset = affine_range(x, bits, per_sample=per_sample)
    x_hat = _values(_codes(x, scale, offset, _qmax(bits)), scale, offset, x.dtype)
    return x_hat + (x - x.detach())
