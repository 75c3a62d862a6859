"""split() cuts exactly: tail(head(x)) == model(x), for zoo and torchvision models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import splitshield as ss
from splitshield.errors import ConfigError, SplitError
from splitshield.models.split import ModelCuts


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
    # The promise is the model's own output. (Child order cannot follow the data-dependent branch: for inputs
    # with a negative sum the model negates x first and the cut does not, so the inputs here are positive.)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = model(x)
    for point, feature in [("0", (4, 6, 6)), ("1", (4, 6, 6)), ("2", (144,))]:
        target = ss.split(model, point, input_shape=(1, 8, 8))
        assert target.feature_shape() == feature, point
        assert torch.equal(target.tail(target.head(x)), reference), point
    assert torch.equal(ss.split(model, "1").head(x), torch.relu(model[0](x)))  # the cut is after the ReLU


@pytest.mark.parametrize("name", ["lenet", "resnet18", "untraceable"])
def test_model_cuts_chain_walks_every_cut_to_exactly_each_heads_features(name):
    if name == "untraceable":
        model, shape = _Untraceable(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (1, 8, 8)
    else:
        model = ss.build_model(name, **({"num_classes": 10, "input_shape": (3, 32, 32)} if name == "resnet18" else {}))
        shape = (3, 32, 32) if name == "resnet18" else (1, 28, 28)
    model.eval()
    names = [p.name for p in ss.split_points(model)]
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = x
        for point, step in zip(names, ModelCuts(model).chain(names), strict=True):
            z = step(z)
            assert torch.equal(z, ss.split(model, point).head(x)), point
    assert torch.equal(z, model(x))  # the last cut is the model's output
    skipping = names[1::3]  # a subset: each module covers the layers between two chosen cuts
    with torch.no_grad():
        z = x
        for step in ModelCuts(model).chain(skipping):
            z = step(z)
        assert torch.equal(z, ss.split(model, skipping[-1]).head(x))
    with pytest.raises(SplitError, match="in the model's order"):
        ModelCuts(model).chain([names[2], names[1]])


def test_untraceable_non_sequential_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SplitError, match="does not trace with torch.fx"):
        ss.split_points(Branchy())


# --------------------------------------------------------------------------------------------------
# A cut follows the mode of the model it is called in (train/eval), as the original does.

_HANDFUL = [("convnext_tiny", 32), ("efficientnet_b0", 32), ("swin_t", 32), ("googlenet", 32),
            ("inception_v3", 80), ("resnet18", 32), ("mobilenet_v2", 32), ("vit_b_16", 32)]


@pytest.mark.parametrize(("name", "size"), _HANDFUL)
def test_cut_in_train_mode_is_exact_in_both_modes(name, size, one_thread):
    shape = (3, size, size)
    model = ss.build_model(name, input_shape=shape)  # freshly built: train mode, as the CLI and engine cut it
    legal = ss.split_points(model, shape)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    picks = [legal[round(i * (len(legal) - 2) / 4)].name for i in range(5)]
    for point in picks:
        assert ss.check_split(model, ss.split(model, point), x) == {"eval": True, "train": True}, point


class _Jitter(nn.Module):
    """A custom block whose forward reads self.training and holds a submodule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.conv(x)


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.depth = torchvision.ops.StochasticDepth(0.5, "row")
        self.jitter = _Jitter()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x + self.depth(x)
        x = self.jitter(x)
        return self.fc(self.drop(x.flatten(1)))


def test_custom_mode_dependent_modules_stay_whole():
    model = _ModeDependent()
    names = [p.name for p in ss.split_points(model, (1, 8, 8))]
    assert "jitter" in names and "jitter.conv" not in names  # the block that reads self.training is one piece
    x = torch.rand(4, 1, 8, 8)
    for point in names[:-1]:
        assert ss.check_split(model, ss.split(model, point), x) == {"eval": True, "train": True}, point


def test_check_split_catches_a_cut_that_froze_the_mode():
    model = _ModeDependent().train()
    frozen = torch.fx.symbolic_trace(model)  # what a plain trace does: `training=True` becomes a constant
    cut = ss.SplitModel(frozen, nn.Identity(), "all")
    assert ss.check_split(model, cut, torch.rand(4, 1, 8, 8)) == {"eval": False, "train": True}


def test_a_root_forward_that_reads_training_is_a_clear_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            x = self.conv(x)
            return torch.nn.functional.dropout(x, 0.5, self.training)

    with pytest.raises(SplitError, match=r"Root.forward itself behaves differently in train and eval mode"):
        ss.split_points(Root())


def test_googlenet_with_auxiliary_heads_lists_every_point_and_trains(mnist5k):
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    with pytest.warns(UserWarning, match="auxiliary classifiers switched off"):
        legal = ss.split_points(model)
    assert len(legal) == 26
    assert model.aux_logits and model.aux1 is not None  # the user's model is left as it was
    data = ss.conform(mnist5k.train.take(16), (3, 32, 32))
    with pytest.warns(UserWarning):
        target = ss.split(model, "inception4a", input_shape=(3, 32, 32))
    history = ss.Trainer(target, epochs=1, batch_size=8, progress=False).fit(data)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))


