"""What a cut sends: bytes per image on the wire, and the task accuracy on what the cloud decodes.

Each image is one frame of the runtime's codec (:mod:`splitshield.runtime.codec`), a feature [1, ...] as an
edge client with ``batch_size=1`` sends it: header included, 8-bit frames quantised over their own image's
range. float32 and float16 frames have a size fixed by the shape; 8-bit + zstd frames are encoded from real
features and their sizes averaged. The accuracy is the tail's on the values those frames decode to.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from .._quantize import fake_quantize
from ..runtime.codec import CodecOptions, encode

#: Largest magnitude a float16 frame carries.
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
#: Images per chunk through the head and the tail.
CHUNK = 256
#: Images whose 8-bit frames are encoded to measure their mean size.
FRAMES = 100


def eight_bit_options() -> tuple[CodecOptions, str]:
    """The 8-bit wire format and its label: uint8 + zstd, or uint8 alone when ``zstandard`` is not installed."""
    if importlib.util.find_spec("zstandard") is not None:
        return CodecOptions("uint8", "zstd"), "8-bit + zstd"
    return CodecOptions("uint8"), "8-bit (zstandard not installed: pip install 'splitshield[serve]')"


@dataclass(frozen=True)
class WireCost:
    """Bytes per image on the wire (frames with their headers) and the task accuracy on decoded 8-bit features.

    Attributes
    ----------
    bytes_float32, bytes_float16:
        Frame size per image; float16 is ``None`` when a feature exceeds float16's range.
    bytes_8bit:
        Mean frame size per image, 8-bit (+ zstd) coded, over the measured images; ``None`` without images.
    accuracy_8bit:
        Top-1 accuracy in [0, 1] of the tail on the decoded 8-bit features; ``None`` without labels.
    """

    bytes_float32: int
    bytes_float16: int | None
    bytes_8bit: float | None
    accuracy_8bit: float | None


@torch.no_grad()
def wire_cost(feature_shape: tuple[int, ...], z: torch.Tensor | None = None, tail: nn.Module | None = None,
              labels: torch.Tensor | None = None, options: CodecOptions | None = None,
              frames: int = FRAMES) -> WireCost:
    """The :class:`WireCost` of a cut.

    Parameters
    ----------
    feature_shape:
        Shape of one feature (without batch).
    z:
        Real features [N, *feature_shape]; ``None``: sizes from the shape only.
    tail, labels:
        The cut's tail (in eval mode) and the labels [N] of ``z``'s images, for the accuracy on decoded 8-bit
        features; ``None``: no accuracy.
    options:
        The 8-bit wire format (default :func:`eight_bit_options`).
    frames:
        The 8-bit frame size is the mean over the first ``frames`` images.
    """
    options = options or eight_bit_options()[0]
    zero = torch.zeros(1, *feature_shape)
    float32, float16 = len(encode(zero)), len(encode(zero, CodecOptions("float16")))
    if z is None:
        return WireCost(float32, float16, None, None)
    z = z.detach().float()
    sizes = [len(encode(z[i : i + 1], options)) for i in range(min(frames, len(z)))]
    accuracy = None
    if tail is not None and labels is not None:
        # What the cloud decodes from one 8-bit frame per image: the codec quantises with this same function.
        decoded = fake_quantize(z, 8, per_sample=True)
        logits = torch.cat([tail(chunk) for chunk in decoded.split(CHUNK)])
        accuracy = float((logits.argmax(1) == labels.to(logits.device)).double().mean())
    return WireCost(float32, float16 if bool(z.abs().max() <= FLOAT16_MAX) else None, sum(sizes) / len(sizes),
                    accuracy)
