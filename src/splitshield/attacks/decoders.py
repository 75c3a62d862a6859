"""Decoder architectures for the inverse-network attack, built from feature and image shapes.

He et al. pick a decoder per split point by hand (ALGORITHMS §A.3); :func:`build_decoder` does the same
for any split: convolutional features are mapped by a 3×3 conv, upsampled by transposed convolutions
while the size can double, resized to the image's exact size, and refined by two convolutions;
flat features first go through a linear layer to a quarter-resolution map. The output is unbounded
(trained with MSE, clamped to [0, 1] at use), as in the authors' code.
"""

from __future__ import annotations

import math

from torch import nn


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


def build_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], width: int = 64) -> nn.Module:
    """A decoder from features of ``feature_shape`` to images of ``image_shape`` (C, H, W).

    ``width`` channels at low resolution, halved (at least 32) once the map reaches the image size.
    """
    channels, height, wide = image_shape
    layers: list[nn.Module] = []
    if len(feature_shape) == 3:
        cin, h, w = feature_shape
    else:
        dim = math.prod(feature_shape)
        h, w = max(1, math.ceil(height / 4)), max(1, math.ceil(wide / 4))
        layers += [nn.Flatten(), nn.Linear(dim, width * h * w), nn.ReLU(), nn.Unflatten(1, (width, h, w))]
        cin = width
    layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
    while h * 2 <= height and w * 2 <= wide:
        layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
        h, w = h * 2, w * 2
    if (h, w) != (height, wide):
        layers.append(nn.Upsample(size=(height, wide), mode="bilinear", align_corners=False))
    fine = max(32, width // 2)
    layers += [nn.Conv2d(width, fine, 3, padding=1), nn.ReLU(), nn.Conv2d(fine, fine, 3, padding=1), nn.ReLU(),
               nn.Conv2d(fine, channels, 3, padding=1)]
    return nn.Sequential(*layers)