# --------------------------------------------------------------------------------------------------
# Input shapes: checked up front; the papers' nets adapt; torchvision models take grey images.


def test_a_shape_the_model_cannot_take_is_one_line_naming_both_shapes():
    model = ss.build_model("lenet")
    calls = (lambda: ss.split_points(model, (3, 32, 32)), lambda: ss.split(model, "ReLU2", input_shape=(1, 20, 20)))
    for call in calls:
        with pytest.raises(SplitError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "does not fit lenet" in message
        assert "built for (1, 28, 28), takes any H, W ≥ 16; 1 or 3 channels; torch says: " in message


def test_a_shape_error_on_a_model_without_spec_quotes_torch_in_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    expected = r"^input_shape \(1, 5, 5\) does not fit Sequential \(torch says: .*mat1"
    with pytest.raises(SplitError, match=expected) as info:
        ss.split_points(model, (1, 5, 5))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "shape", "point", "feature"), [
    ("lenet", (1, 20, 20), "ReLU2", (16, 4, 4)),
    ("lenet", (3, 24, 40), "pool2", (16, 3, 7)),
    ("cifar-cnn", (1, 16, 16), "ReLU32", (128, 4, 4)),
    ("cifar-cnn", (3, 48, 64), "pool3", (128, 6, 8)),
])
def test_papers_nets_adapt_to_the_input_size(name, shape, point, feature):
    model = ss.build_model(name, input_shape=shape)
    target = ss.split(model, point, input_shape=shape)
    assert target.feature_shape() == feature
    assert model.eval()(torch.rand(2, *shape)).shape == (2, 10)
    assert model.model_spec["input_shape"] == list(shape)


@pytest.mark.parametrize(("name", "shape", "minimum"), [("lenet", (1, 8, 8), 16), ("cifar-cnn", (3, 4, 4), 8)])
def test_papers_nets_name_the_smallest_size_they_take(name, shape, minimum):
    with pytest.raises(ConfigError, match=rf"{name} takes images of at least {minimum}×{minimum}, got \((4|8), "):
        ss.build_model(name, input_shape=shape)


def test_torchvision_model_on_grey_images_equals_the_rgb_model_on_grey_copied_to_rgb():
    grey = ss.build_model("resnet18", in_channels=1, seed=3).eval()
    rgb = ss.build_model("resnet18", seed=3).eval()
    x = torch.rand(2, 1, 32, 32)
    assert grey.conv1.in_channels == 1
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    assert ss.split_points(grey, (1, 28, 28))[0].feature_shape == (64, 14, 14)


def test_build_model_defaults_to_the_native_shape_and_rejects_disagreeing_arguments():
    assert ss.build_model("resnet18").model_spec["input_shape"] == [3, 224, 224]
    assert ss.build_model("lenet").model_spec["input_shape"] == [1, 28, 28]
    with pytest.raises(ConfigError, match="agree with in_channels=3"):
        ss.build_model("lenet", in_channels=3, input_shape=(1, 28, 28))


def test_vision_transformer_is_built_for_the_given_square_size():
    model = ss.build_model("vit_b_16", input_shape=(3, 32, 32))
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="square images whose side is a multiple of 16"):
        ss.build_model("vit_b_16", input_shape=(3, 32, 48))


class _NoiseAtTheEnd(nn.Module):
    """Train-only code after the block's last submodule: the two modes' graphs differ in length."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x + torch.randn_like(x)
        return x


def test_a_train_only_tail_of_a_block_keeps_the_block_whole_not_its_parent():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _NoiseAtTheEnd(), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    names = [p.name for p in ss.split_points(model, (1, 8, 8))]
    assert names[:3] == ["0", "1", "2"] and "1.conv" not in names
    x = torch.rand(2, 1, 8, 8)
    for point in names[:-1]:
        assert ss.check_split(model, ss.split(model, point), x) == {"eval": True, "train": True}, point


def test_check_split_compares_googlenet_without_its_auxiliary_heads():
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    with pytest.warns(UserWarning, match="auxiliary classifiers switched off"):
        target = ss.split(model, "inception4a")
    assert ss.check_split(model, target, torch.rand(2, 3, 32, 32)) == {"eval": True, "train": True}
    assert model.aux1 is not None


def test_numpy_integers_are_a_shape():
    import numpy as np

    shape = tuple(np.array([1, 28, 28]))
    assert ss.split_points(ss.build_model("lenet"), shape)[1].feature_shape == (8, 24, 24)
    with pytest.raises(SplitError, match="input_shape must be positive integers"):
        ss.split_points(ss.build_model("lenet"), (1, 28.5, 28))
