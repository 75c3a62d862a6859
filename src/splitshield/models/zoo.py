"""Target networks of the papers we measure against, plus any torchvision classifier by name.

Each builder is registered once (:mod:`~splitshield.models.registry`) with its native input shape, the
sizes it takes, its normalisation and the papers' split points; torchvision's classifiers are one family.

Every zoo model takes images in [0, 1] and normalises them in its first layer (``normalize``), so the
whole pipeline — attacks, metrics, the wire — speaks pixel space. Layer names are the papers' names,
so the papers' split points (``conv1``, ``ReLU2``, ``conv11``, ``ReLU22``, ``ReLU32``) are legal points.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import cache, partial
from typing import Any

import torch
from torch import nn

from .._random import seeded
from ..errors import ConfigError
from .registry import get_model_info, register_model

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


_LENET = dict(input_shape=(1, 28, 28), sizes="any H, W ≥ 16; 1 or 3 channels", normalization=(MNIST_MEAN, MNIST_STD))


@register_model("lenet", **_LENET, split_points=("conv1", "ReLU2"))
def lenet(num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28),
          bounded: bool = False) -> nn.Sequential:
    """He et al.'s MNIST LeNet (ALGORITHMS §A.1): input 1×28×28, ``ReLU2`` feature 16×8×8.

    ``image_size`` (H, W) sizes the first linear layer; two 5×5 convolutions and two 2×2 poolings need
    at least 16×16. ``bounded`` puts a sigmoid (``sigmoid2``) in place of ``ReLU2``, so the feature sent from
    that point lies in (0, 1) as CEM's bottleneck does (``lenet-sigmoid``).
    """
    h, w = (((d - 4) // 2 - 4) // 2 for d in _checked_size("lenet", image_size, 16))
    second = ("sigmoid2", nn.Sigmoid()) if bounded else ("ReLU2", nn.ReLU())
    return nn.Sequential(
        OrderedDict(
            normalize=_normalize(in_channels, MNIST_MEAN, MNIST_STD),
            conv1=nn.Conv2d(in_channels, 8, 5),
            ReLU1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 5),
            **dict([second]),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * h * w, 120),
            fc1act=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            fc2act=nn.ReLU(),
            fc3=nn.Linear(84, num_classes),
        )
    )


@register_model("cifar-cnn", input_shape=(3, 32, 32), sizes="any H, W ≥ 8; 1 or 3 channels",
                normalization=(IMAGENET_MEAN, IMAGENET_STD), split_points=("conv11", "ReLU22", "ReLU32"))
def cifar_cnn(num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> nn.Sequential:
    """He et al.'s CIFAR-10 "6 conv + 2 fc" network (``CIFAR10CNN``), ImageNet normalisation.

    ``image_size`` (H, W) sizes the first linear layer; three 2×2 poolings need at least 8×8.
    """
    h, w = (d // 8 for d in _checked_size("cifar-cnn", image_size, 8))
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=_normalize(in_channels, IMAGENET_MEAN, IMAGENET_STD))
    channels = [(in_channels, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
    for i, (cin, cout) in enumerate(channels):
        block, conv = i // 2 + 1, i % 2 + 1
        layers[f"conv{block}{conv}"] = nn.Conv2d(cin, cout, 3, padding=1)
        layers[f"ReLU{block}{conv}"] = nn.ReLU()
        if conv == 2:
            layers[f"pool{block}"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(128 * h * w, 512)
    layers["fc1act"] = nn.Sigmoid()
    layers["fc2"] = nn.Linear(512, num_classes)
    return nn.Sequential(layers)


def _checked_size(model: str, image_size: tuple[int, int], minimum: int) -> tuple[int, int]:
    if len(image_size) != 2 or min(image_size) < minimum:
        raise ConfigError(f"model: {model} takes images of at least {minimum}×{minimum}, got {tuple(image_size)}; "
                          "resize them (ss.conform, or --image-shape) or choose a model for smaller images")
    return tuple(image_size)  # type: ignore[return-value]


def _normalize(in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """The dataset's normalisation for ``in_channels``: grey statistics serve every channel, colour ones
    are averaged for grey images."""
    if in_channels == len(mean):
        return Normalize(mean, std)
    if len(mean) == 1:
        return Normalize(tuple(mean) * in_channels, tuple(std) * in_channels)
    if in_channels == 1:
        return Normalize((sum(mean) / len(mean),), (sum(std) / len(std),))
    raise ConfigError(f"model: in_channels must be 1 or {len(mean)}, got {in_channels}")


_VGG11_BOTTLENECK: dict[str, Any] = {"input_shape": (3, 32, 32), "sizes": "any H, W ≥ 4; 1 or 3 channels",
                     "normalization": (CIFAR_MEAN, CIFAR_STD), "split_points": ("sigmoid",)}


@register_model("vgg11-bottleneck", **_VGG11_BOTTLENECK)
def vgg11_bottleneck(num_classes: int = 10, in_channels: int = 3, bottleneck: int = 8,
                     cloud_width: float = 1.0, image_size: tuple[int, int] = (32, 32)) -> nn.Sequential:
    """CEM's ``vgg11_bn_sgm`` at ``cutlayer=4`` (ALGORITHMS §B.3): a sigmoid-bounded 8-channel bottleneck.

    Edge: conv-BN-ReLU 64, pool, conv-BN-ReLU 128, pool, conv3×3 128→``bottleneck``, sigmoid
    (split point ``sigmoid``; feature ``bottleneck``×H/4×W/4 in (0, 1)). Cloud: conv 8→128 without ReLU,
    the rest of VGG-11 config A with BN, and a 3-layer classifier with dropout.

    ``cloud_width`` scales every cloud width (conv channels and classifier units); the edge head is CEM's
    whatever it is. The cloud holds about 90 % of the multiply-adds, so ``vgg11-bottleneck-slim``
    (``cloud_width=0.25``) trains about 3.4× faster on one CPU thread (``benchmarks/results/README.md``),
    with the identical head to attack.

    The cloud pools globally, so any ``image_size`` (H, W) of at least 4×4 fits the same weights.
    """
    _checked_size("vgg11-bottleneck", image_size, 4)
    if not 0 < cloud_width <= 1:
        raise ConfigError(f"cloud_width must be in (0, 1], got {cloud_width!r}")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else (MNIST_MEAN, MNIST_STD)
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=_normalize(in_channels, mean, std))

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


class _BasicBlock(nn.Module):
    """He et al.'s (2016) CIFAR basic block: conv3×3-BN-ReLU-conv3×3-BN plus the shortcut, then ReLU.

    Where the block halves the size and doubles the channels the shortcut is their option A: the input
    subsampled by 2 and zero-padded to the new channels, no parameters.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = nn.functional.pad(x[:, :, :: self.stride, :: self.stride],
                                         (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + shortcut)


@register_model("resnet20", input_shape=(3, 32, 32), sizes="any H, W ≥ 8; 1 or 3 channels",
                normalization=(CIFAR_MEAN, CIFAR_STD), split_points=("relu", "layer1.2", "layer2.2", "layer3.1"))
def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> nn.Sequential:
    """He et al.'s (2016) ResNet-20 for CIFAR-10 (0.27 M parameters), the CPU-sized stand-in for ResNet-18.

    conv3×3 16-BN-ReLU (point ``relu``), three stages of three basic blocks (``layer1.0`` … ``layer3.2``; 16, 32
    and 64 channels, 32×32, 16×16 and 8×8 at a 32×32 input), global average pooling and ``fc``. Convolutions are
    initialised as theirs (Kaiming normal). InfoScissors' U-shaped split, the edge keeping the first convolution
    and the last block, is ``relu..layer3.1``. The pooling is global, so any ``image_size`` of at least 8×8 fits.
    """
    _checked_size("resnet20", image_size, 8)
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=_normalize(in_channels, CIFAR_MEAN, CIFAR_STD))
    layers["conv1"] = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    layers["bn1"] = nn.BatchNorm2d(16)
    layers["relu"] = nn.ReLU()
    cin = 16
    for stage, cout in enumerate((16, 32, 64), start=1):
        first = _BasicBlock(cin, cout, 1 if stage == 1 else 2)
        layers[f"layer{stage}"] = nn.Sequential(first, *(_BasicBlock(cout, cout, 1) for _ in range(2)))
        cin = cout
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(64, num_classes)
    model = nn.Sequential(layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


register_model("vgg11-bottleneck-slim", **_VGG11_BOTTLENECK)(partial(vgg11_bottleneck, cloud_width=0.25))
register_model("lenet-sigmoid", **_LENET, split_points=("conv1", "sigmoid2"))(partial(lenet, bounded=True))


@cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


@register_model("torchvision", input_shape=(3, 224, 224),
                sizes="H, W ≥ 32 for most (Inception v3 ≥ 75; ViT: square, a multiple of its patch), "
                      "any channels through in_channels",
                members=_torchvision_names)
def torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3,
                      image_size: tuple[int, int] | None = None) -> nn.Module:
    """Any torchvision classifier by name, randomly initialised (weights are never downloaded here).

    Auxiliary classifiers (GoogLeNet, Inception v3) are switched off: a split model trains on the main
    logits. ``in_channels=1`` replaces the first convolution by one whose kernel is the sum of the colour
    kernels, so a grey image x gives exactly what the RGB image (x, x, x) gives. A vision transformer is
    built for square ``image_size`` (it takes no other size); other models take any size above a minimum.
    """
    import torchvision

    if name not in _torchvision_names():
        known = ", ".join(sorted(_torchvision_names()))
        raise ConfigError(f"model: unknown torchvision model {name!r}; known: {known}")
    # init_weights=True is their current default, said explicitly to silence torchvision's notice about it.
    kwargs: dict = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    if name.startswith("vit_") and image_size is not None:
        patch = int(name.rsplit("_", 1)[1])
        if image_size[0] != image_size[1] or image_size[0] % patch:
            raise ConfigError(f"model: {name} takes square images whose side is a multiple of {patch}, "
                              f"got {tuple(image_size)}; resize them (ss.conform, or --image-shape)")
        kwargs["image_size"] = image_size[0]
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _set_input_channels(model, in_channels)
    return model


