"""Whether ``advise``'s test images and features fit in this machine's memory, checked before any work."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..models.split import SplitPoint

#: Bytes held per pixel of a test image, and per value of the widest cut's features: float32 tensors, the features
#: twice (a cut's and the previous cut's) plus the 8-bit codec's float copies; with the statistics, the CE floor's
#: and the GPZ statistic's float64 copies as well.
BYTES_PER_VALUE = {False: (4, 16), True: (12, 24)}
#: Bytes per pixel of an auxiliary image of the fast inverse network, and per value of its features: float32, the
#: features twice while the queried chunks are joined.
AUX_BYTES_PER_VALUE = (4, 8)
#: The share of the free memory advise may plan to fill (the decoders' weights and Python need the rest).
USABLE = 0.8


def free_memory() -> int | None:
    """Bytes this process can still allocate on Linux: MemAvailable, capped by a cgroup (container) limit;
    ``None`` where unknown (other systems)."""
    try:
        with open("/proc/meminfo") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit, used = (cgroup / "memory.max").read_text().strip(), (cgroup / "memory.current").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to respect
    return free


def _size(nbytes: float) -> str:
    """Bytes in words: '25 MB', '9.6 GB'."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def check_memory(shape: Sequence[int], points: Sequence[SplitPoint], images: int, statistics: bool,
                 free: int | None, aux_images: int = 0) -> None:
    """``ConfigError`` when ``images`` test images of ``shape`` (C, H, W) and their features at the widest of
    ``points``, plus the fast inverse network's ``aux_images`` auxiliary images and their features there, would take
    more than :data:`USABLE` of ``free`` bytes (:func:`free_memory`; ``None``: unknown, no check), naming how many
    images fit."""
    if free is None:
        return
    widest = max(points, key=lambda p: math.prod(p.feature_shape))
    pixels, values = math.prod(shape), math.prod(widest.feature_shape)
    pixel, value = BYTES_PER_VALUE[statistics]
    per_image = pixel * pixels + value * values
    aux = aux_images * (AUX_BYTES_PER_VALUE[0] * pixels + AUX_BYTES_PER_VALUE[1] * values)
    if images * per_image + aux <= USABLE * free:
        return
    fit = int((USABLE * free - aux) / per_image)
    if fit >= 2:
        fix = f"pass images={fit} or fewer (--images)"
    elif aux:
        fix = "give the inverse network fewer auxiliary images (FastAttack(aux_images=…)), or score deeper cuts only"
    else:
        fix = "free memory, or score deeper cuts only (--points)"
    held = f" and {aux_images} auxiliary images" if aux else ""
    raise ConfigError(f"images: {images} test images{held} would take about {_size(images * per_image + aux)} at "
                      f"{widest.name} ({'×'.join(map(str, widest.feature_shape))} per image) and {_size(free)} are "
                      f"free; {fix}")
