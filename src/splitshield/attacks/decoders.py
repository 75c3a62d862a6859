"""Decoder architectures for the inverse-network attack, built from feature and image shapes.

He et al. pick a decoder per split point by hand (ALGORITHMS §A.3); :func:`build_decoder` builds one
for any split from the shapes alone. The output is unbounded (trained with MSE, clamped to [0, 1] at
use), as in the authors' code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._params import choice


def he2019_decoder(point: str, feature_shape: tuple[int, ...]) -> nn.Module | None:
    """He et al.'s hand-made CIFAR decoders for ``conv11``, ``ReLU22`` and ``ReLU32``, else ``None``."""
    ct = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
    if point == "conv11" and feature_shape == (64, 32, 32):
        return nn.Sequential(nn.ConvTranspose2d(64, 3, 3, padding=1))
    if point == "ReLU22" and feature_shape == (128, 16, 16):
        return nn.Sequential(nn.ConvTranspose2d(128, 64, **ct), nn.ReLU(), nn.ConvTranspose2d(64, 3, 3, padding=1))
    if point == "ReLU32" and feature_shape == (128, 8, 8):
        return nn.Sequential(
            nn.ConvTranspose2d(128, 128, **ct), nn.ReLU(), nn.ConvTranspose2d(128, 64, **ct), nn.ReLU(),
            nn.ConvTranspose2d(64, 3, 3, padding=1),
        )
    return None


#: Largest feature (in values) given the fully connected decoder; beyond it the first layer gets too big.
DENSE_MAX_FEATURES = 16384
#: Largest image (in values) a feature map is decoded to by the fully connected decoder: 28×28 grey digits are
#: below it, 32×32 colour images and faces above (``benchmarks/decoder_choice.py``).
DENSE_MAX_IMAGE = 1024


