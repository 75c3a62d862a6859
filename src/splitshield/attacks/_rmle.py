"""Regularised maximum-likelihood inversion (He et al. 2019, Algorithm 1), batched.

Shared by the white-box attack (against the real head), the query-free attack and model reconstruction
(against a stand-in head) and UnSplit (against a clone of the head it fits in turn, warm-started). Each
image's loss is summed over the batch, never averaged: with Adam's large ``eps`` a batch mean would shrink
every gradient by the batch size and silently weaken the attack (ALGORITHMS §F.4).
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
         iters: int, lr: float | torch.Tensor, tv: float | torch.Tensor, l2: float | torch.Tensor, init: float = 0.5,
         start: torch.Tensor | None = None, eps: float = 1e-3,
         normalised: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False,
         desc: str = "rMLE") -> torch.Tensor:
    """Find x in [0, 1] minimising ``mean((forward(x) - z)²) + tv·TV(x) + l2·mean((x - init)²)`` (with
    ``normalised``, the same objective of u = (x − m)/s, the L2 term towards u = 0).

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
        Weights of the total-variation prior and of the pull towards the grey level ``init``.
    init, start:
        The optimisation starts from the grey image ``init``, or from the images ``start`` [B, C, H, W] in
        [0, 1] when given (a warm start, used as given: no restart below).
    normalised:
        ``(m, s)``, per-channel tensors [C]: optimise u = (x − m)/s instead of x, as He et al.'s code does.
        Adam steps in u, TV and the L2 term act on u, the L2 term pulls towards u = 0 and the start is u = 0
        (x = m; ``init`` is unused), or ``start`` (pixels, mapped to u). u is projected every step onto the box
        that maps to x in [0, 1]; a dead start (below) restarts uniformly in that box.

    ``lr``, ``tv`` and ``l2`` are each a number or a tensor [B] of one value per image, so that one
    batched run optimises several settings side by side (rows with one ``lr`` share an Adam parameter
    group; Adam acts element-wise, so each row's optimisation is the one it would have alone).

    Images whose feature loss has no gradient at the start, grey or x = m (a head whose ReLUs are all off
    there, as NoPeek can train), would never move: they restart from uniform noise (seeded, so runs repeat).

    Returns
    -------
    Reconstructions [B, C, H, W] in [0, 1].
    """
    z = z.detach()
    rows = z.shape[0]
    tv, l2 = _per_row(tv, rows, z), _per_row(l2, rows, z)
    # x is the optimised variable; with ``normalised`` it is u, and the box [lo, hi] maps to [0, 1].
    send, lo, hi = forward, 0.0, 1.0
    if normalised is not None:
        m, s = (t.to(device=z.device, dtype=torch.get_default_dtype()).view(1, -1, 1, 1) for t in normalised)
        send, lo, hi, init = _from_normalised(forward, m, s), -m / s, (1 - m) / s, 0.0
        start = None if start is None else (start - m) / s
    if start is None:
        start = torch.full((rows, *input_shape), init, device=z.device, requires_grad=True)
        _restart_dead_starts(send, z, start, lo, hi)
    else:
        start = start.detach().clone().requires_grad_(True)
    if isinstance(lr, torch.Tensor):
        rates, group = torch.unique(lr.detach().to("cpu", torch.float64), return_inverse=True)
        indices = [(group == g).nonzero().flatten().to(z.device) for g in range(len(rates))]
        parts = [start.detach()[i].clone().requires_grad_(True) for i in indices]
        groups = [{"params": [part], "lr": float(rate)} for part, rate in zip(parts, rates, strict=True)]
        order = torch.cat(indices).argsort()
    else:
        parts = [start]
        groups = [{"params": parts, "lr": lr}]
        order = None
    opt = torch.optim.Adam(groups, eps=eps, amsgrad=True)

    def assemble() -> torch.Tensor:
        return parts[0] if order is None else torch.cat(parts)[order]

    for _ in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
        x = assemble()
        loss = (send(x) - z).pow(2).flatten(1).mean(1)
        if tv is not None:
            loss = loss + tv * total_variation(x)
        if l2 is not None:
            loss = loss + l2 * (x - init).pow(2).flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            for part in parts:
                part.clamp_(lo, hi)
    x = assemble().detach()
    return x if normalised is None else (x * s + m).clamp(0.0, 1.0)


def _from_normalised(forward: Callable[[torch.Tensor], torch.Tensor], m: torch.Tensor,
                     s: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` of images given normalised, u = (x − m)/s."""
    return lambda u: forward(u * s + m)


def _per_row(weight: float | torch.Tensor, rows: int, like: torch.Tensor) -> float | torch.Tensor | None:
    """A loss weight as a number or a tensor [rows]; ``None`` when it is zero for every row (term skipped)."""
    if not isinstance(weight, torch.Tensor):
        return weight or None
    if weight.shape != (rows,):
        raise ValueError(f"a per-image weight must have shape [{rows}], got {list(weight.shape)}")
    return weight.to(like) if bool(weight.any()) else None


def _restart_dead_starts(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, x: torch.Tensor,
                         lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
    """Re-draw, uniformly in the box [lo, hi], the start of every image whose feature loss has a zero gradient."""
    with torch.enable_grad():
        loss = (forward(x) - z).pow(2).flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    dead = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if grad is None else (
        grad.flatten(1).abs().amax(1) == 0)
    if dead.any():
        g = torch.Generator(device=x.device).manual_seed(0)
        with torch.no_grad():
            x[dead] = lo + (hi - lo) * torch.rand(x[dead].shape, generator=g, device=x.device, dtype=x.dtype)
