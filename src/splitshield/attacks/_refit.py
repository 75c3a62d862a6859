"""Closed-form refit of a decoder's last linear layer: ridge regression of the images on that layer's inputs.

A decoder's last layer (``Linear``, or a stride-1 ``Conv2d`` / ``ConvTranspose2d``) is linear in its weights,
so given the activations that feed it, the weights that minimise the squared reconstruction error solve a
least-squares problem exactly. Gradient descent only approaches that optimum, and can stay far from it: He et
al.'s decoder at ``conv11`` is a single 3×3 transposed convolution, where Adam ends tens of dB short of the
least-squares fit. A convolution is a linear map of each output position's input patch, so its rows are the
unfolded patches (``F.unfold``) and its unknowns the kernel (plus bias) shared by every position.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Design rows (output positions of the last layer, over images) the normal equations are accumulated over.
MAX_ROWS = 250_000
#: Values of the design matrix unfolded at a time: a convolution gives one row per output pixel, so a batch of large
#: images would otherwise unfold into gigabytes.
BATCH_VALUES = 1 << 22

#: Ridge strengths tried, relative to the mean diagonal of the Gram matrix.
RIDGES = (1e-7, 1e-5, 1e-3)

_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


def last_linear_layer(decoder: nn.Module) -> nn.Linear | nn.Conv2d | nn.ConvTranspose2d | None:
    """The layer that produces ``decoder``'s output, when it can be solved in closed form, else ``None``.

    Only an ``nn.Sequential`` whose last weighted module is followed by reshapes alone qualifies: anything
    else after it (an activation, an upsampling) would make the output non-linear in its weights.
    """
    if not isinstance(decoder, nn.Sequential):
        return None
    for module in reversed(list(decoder)):
        if isinstance(module, _RESHAPES):
            continue
        return module if _solvable(module) else None
    return None


def _solvable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, nn.Conv2d):
        return (layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
                and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple))
    if isinstance(layer, nn.ConvTranspose2d):
        return (layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
                and layer.output_padding == (0, 0))
    return False


def _rows(layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The design rows [R, D] (with a trailing 1 when the layer has a bias) and targets [R, C_out] of
    ``layer``, from its inputs and the outputs it should produce."""
    if isinstance(layer, nn.Linear):  # one row per input vector: per image, or per position of a longer input
        x, y = inputs.reshape(-1, layer.in_features), outputs.reshape(-1, layer.out_features)
    else:
        kernel = layer.kernel_size
        # A stride-1 transposed convolution is the convolution with the flipped kernel and padding k − 1 − p.
        padding = layer.padding
        if isinstance(layer, nn.ConvTranspose2d):
            padding = tuple(k - 1 - p for k, p in zip(kernel, layer.padding, strict=True))
        x = F.unfold(inputs, kernel, padding=padding).transpose(1, 2).flatten(0, 1)
        y = outputs.flatten(2).transpose(1, 2).flatten(0, 1)
    if layer.bias is not None:
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    return x, y


def _set_weights(layer: nn.Module, solution: torch.Tensor) -> None:
    """Write the solution [D (+ 1 for the bias), C_out] of the normal equations into ``layer``."""
    weight, bias = (solution[:-1].T, solution[-1]) if layer.bias is not None else (solution.T, None)
    if isinstance(layer, nn.Conv2d):
        weight = weight.reshape(layer.weight.shape)
    elif isinstance(layer, nn.ConvTranspose2d):
        c_in, c_out, kh, kw = layer.weight.shape
        weight = weight.reshape(c_out, c_in, kh, kw).flip(2, 3).transpose(0, 1)
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def normal_equations(decode: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module, features: torch.Tensor,
                     images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(XᵀX, XᵀY)`` in float64 for ``layer``'s inputs X when ``decode`` (which runs ``layer`` last) runs on
    ``features`` [N, ...], and the ``images`` [N, C, H, W] as targets Y; over the first images that give at
    most :data:`MAX_ROWS` rows. Batches of at most ``batch_size`` images and :data:`BATCH_VALUES` design values (at
    least one image) move to the layer's device one at a time."""
    device = layer.weight.device
    linear = isinstance(layer, nn.Linear)
    # Only reshapes follow the layer: its output per image holds the image's values, one row per output vector.
    rows_per_image = images[0].numel() // (layer.out_features if linear else layer.out_channels)
    per_row = layer.in_features if linear else layer.in_channels * math.prod(layer.kernel_size)
    per_row += layer.bias is not None
    batch_size = max(1, min(batch_size, BATCH_VALUES // (rows_per_image * per_row)))
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, out: captured.append((args[0], out.shape)))
    gram = rhs = None
    rows = 0
    try:
        with torch.no_grad():
            for i in range(0, len(features), batch_size):
                captured.clear()
                decode(features[i : i + batch_size].to(device))
                inputs, shape = captured[0]
                x, y = _rows(layer, inputs, images[i : i + batch_size].to(device).reshape(shape))
                x, y = x.double(), y.double()
                gram = x.T @ x if gram is None else gram + x.T @ x
                rhs = x.T @ y if rhs is None else rhs + x.T @ y
                rows += len(x)
                if rows >= MAX_ROWS:
                    break
    finally:
        handle.remove()
    return gram, rhs


def refit_last_layer(decode: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module,
                     train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                     error: Callable[[], float]) -> float | None:
    """Refit ``layer``, which ``decode`` runs last, by ridge regression on the ``train`` (features, images),
    choosing the ridge by ``error()`` — the reconstruction error on the ``held_out`` images — and keeping the
    layer as it was if no refit beats it there. The chosen refit is then solved again on train and held-out
    images together. Returns the chosen relative ridge strength, or ``None`` when the layer was kept."""
    gram, rhs = normal_equations(decode, layer, *train)
    gram_out, rhs_out = normal_equations(decode, layer, *held_out)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    best_error, best = error(), None
    for ridge in RIDGES:
        _set_weights(layer, _solve(gram, rhs, ridge))
        candidate = error()
        if candidate < best_error:
            best_error, best = candidate, ridge
    if best is None:
        layer.load_state_dict(original)
    else:
        _set_weights(layer, _solve(gram + gram_out, rhs + rhs_out, best))
    return best


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    damping = (ridge * gram.diagonal().mean()).clamp_min(1e-12)  # an all-zero input still solves
    eye = torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + damping * eye, rhs)