def _set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution of ``model`` by one that reads ``in_channels`` channels."""
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].groups != 1:
        raise ConfigError(f"model: {type(model).__name__} has no plain first convolution to adapt to "
                          f"{in_channels}-channel images; give it 3-channel images (ss.conform, or --image-shape)")
    name, conv = found
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def build_model(name: str, num_classes: int = 10, in_channels: int | None = None,
                input_shape: tuple[int, int, int] | None = None, seed: int | None = 0) -> nn.Module:
    """Build a registered model (:func:`~splitshield.models.list_models`) or a torchvision classifier by name.

    Parameters
    ----------
    name:
        A registered model (:func:`~splitshield.models.list_models`: ``lenet``, ``vgg11-bottleneck``, …)
        or any name of ``torchvision.models.list_models()`` (``resnet18``, ``mobilenet_v2``, …).
    num_classes:
        Outputs of the classifier.
    in_channels:
        Channels of the images (1 for grey); default: ``input_shape[0]``, else the model's native count.
    input_shape:
        Shape (C, H, W) of the images the model will take; default the model's native shape
        (``get_model_info(name).input_shape``, 3×224×224 for torchvision). LeNet and the CIFAR net size their
        first linear layer for it.
    seed:
        Fixes the random initialisation (``None``: torch's global RNG).

    The model carries ``model_spec`` (these arguments), which :func:`~splitshield.split` passes on so a
    checkpoint can rebuild the architecture, and which shape errors quote.
    """
    info = get_model_info(name)
    if input_shape is not None and (len(input_shape) != 3 or in_channels not in (None, input_shape[0])):
        raise ConfigError(f"model: input_shape must be (C, H, W) and agree with in_channels={in_channels}, "
                          f"got {tuple(input_shape)}")
    if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
        raise ConfigError(f"model: in_channels must be a positive integer, got {in_channels!r}")
    native = input_shape if input_shape is not None else info.input_shape
    channels = in_channels or native[0]
    shape = (channels, *native[1:])
    with seeded(seed):
        model = info.builder(num_classes=num_classes, in_channels=channels, image_size=tuple(shape[1:]))
    model.model_spec = {"name": name, "num_classes": num_classes, "in_channels": channels,
                        "input_shape": list(shape)}
    return model
