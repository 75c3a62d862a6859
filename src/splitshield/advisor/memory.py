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
#: Bytes per pixel of a test image, and per value of its features at the cut, that stay while the fast attacks run
#: (float32; the other copies above are freed by then).
RESIDENT_BYTES_PER_VALUE = (4, 4)
#: Bytes per pixel of an auxiliary image of the fast inverse network (the uint8 subset and its float32 copy), and
#: per value of its features (float32, twice while the queried chunks are joined); keyed by the attack's ``refit``,
#: which copies the images and features once more into training and held-out ones (the features' copy fits in
#: what their join needed).
AUX_BYTES_PER_VALUE = {False: (5, 8), True: (9, 8)}
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
                 free: int | None, aux_images: int = 0, refit: bool = False) -> None:
    """``ConfigError`` when ``advise``'s peak at the widest of ``points`` would take more than :data:`USABLE` of
    ``free`` bytes (:func:`free_memory`; ``None``: unknown, no check), naming how many images fit.

    Two peaks, one after the other: ``images`` test images of ``shape`` (C, H, W) with their features and every
    copy the wire and the statistics make; then, while the fast inverse network trains, the test images and
    features that stay plus its ``aux_images`` auxiliary images and their features (copied once more with
    ``refit``).
    """
    if free is None:
        return
    widest = max(points, key=lambda p: math.prod(p.feature_shape))
    pixels, values = math.prod(shape), math.prod(widest.feature_shape)

    def per(bytes_per_value: tuple[int, int]) -> int:
        return bytes_per_value[0] * pixels + bytes_per_value[1] * values

    per_image, resident = per(BYTES_PER_VALUE[statistics]), per(RESIDENT_BYTES_PER_VALUE)
    aux = per(AUX_BYTES_PER_VALUE[refit])
    usable = USABLE * free
    need = max(images * per_image, images * resident + aux_images * aux)
    if need <= usable:
        return
    fit = min(int(usable / per_image), int((usable - aux_images * aux) / resident))
    if fit >= 2:
        fix = f"pass images={fit} or fewer (--images)"
    elif usable >= 2 * per_image and (aux_fit := int((usable - 2 * resident) / aux)) >= 1:
        fix = (f"the inverse network's auxiliary images fill it: pass fast=FastAttack(aux_images={aux_fit}) or fewer, "
               "or run the white-box attack alone (--threats white_box), or score deeper cuts only (--points)")
    else:
        fix = "free memory, or score deeper cuts only (--points)"
    held = f" and {aux_images} auxiliary image{'s' if aux_images != 1 else ''}" if aux_images else ""
    raise ConfigError(f"images: {images} test images{held} would take about {_size(need)} at {widest.name} "
                      f"({'×'.join(map(str, widest.feature_shape))} per image) and {_size(free)} are free; {fix}")
