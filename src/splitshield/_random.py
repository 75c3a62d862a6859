"""One way to draw reproducibly from torch's global RNG without disturbing the caller's draws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block on a copy of the global RNG seeded with ``seed``; the caller's RNG state is left as it was.

    For code that can only draw from the global RNG: ``nn.Module`` initialisation, a defense's noise. ``None``
    runs the block on the caller's RNG as it is (no copy, no seed).
    """
    if seed is None:
        yield
        return
    # CUDA's generators too once CUDA is in use, without initialising it on a CPU-only run.
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
