"""Stand-in heads: what an attacker builds and trains in place of the device's head it does not hold.

The query-free attack trains one through the cloud's tail (:mod:`.query_free`), model reconstruction on the
device's answers to queries (:mod:`.model_reconstruction`); both then run rMLE against it. A stand-in has the
head's architecture where the attacker knows it, another one built from the shapes alone, He et al.'s "diff
net" at their split points, or any module the user gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError


def _he2019_lenet(in_channels: int, point: str) -> nn.Sequential:
    # Two unpadded 3×3 convolutions in place of each 5×5 one (same receptive field and output size), with no
    # activation between them. At ReLU2 their net also has no ReLU before the pooling, and 16 channels from the
    # second convolution on.
    if point == "conv1":
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.Conv2d(8, 8, 3))
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.Conv2d(8, 16, 3), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.ReLU())


def _he2019_cifar(in_channels: int, point: str) -> nn.Sequential:
    if point == "conv11":
        return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.Conv2d(16, 64, 3, padding=1))
    # One 5×5 convolution per block of the head's two 3×3 ones, then its pooling.
    layers: list[nn.Module] = []
    channels = in_channels
    for block, width in enumerate((64, 128) if point == "ReLU22" else (64, 128, 128)):
        layers += [*([nn.MaxPool2d(2)] if block else []), nn.Conv2d(channels, width, 5, padding=2), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers)


#: He et al.'s "diff net" shadow heads (their Table 5; the layer lists of their code's ``*AlternativeXArchi2``
#: classes, ALGORITHMS §A.4) per split point of their LeNet and CIFAR-10 network, each a builder of the input's
#: channel count. Without the head's input normalisation: the first convolution's weights and bias absorb it
#: (exactly for the unpadded LeNet convolutions; up to the zero padding at the borders of the CIFAR ones).
HE2019_DIFFERENT_HEADS: dict[str, Callable[[int], nn.Sequential]] = {
    **{point: partial(_he2019_lenet, point=point) for point in ("conv1", "ReLU2")},
    **{point: partial(_he2019_cifar, point=point) for point in ("conv11", "ReLU22", "ReLU32")},
}


def he2019_different_head(point: str, input_shape: tuple[int, int, int],
                          feature_shape: tuple[int, ...]) -> nn.Sequential:
    """He et al.'s "diff net" for ``point`` (:data:`HE2019_DIFFERENT_HEADS`); ``ConfigError`` for a point they
    have none for, or when it does not map ``input_shape`` to ``feature_shape`` (another model's point)."""
    if point not in HE2019_DIFFERENT_HEADS:
        raise ConfigError(f"shadow 'he2019': He et al. give a diff net for {', '.join(HE2019_DIFFERENT_HEADS)}, "
                          f"not for split point {point!r}; use shadow 'different' there")
    head = HE2019_DIFFERENT_HEADS[point](input_shape[0])
    with torch.no_grad():
        shape = tuple(head(torch.zeros(1, *input_shape)).shape[1:])
    if shape != tuple(feature_shape):
        raise ConfigError(f"shadow 'he2019': He et al.'s diff net for {point} maps {tuple(input_shape)} images to "
                          f"{shape}, but this head sends {tuple(feature_shape)} (not their LeNet or CIFAR-10 "
                          "network); use shadow 'different'")
    return head


def different_head(input_shape: tuple[int, int, int], feature_shape: tuple[int, ...],
                   final_activation: type[nn.Module] | None = None, width: int = 32) -> nn.Sequential:
    """A head of another architecture than the device's, built from the shapes alone: images of ``input_shape``
    to features of ``feature_shape``."""
    cin, height, _ = input_shape
    layers: list[nn.Module] = [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
    size = height
    target = feature_shape[1] if len(feature_shape) == 3 else 4
    c = width
    while size >= 2 * target:
        layers += [nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU()]
        size, c = size // 2, 2 * c
    if len(feature_shape) == 3:
        layers += [nn.AdaptiveAvgPool2d(feature_shape[1:]), nn.Conv2d(c, feature_shape[0], 3, padding=1)]
    else:
        layers += [nn.AdaptiveAvgPool2d(target), nn.Flatten(), nn.Linear(c * target * target, feature_shape[0])]
    if final_activation is not None:
        layers.append(final_activation())
    return nn.Sequential(*layers)


def build_stand_in(shadow: str | nn.Module, point: str, input_shape: tuple[int, int, int],
                   feature_shape: tuple[int, ...], final_activation: type[nn.Module] | None,
                   same: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A new, untrained stand-in for the head at ``point``, initialised from the global RNG (the caller seeds it):
    ``"same"`` from ``same`` (the head's architecture, for an attacker who holds it), ``"different"``
    (:func:`different_head`), ``"he2019"`` (:func:`he2019_different_head`), or a copy of the module given."""
    if shadow == "same":
        assert same is not None, "an attacker without the head's architecture refuses shadow 'same' when built"
        return same()
    if shadow == "different":
        return different_head(input_shape, feature_shape, final_activation)
    if shadow == "he2019":
        return he2019_different_head(point, input_shape, feature_shape)
    return copy.deepcopy(shadow)


def train_stand_in(head: nn.Module, batch_loss: Callable[[int, torch.Tensor], torch.Tensor], n: int, *, steps: int,
                   batch_size: int, lr: float, seed: int, desc: str, progress: bool) -> nn.Module:
    """Train ``head`` in place and return it frozen, in eval mode.

    Each of ``steps`` steps draws ``min(batch_size, n)`` indices into the attacker's ``n`` images, with
    replacement, from a generator seeded with ``seed``, and takes an Adam step (amsgrad, eps 1e-3; learning rate
    cosine-decayed from ``lr`` to ``lr / 100``) on ``batch_loss(step, indices)``.
    """
    opt = torch.optim.Adam(head.parameters(), lr=lr, eps=1e-3, amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.01)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(n, (min(batch_size, n),), generator=g)
        loss = batch_loss(step, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head
