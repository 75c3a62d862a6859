"""Training-time augmentation of image batches, drawn per image from torch's global RNG (the trainer seeds it).

``he2019`` is He et al.'s CIFAR-10 augmentation (their ``training.py``): a horizontal flip with probability ½,
then torchvision's ``RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))`` — a rotation by
U(−10°, 10°), a shift by U(−0.1, 0.1) of the width and of the height and a zoom by U(0.9, 1.1) about the
centre, nearest-neighbour sampled, pixels from outside the image black — here one draw per image on the
whole batch at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The augmentations :func:`augment` knows.
AUGMENTATIONS = ("none", "he2019")


def augment(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Images ``x`` [B, C, H, W] in [0, 1] augmented by ``kind`` (one of :data:`AUGMENTATIONS`)."""
    if kind == "none":
        return x
    if kind != "he2019":
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return random_affine(x, degrees=10.0, translate=0.1, scale=(0.9, 1.1))


def random_affine(x: torch.Tensor, *, degrees: float, translate: float,
                  scale: tuple[float, float]) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] rotated by U(−degrees, degrees), shifted by U(−translate, translate) of
    its size and zoomed by U(*scale) about its centre (:func:`affine`)."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, device=x.device) * 2 - 1) * degrees
    zoom = scale[0] + torch.rand(b, device=x.device) * (scale[1] - scale[0])
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * translate * torch.tensor([w, h], device=x.device)
    return affine(x, angle, zoom, shift)


def affine(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Images ``x`` [B, C, H, W] each rotated counter-clockwise by ``angle`` [B] degrees and zoomed by ``zoom`` [B]
    about the centre, then shifted by ``shift`` [B, 2] pixels (right, down): torchvision's ``affine`` without
    shear, nearest-neighbour, zeros outside."""
    _, _, h, w = x.shape
    radians = torch.deg2rad(angle)
    # affine_grid wants the inverse map (output -> input) in coordinates normalised to [-1, 1] per axis; build
    # it in pixels about the centre (y pointing down), where a rotation is a rotation, then rescale each axis.
    cos, sin = torch.cos(radians) / zoom, torch.sin(radians) / zoom
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # [B, 2, 2]
    offset = -(inverse @ shift.to(x).unsqueeze(-1)).squeeze(-1)  # [B, 2], pixels
    to_unit = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
    theta = torch.empty(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, :, :2] = inverse * to_unit.view(1, 2, 1) / to_unit.view(1, 1, 2)
    theta[:, :, 2] = offset * to_unit
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
