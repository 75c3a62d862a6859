"""The registries: every registered model and dataset is what its metadata says, and specs take their names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield import experiment
from splitshield.config import parse_spec
from splitshield.data import DatasetInfo, get_dataset_info, register_dataset, unregister_dataset
from splitshield.errors import ConfigError, DataError
from splitshield.models import Normalize, get_model_info, register_model, unregister_model

SPEC = {"splits": ["ReLU2"], "attacks": [{"name": "inverse_network", "steps": 5}]}


# --------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("name", ss.list_models())
def test_every_registered_model_builds_at_its_shape_with_its_split_points(name, one_thread):
    info = get_model_info(name)
    model = ss.build_model(name).eval()  # at the registered native shape
    assert model.model_spec["input_shape"] == list(info.input_shape)
    assert model(torch.rand(2, *info.input_shape)).shape == (2, 10)
    points = ss.split_points(model, info.input_shape)
    legal = {p.name for p in points} | {a for p in points for a in p.aliases}
    assert info.split_points and set(info.split_points) <= legal
    first = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if info.normalization is None:
        assert first is None
    else:
        mean, std = info.normalization
        assert torch.allclose(first.mean.flatten(), torch.tensor(mean)), "registered mean is not the model's"
        assert torch.allclose(first.std.flatten(), torch.tensor(std)), "registered std is not the model's"


def test_a_torchvision_name_resolves_to_the_family_with_its_own_name():
    info = get_model_info("resnet18")
    assert (info.name, info.input_shape, info.members) == ("resnet18", (3, 224, 224), None)
    assert info.sizes == ss.models.registry.FAMILIES["torchvision"].sizes
    assert "resnet18" in ss.list_models(include_families=True) and "resnet18" not in ss.list_models()
    with pytest.raises(ConfigError, match=r"unknown model 'resnet9000'; zoo models: lenet, .*torchvision"):
        ss.build_model("resnet9000")


def _tiny(num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (12, 12)) -> nn.Module:
    """A small conv net for any image size."""
    h, w = image_size
    return nn.Sequential(nn.Conv2d(in_channels, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * h * w, num_classes))


def test_a_newly_registered_model_is_valid_in_a_spec_until_unregistered():
    register_model("tiny-for-test", input_shape=(1, 12, 12), sizes="any H, W", split_points=("1",))(_tiny)
    try:
        spec = parse_spec({**SPEC, "dataset": "mnist-5k", "model": "tiny-for-test", "splits": ["1"]})
        assert spec.model == ["tiny-for-test"]
        assert {c.config["model"] for c in experiment.plan(spec)} == {"tiny-for-test"}  # its split point checked
        assert ss.build_model("tiny-for-test").model_spec["input_shape"] == [1, 12, 12]
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny-for-test", input_shape=(1, 12, 12), sizes="")(_tiny)
    finally:
        unregister_model("tiny-for-test")
    with pytest.raises(ConfigError, match="spec field model.*'tiny-for-test'.*zoo models: lenet"):
        parse_spec({**SPEC, "dataset": "mnist-5k", "model": "tiny-for-test"})


# --------------------------------------------------------------------------------------------------
# datasets


def _spread_images(source: Path, target: Path, n: int) -> None:
    """Copy ``n`` evenly spaced images of each split of ``source`` to ``target`` (plain or JPEG-bytes npz;
    evenly spaced because some copies are sorted by class)."""
    with np.load(source, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "x_all" in arrays:  # the AT&T faces (400 images, no split in the file): whole
        np.savez(target, **arrays)
        return
    out = {"classes": arrays["classes"]}
    for part in ("train", "test"):
        index = np.linspace(0, len(arrays[f"y_{part}"]) - 1, n).round().astype(int)
        out[f"y_{part}"] = arrays[f"y_{part}"][index]
        if f"jpeg_{part}" in arrays:
            blob, offsets = arrays[f"jpeg_{part}"], arrays[f"offsets_{part}"]
            pieces = [blob[offsets[i]: offsets[i + 1]] for i in index]
            out[f"jpeg_{part}"] = np.concatenate(pieces)
            out[f"offsets_{part}"] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        else:
            out[f"x_{part}"] = arrays[f"x_{part}"][index]
    np.savez(target, **out)


@pytest.mark.parametrize("name", [n for n in ss.list_datasets() if not get_dataset_info(n).is_pattern])
def test_every_named_dataset_is_what_its_registration_says(name, request, tmp_path):
    """The built-in set whole; the others from 1000 images of each split of the real copy beside the repo,
    found under one of their registered file names (skipped where there is none)."""
    info = get_dataset_info(name)
    if info.files:
        shared = request.getfixturevalue("shared_data")
        source = next((shared / f for f in info.files if (shared / f).is_file()), None)
        if source is None:
            pytest.skip(f"no copy of {name} ({' or '.join(info.files)}) in {shared}")
        _spread_images(source, tmp_path / source.name, 1000)
        data = ss.load_dataset(name, data_dir=tmp_path)
    else:
        data = ss.load_dataset(name)
    assert data.image_shape == info.image_shape and data.num_classes == info.num_classes
    x = data.train.images.float() / 255
    mean, std = info.normalization
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(mean), atol=0.02)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(std), atol=0.02)


def test_patterns_resolve_to_their_registration_and_unknown_names_list_every_name():
    assert get_dataset_info("npz:data/digits.npz").name == "npz:PATH"
    assert get_dataset_info("imagefolder:a:b").name == "imagefolder:PATH"
    assert get_dataset_info("npz:data/digits.npz").image_shape is None  # known only by loading
    for name in ("svhn", "npz:", "mnist:x"):
        with pytest.raises(DataError, match=rf"dataset '{name}' unknown; use " + ", ".join(ss.list_datasets())):
            get_dataset_info(name)


def test_a_newly_registered_dataset_is_valid_in_a_spec_and_its_shape_is_read_not_loaded():
    def never(*args: object) -> None:
        raise AssertionError("the registered image shape should be enough to check the splits")

    register_dataset(DatasetInfo(name="tiny-digits", load=never, image_shape=(1, 20, 20), num_classes=10))
    try:
        spec = parse_spec({**SPEC, "dataset": "tiny-digits", "model": "lenet"})
        assert spec.dataset == ["tiny-digits"]
        experiment.plan(spec)  # lenet's ReLU2 exists at 20×20
        with pytest.raises(ConfigError, match=r"'ReLU9' is not a split point of lenet on tiny-digits"):
            experiment.plan(parse_spec({**SPEC, "dataset": "tiny-digits", "splits": ["ReLU9"]}))
    finally:
        unregister_dataset("tiny-digits")
    with pytest.raises(ConfigError, match="spec field dataset.*'tiny-digits'"):
        parse_spec({**SPEC, "dataset": "tiny-digits"})
