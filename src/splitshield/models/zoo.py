"""Target networks of the papers we measure against, plus any torchvision classifier by name.

Every zoo model takes images in [0, 1] and normalises them in its first layer (``normalize``), so the
whole pipeline — attacks, metrics, the wire — speaks pixel space. Layer names are the papers' names,
so the papers' split points (``conv1``, ``ReLU2``, ``conv11``, ``ReLU22``, ``ReLU32``) are legal points.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError

MNIST_MEAN, MNIST_STD = (0.5,), (0.5,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on NCHW images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """He et al.'s MNIST LeNet (ALGORITHMS §A.1): input 1×28×28, ``ReLU2`` feature 16×8×8."""
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(MNIST_MEAN * in_channels, MNIST_STD * in_channels),
            conv1=nn.Conv2d(in_channels, 8, 5),
            ReLU1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 5),
            ReLU2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(256, 120),
            fc1act=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            fc2act=nn.ReLU(),
            fc3=nn.Linear(84, num_classes),
        )
    )


def cifar_cnn(num_classes: int = 10) -> nn.Sequential:
    """He et al.'s CIFAR-10 "6 conv + 2 fc" network (``CIFAR10CNN``), ImageNet normalisation."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD))
    channels = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
    for i, (cin, cout) in enumerate(channels):
        block, conv = i // 2 + 1, i % 2 + 1
        layers[f"conv{block}{conv}"] = nn.Conv2d(cin, cout, 3, padding=1)
        layers[f"ReLU{block}{conv}"] = nn.ReLU()
        if conv == 2:
            layers[f"pool{block}"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(128 * 4 * 4, 512)
    layers["fc1act"] = nn.Sigmoid()
    layers["fc2"] = nn.Linear(512, num_classes)
    return nn.Sequential(layers)


def vgg11_bottleneck(num_classes: int = 10, in_channels: int = 3, bottleneck: int = 8,
                     cloud_width: float = 1.0) -> nn.Sequential:
    """CEM's ``vgg11_bn_sgm`` at ``cutlayer=4`` (ALGORITHMS §B.3): a sigmoid-bounded 8-channel bottleneck.

    Edge: conv-BN-ReLU 64, pool, conv-BN-ReLU 128, pool, conv3×3 128→``bottleneck``, sigmoid
    (split point ``sigmoid``; feature ``bottleneck``×H/4×W/4 in (0, 1)). Cloud: conv 8→128 without ReLU,
    the rest of VGG-11 config A with BN, and a 3-layer classifier with dropout.

    ``cloud_width`` scales every cloud width (conv channels and classifier units); the edge head is CEM's
    whatever it is. The cloud holds about 90 % of the multiply-adds, so ``vgg11-bottleneck-slim``
    (``cloud_width=0.25``) trains about 3.4× faster on one CPU thread (``benchmarks/results/README.md``),
    with the identical head to attack.
    """
    if not 0 < cloud_width <= 1:
        raise ConfigError(f"cloud_width must be in (0, 1], got {cloud_width!r}")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else (MNIST_MEAN, MNIST_STD)
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=Normalize(mean, std))

    def conv_bn_relu(name: str, cin: int, cout: int) -> None:
        layers[f"{name}"] = nn.Conv2d(cin, cout, 3, padding=1)
        layers[f"{name}_bn"] = nn.BatchNorm2d(cout)
        layers[f"{name}_relu"] = nn.ReLU()

    def width(channels: int) -> int:  # a cloud width
        return max(1, round(channels * cloud_width))

    conv_bn_relu("conv1", in_channels, 64)
    layers["pool1"] = nn.MaxPool2d(2)
    conv_bn_relu("conv2", 64, 128)
    layers["pool2"] = nn.MaxPool2d(2)
    layers["bottleneck"] = nn.Conv2d(128, bottleneck, 3, padding=1)
    layers["sigmoid"] = nn.Sigmoid()
    cin = width(128)
    layers["expand"] = nn.Conv2d(bottleneck, cin, 3, padding=1)
    for i, cfg in enumerate([256, 256, "M", 512, 512, "M", 512, 512, "M"]):
        if cfg == "M":
            # ceil_mode: a 28×28 input reaches 7×7 here and must still pool down to 1×1 (same as floor for 32×32).
            layers[f"pool{i + 3}"] = nn.MaxPool2d(2, ceil_mode=True)
        else:
            cout = width(int(cfg))
            conv_bn_relu(f"conv{i + 3}", cin, cout)
            cin = cout
    hidden = width(512)
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["drop1"] = nn.Dropout()
    layers["fc1"] = nn.Linear(cin, hidden)
    layers["fc1act"] = nn.ReLU()
    layers["drop2"] = nn.Dropout()
    layers["fc2"] = nn.Linear(hidden, hidden)
    layers["fc2act"] = nn.ReLU()
    layers["fc3"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(layers)


def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Any torchvision classifier by name, randomly initialised (weights are never downloaded here)."""
    import torchvision

    builders = _torchvision_names()
    if name not in builders:
        raise ConfigError(f"model: unknown torchvision model {name!r}; known: {', '.join(sorted(builders))}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        raise ConfigError(f"model: torchvision models take 3-channel images, got in_channels={in_channels}")
    return model


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": lenet,
    "cifar-cnn": cifar_cnn,
    "vgg11-bottleneck": vgg11_bottleneck,
    "vgg11-bottleneck-slim": partial(vgg11_bottleneck, cloud_width=0.25),
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, seed: int | None = 0) -> nn.Module:
    """Build a zoo model (a name in :data:`MODELS`) or a torchvision one by name.

    ``seed`` fixes the random initialisation (``None``: torch's global RNG). The model carries
    ``model_spec`` (the architecture arguments), which :func:`~splitshield.split` passes on so a
    checkpoint can rebuild the architecture.
    """
    if seed is None:
        model = _build(name, num_classes, in_channels)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(name, num_classes, in_channels)
    model.model_spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels}
    return model


def _build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if name in MODELS:
        builder = MODELS[name]
        if builder is cifar_cnn:
            if in_channels != 3:
                raise ConfigError("model: cifar-cnn takes 3-channel 32×32 images; use lenet for grey images")
            return builder(num_classes=num_classes)
        return builder(num_classes=num_classes, in_channels=in_channels)
    if name in _torchvision_names():
        return torchvision_model(name, num_classes=num_classes, in_channels=in_channels)
    raise ConfigError(
        f"model: unknown model {name!r}; zoo models: {', '.join(MODELS)}, or any torchvision classifier name"
    )
