"""split() cuts exactly: tail(head(x)) == model(x), for zoo and torchvision models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import splitshield as ss
from splitshield.errors import ConfigError, SplitError


def _check_exact(model: nn.Module, shape: tuple[int, ...], points: list[str]) -> None:
    model.eval()
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        for point in points:
            target = ss.split(model, point).eval()
            assert torch.equal(target.tail(target.head(x)), reference), point


def test_lenet_paper_points_and_shapes():
    model = ss.build_model("lenet")
    shapes = {p.name: p.feature_shape for p in ss.split_points(model, (1, 28, 28))}
    assert shapes["conv1"] == (8, 24, 24)
    assert shapes["ReLU2"] == (16, 8, 8)
    assert shapes["pool2"] == (16, 4, 4)
    _check_exact(model, (1, 28, 28), ["conv1", "ReLU1", "ReLU2", "pool2", "fc1", "fc2act"])


@pytest.mark.parametrize(("shape", "feature"), [((3, 32, 32), (8, 8, 8)), ((1, 28, 28), (8, 7, 7))])
def test_vgg11_bottleneck_splits_at_the_sigmoid_for_cifar_and_mnist_sizes(shape, feature):
    model = ss.build_model("vgg11-bottleneck", in_channels=shape[0])
    shapes = {p.name: p.feature_shape for p in ss.split_points(model, shape)}
    assert shapes["sigmoid"] == feature  # CEM's 8-channel bottleneck at a quarter of the resolution
    assert model.eval()(torch.rand(2, *shape)).shape == (2, 10)  # the tail pools a 7×7 map down to 1×1 too
    _check_exact(model, shape, ["sigmoid"])


def test_vgg11_bottleneck_slim_keeps_cems_head_and_narrows_the_cloud():
    full = ss.split(ss.build_model("vgg11-bottleneck", in_channels=1), "sigmoid", input_shape=(1, 28, 28))
    slim = ss.split(ss.build_model("vgg11-bottleneck-slim", in_channels=1), "sigmoid", input_shape=(1, 28, 28))

    def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def size(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert shapes(slim.head) == shapes(full.head)  # the attacked edge is CEM's, weight for weight
    assert slim.feature_shape() == full.feature_shape() == (8, 7, 7)
    assert size(slim.tail) < size(full.tail) / 10  # a quarter of the widths: about 1/16 of the weights
    assert slim.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("width", [0, -1, 1.5])
def test_vgg11_bottleneck_cloud_width_out_of_range_is_a_config_error(width):
    with pytest.raises(ConfigError, match="cloud_width"):
        ss.models.vgg11_bottleneck(cloud_width=width)


def test_cifar_cnn_paper_points_and_shapes():
    model = ss.build_model("cifar-cnn", in_channels=3)
    shapes = {p.name: p.feature_shape for p in ss.split_points(model, (3, 32, 32))}
    assert shapes["conv11"] == (64, 32, 32)
    assert shapes["ReLU22"] == (128, 16, 16)
    assert shapes["ReLU32"] == (128, 8, 8)
    _check_exact(model, (3, 32, 32), ["conv11", "ReLU22", "ReLU32", "fc1act"])


@pytest.mark.parametrize(
    ("name", "count", "points"),
    [
        ("resnet18", 23, ["conv1", "maxpool", "layer1.0.add", "layer2.1", "layer4.1", "avgpool"]),
        ("vgg11_bn", 38, ["features.0", "features.7", "features.20", "avgpool", "classifier.3"]),
        ("mobilenet_v2", 73, ["features.0.2", "features.3", "features.10", "features.18"]),
    ],
)
def test_torchvision_models(name, count, points):
    model = getattr(torchvision.models, name)(num_classes=10)
    legal = ss.split_points(model)
    assert len(legal) == count  # the number of cuts with exactly one live tensor (DESIGN.md)
    assert set(points) <= {name for p in legal for name in (p.name, *p.aliases)}
    _check_exact(model, (3, 32, 32), points)


def test_skip_connection_interior_is_not_legal():
    model = torchvision.models.resnet18(num_classes=10)
    names = {p.name for p in ss.split_points(model)}
    assert "layer1.0.conv1" not in names  # the identity branch is live across this cut
    with pytest.raises(SplitError, match="legal points: conv1, bn1"):
        ss.split(model, "layer1.0.conv1")


def test_unknown_point_lists_legal_names():
    with pytest.raises(SplitError, match=r"no split point 'ReLU9'.*legal points: normalize, conv1, ReLU1"):
        ss.split(ss.build_model("lenet"), "ReLU9")


def test_halves_share_parameters_with_the_model():
    model = ss.build_model("lenet")
    target = ss.split(model, "ReLU2")
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    assert torch.equal(target.head.conv1.weight, model.conv1.weight)


class _Untraceable(nn.Sequential):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return super().forward(x)
        return super().forward(-x)


def test_untraceable_sequential_falls_back_to_child_order():
    model = _Untraceable(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert [p.name for p in ss.split_points(model)] == ["0", "1", "2", "3"]
    target = ss.split(model, "1")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(target.tail(target.head(x)), nn.Sequential(*model)(x))


def test_untraceable_non_sequential_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SplitError, match="does not trace with torch.fx"):
        ss.split_points(Branchy())
