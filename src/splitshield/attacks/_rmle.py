"""Regularised maximum-likelihood inversion (He et al. 2019, Algorithm 1), batched.

Shared by the white-box attack (against the real head) and the query-free attack (against a shadow
head). Each image's loss is summed over the batch, never averaged: with Adam's large ``eps`` a batch
mean would shrink every gradient by the batch size and silently weaken the attack (ALGORITHMS §F.4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic squared TV (β = 2), each direction averaged over its elements: [B]."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


def rmle(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, input_shape: tuple[int, ...], *,
         iters: int, lr: float, tv: float, l2: float, init: float = 0.5, eps: float = 1e-3,
         progress: bool = False, desc: str = "rMLE") -> torch.Tensor:
    """Find x in [0, 1] minimising ``mean((forward(x) - z)²) + tv·TV(x) + l2·mean((x - init)²)``.

    Parameters
    ----------
    forward:
        Differentiable map images [B, C, H, W] -> features shaped like ``z``.
    z:
        Target features [B, ...].
    input_shape:
        (C, H, W) of the images to recover.
    iters, lr, eps:
        Adam (amsgrad) steps, step size and epsilon. x is projected onto [0, 1] after every step.
    tv, l2:
        Weights of the total-variation prior and of the pull towards the grey start ``init``.

    Images whose feature loss has no gradient at the grey start (a head whose ReLUs are all off there,
    as NoPeek can train) would never move: they restart from uniform noise (seeded, so runs repeat).

    Returns
    -------
    Reconstructions [B, C, H, W] in [0, 1].
    """
    z = z.detach()
    x = torch.full((z.shape[0], *input_shape), init, device=z.device, requires_grad=True)
    _restart_dead_starts(forward, z, x)
    opt = torch.optim.Adam([x], lr=lr, eps=eps, amsgrad=True)
    for _ in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
        feature_loss = (forward(x) - z).pow(2).flatten(1).mean(1)
        loss = feature_loss
        if tv:
            loss = loss + tv * total_variation(x)
        if l2:
            loss = loss + l2 * (x - init).pow(2).flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    return x.detach()


def _restart_dead_starts(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, x: torch.Tensor) -> None:
    """Re-draw, uniformly in [0, 1], the start of every image whose feature loss has a zero gradient."""
    with torch.enable_grad():
        loss = (forward(x) - z).pow(2).flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    dead = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if grad is None else (
        grad.flatten(1).abs().amax(1) == 0)
    if dead.any():
        g = torch.Generator(device=x.device).manual_seed(0)
        with torch.no_grad():
            x[dead] = torch.rand(x[dead].shape, generator=g, device=x.device, dtype=x.dtype)