def build_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], width: int = 64,
                  fine: int = 32, hidden: int = 1024, kind: str = "auto") -> nn.Module:
    """A decoder from features of ``feature_shape`` to images of ``image_shape`` (C, H, W).

    Flat features, and feature maps at a third of the image's resolution or less of images of at most
    :data:`DENSE_MAX_IMAGE` values, get the fully connected :func:`dense_decoder` (while they have at most
    :data:`DENSE_MAX_FEATURES` values): after two poolings every feature of a digit mixes a large receptive
    field, which a dense map inverts better and faster than upsampling convolutions (``benchmarks/decoders.py``).
    Every other feature map gets the convolutional decoder, which inverts a map at half the resolution, or any
    map of a colour image, far better than the dense one (``benchmarks/decoder_choice.py``): widened to
    ``width`` channels and doubled in size by transposed convolutions (halving the channels) while they fit;
    a remaining size gap of up to 8 pixels is closed by one transposed convolution of the exact kernel (e.g.
    LeNet ``conv1``: 24 -> 28 with a 5×5 kernel, the shape inverse of the layer), a larger one by bilinear
    resizing and a 3×3 conv. Its cost stays at low resolution: only ``fine`` channels and one output conv run
    at full size. ``kind`` forces one of the two (``"dense"`` or ``"conv"``); ``"auto"`` chooses as above.
    """
    choice("decoder kind", kind, ("auto", "dense", "conv"))
    if kind == "dense" or (kind == "auto" and wants_dense_decoder(feature_shape, image_shape)):
        return dense_decoder(feature_shape, image_shape, hidden)
    channels, height, wide = image_shape
    layers: list[nn.Module] = []
    if len(feature_shape) == 3:
        c, h, w = feature_shape
    else:
        h, w = max(1, math.ceil(height / 4)), max(1, math.ceil(wide / 4))
        layers += [nn.Flatten(), nn.Linear(math.prod(feature_shape), width * h * w), nn.ReLU(),
                   nn.Unflatten(1, (width, h, w))]
        c = width
    if h * 2 <= height and w * 2 <= wide:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
        while h * 2 <= height and w * 2 <= wide:
            layers += [nn.ConvTranspose2d(c, max(c // 2, 16), 4, stride=2, padding=1), nn.ReLU()]
            c, h, w = max(c // 2, 16), h * 2, w * 2
    gap = height - h
    if (h, w) == (height, wide):
        layers += [nn.Conv2d(c, fine, 3, padding=1), nn.ReLU()]
    elif 0 < gap <= 8 and wide - w == gap:
        layers += [nn.ConvTranspose2d(c, fine, gap + 1), nn.ReLU()]
    else:
        layers += [nn.Upsample(size=(height, wide), mode="bilinear", align_corners=False),
                   nn.Conv2d(c, fine, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(fine, channels, 3, padding=1))
    return nn.Sequential(*layers)


def dense_width(aux_images: int, widest: int = 1024) -> int:
    """Hidden units of the dense decoder for an attacker with ``aux_images`` images.

    The power of two nearest the number of images, between 64 and ``widest``: a decoder with far more
    weights than its training pairs memorises them. Sets of 725 images or more get the full width.
    """
    return int(min(widest, max(64, 2 ** round(math.log2(max(aux_images, 1))))))


def wants_dense_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> bool:
    """Whether a feature gets the dense decoder: flat, or a map at a third of the image's resolution or less of an
    image of at most :data:`DENSE_MAX_IMAGE` values; and at most :data:`DENSE_MAX_FEATURES` values."""
    coarse = len(feature_shape) != 3 or (
        feature_shape[1] * 3 <= image_shape[1] and feature_shape[2] * 3 <= image_shape[2]
        and math.prod(image_shape) <= DENSE_MAX_IMAGE
    )
    return coarse and math.prod(feature_shape) <= DENSE_MAX_FEATURES


def standardize_dims(feature_shape: tuple[int, ...], decoder: nn.Module) -> tuple[int, ...]:
    """The dimensions ``decoder``'s input is standardised over: ``(0, 2, 3)``, one scale per channel, for a
    feature map whose decoder starts with a convolution (it shares its weights across positions, and per
    value near-constant border positions would be blown up); else ``(0,)``, one scale per feature value (a
    fully connected decoder, or a flat feature)."""
    first = next((m for m in decoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))), None)
    per_channel = len(feature_shape) == 3 and isinstance(first, (nn.Conv2d, nn.ConvTranspose2d))
    return (0, 2, 3) if per_channel else (0,)


class Standardize(nn.Module):
    """``(z − mean) / std`` for features ``z`` [N, ...], with the statistics taken over ``dims``.

    With ``reference`` features the statistics are fixed from them (an attacker's query set); without,
    each batch is standardised by its own statistics, with gradients through them, like batch norm
    without its affine part (an online adversary, whose inputs drift while the model trains). Either way
    a decoder behind it cannot be fooled by the feature's scale.
    """

    def __init__(self, dims: tuple[int, ...] = (0,), reference: torch.Tensor | None = None):
        super().__init__()
        self.dims = tuple(dims)
        self.register_buffer("mean", None if reference is None else reference.mean(self.dims, keepdim=True)[0])
        self.register_buffer("std", None if reference is None else self._floored_std(reference))

    def _floored_std(self, z: torch.Tensor) -> torch.Tensor:
        std = z.std(self.dims, keepdim=True, correction=0)[0]
        # Values that never vary (dead ReLUs) must not be blown up by a zero std.
        floor = max(1e-3 * std.detach().mean().item(), 1e-12)
        return std.clamp_min(floor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return (z - z.mean(self.dims, keepdim=True)) / self._floored_std(z)
        return (z - self.mean) / self.std


def dense_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], hidden: int = 1024) -> nn.Module:
    """A fully connected decoder: flatten, two ReLU layers of ``hidden`` units, a linear map to the image."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(feature_shape), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, math.prod(image_shape)), nn.Unflatten(1, tuple(image_shape)),
    )
