"""Datasets: the built-in digits, real files, the attacker's splits, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import splitshield as ss
from splitshield.data import conform
from splitshield.errors import ConfigError, DataError


def test_builtin_digits_are_real_mnist(shared_data, mnist5k):
    # The packaged file is rebuilt from a registry wheel: it must equal the reference copy.
    reference = np.load(shared_data / "mnist_5k.npz", allow_pickle=False)
    ours = torch.cat([mnist5k.train.images, mnist5k.holdout.images, mnist5k.test.images])
    assert ours.shape == (5000, 1, 28, 28)
    assert sorted(map(bytes, ours.numpy())) == sorted(map(bytes, reference["x_train"][:, None]))


def test_splits_are_disjoint_and_stratified(mnist5k):
    assert (len(mnist5k.train), len(mnist5k.holdout), len(mnist5k.test)) == (3000, 1000, 1000)
    for part in (mnist5k.train, mnist5k.holdout, mnist5k.test):
        assert torch.bincount(part.labels).tolist() == [len(part) // 10] * 10
    keys = [{bytes(img.numpy()) for img in part.images} for part in (mnist5k.train, mnist5k.holdout, mnist5k.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_first_per_class_protocol(mnist5k):
    x, y = mnist5k.test.first_per_class()
    assert x.shape == (10, 1, 28, 28) and y.tolist() == list(range(10))
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    first = [int((mnist5k.test.labels == c).nonzero()[0]) for c in range(10)]
    assert torch.equal(x, mnist5k.test.images[first].float() / 255)


def test_full_mnist_from_npz(shared_data):
    data = ss.load_dataset("mnist", data_dir=shared_data)
    assert len(data.train) + len(data.holdout) == 60000 and len(data.test) == 10000


def test_aux_kinds(mnist5k):
    assert mnist5k.aux("same_set") is mnist5k.train
    assert mnist5k.aux("same_distribution", n=7).images.shape[0] == 7
    noise = mnist5k.aux("noise", n=500)
    x, _ = noise.tensors()
    assert x.shape == (500, 1, 28, 28)
    assert abs(float(x.mean()) - 0.5) < 0.02  # N(0.5, 0.5²) clipped is symmetric about 0.5
    other = mnist5k.aux("other_distribution", other=ss.ImageSet(torch.zeros(3, 3, 32, 32, dtype=torch.uint8),
                                                                torch.zeros(3, dtype=torch.long), ("a",)))
    assert other.image_shape == (1, 28, 28)
    with pytest.raises(DataError, match="aux kind 'weird' unknown"):
        mnist5k.aux("weird")


def _neighbour_step(x: torch.Tensor) -> float:
    """Mean absolute difference between horizontally adjacent pixels."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_random_fields_are_seeded_smooth_shapes_of_every_contrast(mnist5k):
    fields = mnist5k.aux("random_fields", n=400, seed=3)
    x, y = fields.tensors()
    assert x.shape == (400, 1, 28, 28) and set(y.tolist()) <= set(range(10))
    assert torch.equal(x, mnist5k.aux("random_fields", n=400, seed=3).tensors()[0])
    assert not torch.equal(x, mnist5k.aux("random_fields", n=400, seed=4).tensors()[0])
    noise, _ = mnist5k.aux("noise", n=400).tensors()
    # Smooth on the whole: neighbours differ far less than in pixel noise (about 0.4 there).
    assert _neighbour_step(x) < 0.5 * _neighbour_step(noise)
    # Every contrast: some images nearly flat, some nearly binary (most pixels within 0.1 of 0 or 1).
    spread = x.flatten(1).std(1)
    binary = ((x < 0.1) | (x > 0.9)).flatten(1).float().mean(1)
    assert float(spread.min()) < 0.05 and float(binary.max()) > 0.8
    rgb, _ = ss.data.random_field_images(5, (3, 32, 32), ("a",), seed=0).tensors()
    assert rgb.shape == (5, 3, 32, 32) and not torch.equal(rgb[:, 0], rgb[:, 1])  # a field per channel


def test_batches_are_seeded(mnist5k):
    a = [y for _, y in mnist5k.train.batches(100, shuffle=True, seed=3)]
    b = [y for _, y in mnist5k.train.batches(100, shuffle=True, seed=3)]
    c = [y for _, y in mnist5k.train.batches(100, shuffle=True, seed=4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


def test_missing_data_names_path_and_remedy(tmp_path):
    with pytest.raises(DataError, match=rf"dataset 'mnist' not found \(looked in: {tmp_path}/mnist.npz.*provide"):
        ss.load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="no file .*missing.npz"):
        ss.load_dataset(f"npz:{tmp_path}/missing.npz")
    with pytest.raises(DataError, match="dataset 'imagenet' unknown; use mnist-5k"):
        ss.load_dataset("imagenet")


def test_npz_with_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="without pickled objects"):
        ss.load_dataset(f"npz:{path}")


def test_user_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    data = ss.load_dataset(f"npz:{path}", holdout_fraction=0.5)
    assert data.image_shape == (3, 16, 16) and data.num_classes == 4
    assert len(data.train) == 20 and len(data.holdout) == 20


def test_a_test_split_stored_sorted_by_class_is_read_from_the_classes_in_turn(tmp_path):
    # Like CIFAR-10's JPEG copy: every class's test images together, classes of unequal size. Each image's
    # first pixel is its index in the file, so the order read can be checked image by image.
    y_test = np.repeat([0, 1, 2], [4, 2, 3])
    x_test = np.full((9, 4, 4), 255, dtype=np.uint8)
    x_test[:, 0, 0] = np.arange(9)
    path = tmp_path / "sorted.npz"
    np.savez(path, x_train=np.full((12, 4, 4), 255, dtype=np.uint8), y_train=np.arange(12) % 3, x_test=x_test,
             y_test=y_test)
    test = ss.load_dataset(f"npz:{path}", value_range=(0, 255)).test
    # File order within a class; the classes in turn: 0, 4, 6 (the first of each), then 1, 5, 7, then 2, 8, 3.
    assert test.images[:, 0, 0, 0].tolist() == [0, 4, 6, 1, 5, 7, 2, 8, 3]
    assert test.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 2, 0]
    assert test.first_per_class(1)[0][:, 0, 0, 0].mul(255).round().tolist() == [0, 4, 6]  # as in the file


def test_a_test_split_in_any_other_order_is_read_as_stored(mnist5k):
    from splitshield.data import BUILTIN, _load_builtin

    _, stored = _load_builtin(BUILTIN, None, False, None)  # the file's own test split, as stored
    assert not bool((stored.labels[1:] >= stored.labels[:-1]).all())  # MNIST's order, not sorted by class
    assert torch.equal(mnist5k.test.labels, stored.labels) and torch.equal(mnist5k.test.images, stored.images)


def test_cells_on_a_dataset_whose_order_may_change_record_it_and_keep_their_targets():
    from splitshield.config import parse_spec
    from splitshield.experiment import plan

    base = {"model": "lenet", "splits": ["ReLU2"], "attacks": [{"name": "rmle", "iters": 5}]}
    # cifar10's copies may be sorted by class: its cells say the test order, its targets do not (training
    # never reads the test split), so a target trained before the order changed is still found.
    cifar = plan(parse_spec({**base, "dataset": "cifar10", "image_shape": [1, 28, 28]}))[0]
    assert cifar.config["test_order"] == "classes_in_turn"
    target_config = {k: v for k, v in cifar.config.items() if k not in ("attack", "evaluation", "test_order")}
    from splitshield.measure import config_hash

    assert config_hash(target_config) == cifar.target_hash
    mnist = plan(parse_spec({**base, "dataset": "mnist-5k"}))[0]
    assert "test_order" not in mnist.config  # read as stored, hashed as before


# --------------------------------------------------------------------------------------------------
# input checks: every bad array gives one line naming the array and the fix


def _npz(tmp_path, **arrays) -> str:
    """A valid 2-class npz (8 train, 4 test grey 4×4 images, uint8 0..255) with ``arrays`` swapped in."""
    rng = np.random.default_rng(0)
    base = {"x_train": rng.integers(0, 256, (8, 4, 4), dtype=np.uint8), "y_train": np.arange(8) % 2,
            "x_test": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "y_test": np.arange(4) % 2}
    path = tmp_path / "d.npz"
    np.savez(path, **(base | arrays))
    return f"npz:{path}"


def _flat(values, dtype) -> np.ndarray:
    """One constant 4×4 image per value."""
    return np.array(values, dtype=dtype)[:, None, None] * np.ones((1, 4, 4), dtype=dtype)


def _load_error(name: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        ss.load_dataset(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_uint8_on_a_small_scale_needs_value_range(tmp_path):
    # scikit-learn's digits are uint8 0..16: read as 0..255 they would be near black.
    name = _npz(tmp_path, x_train=_flat([0, 16] * 4, np.uint8), x_test=_flat([0, 8, 16, 20], np.uint8))
    assert "x_train: uint8 images use only 0..16, not 0..255; pass value_range=(0, 16)" in _load_error(name)
    data = ss.load_dataset(name, value_range=(0, 16))
    assert data.test.images[:, 0, 0, 0].tolist() == [0, 128, 255, 255]  # 8 -> 127.5 rounds to 128; 20 clips
    assert sorted({int(v) for v in data.train.images.flatten()}) == [0, 255]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_images_in_0_1_are_accepted(tmp_path, dtype):
    name = _npz(tmp_path, x_train=_flat([0, 1] * 4, dtype), x_test=_flat([0, 0.25, 0.5, 1], dtype))
    assert ss.load_dataset(name).test.images[:, 0, 0, 0].tolist() == [0, 64, 128, 255]


def test_float_images_outside_0_1_need_value_range(tmp_path):
    name = _npz(tmp_path, x_test=_flat([-1, -0.5, 0, 1], np.float32))
    message = _load_error(name)
    assert "x_test: float images span -1..1, not 0..1; pass value_range=(lo, hi)" in message
    assert "(e.g. (-1, 1))" in message
    assert ss.load_dataset(name, value_range=(-1, 1)).test.images[:, 0, 0, 0].tolist() == [0, 64, 128, 255]
    message = _load_error(_npz(tmp_path, x_train=_flat([0.4, 254.6] * 4, np.float64)))
    assert "x_train: float images span 0.4..254.6, not 0..1" in message and "(e.g. (0, 255))" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_images_are_refused(tmp_path, bad):
    name = _npz(tmp_path, x_test=_flat([0, 0.5, bad, 1], np.float32))
    assert "x_test: float images contain NaN or inf" in _load_error(name)
    assert "x_test: float images contain NaN or inf" in _load_error(name, value_range=(0, 1))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint16])
def test_other_integer_images_need_value_range(tmp_path, dtype):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 4, 4)).astype(dtype)
    pixels[0, 0, :2] = 0, 255
    name = _npz(tmp_path, x_train=pixels)
    message = _load_error(name)
    assert f"x_train: {np.dtype(dtype)} images" in message and "value_range=(0, 255)" in message
    data = ss.load_dataset(name, value_range=(0, 255), holdout_fraction=0.0)
    assert sorted(map(bytes, data.train.images.numpy())) == sorted(map(bytes, pixels.astype(np.uint8)[:, None]))


def test_bool_images_need_value_range(tmp_path):
    name = _npz(tmp_path, x_test=_flat([0, 1, 0, 1], bool))
    assert "x_test: bool images" in _load_error(name)
    assert ss.load_dataset(name, value_range=(0, 1)).test.images[:, 0, 0, 0].tolist() == [0, 255, 0, 255]


@pytest.mark.parametrize(("arrays", "expected"), [
    ({"x_train": np.zeros((0, 4, 4), np.uint8), "y_train": np.zeros(0, np.int64)}, "x_train: holds no images"),
    ({"x_test": np.zeros((4, 16), np.uint8)}, "x_test: images must be [N, H, W]"),
    ({"x_test": np.full((4, 4, 4), "a")}, "x_test: images must be numbers"),
    ({"y_train": np.arange(7) % 2}, "y_train: labels have shape (7,) but there are 8 images"),
    ({"y_test": np.array([0.0, 1.0, 0.5, 1.0])}, "y_test: labels must be whole numbers, found 0.5"),
    ({"y_test": np.array([0.0, 1.0, np.nan, 1.0])}, "y_test: labels must be whole numbers, found nan"),
    ({"y_test": np.array(["cat", "dog", "cat", "dog"])}, "y_test: labels must be integers 0..K-1, got dtype <U3"),
    ({"y_test": np.array([0, 1, -1, 1])}, "y_test: labels must be 0..K-1, found -1; renumber the classes from 0"),
    ({"classes": np.array(["a", "b"]), "y_test": np.array([0, 1, 2, 1])},
     "y_test: largest label is 2 but the classes array names only 2 classes (labels 0..1)"),
    ({"y_test": np.array([0, 1, 2, 1])}, "y_test: label 2 is not a class of the training split (its labels are 0..1)"),
    ({"y_train": np.arange(8) % 2 + 1}, "y_train: labels go up to 2 but class 0 has no image"),
    ({"y_train": np.array([0, 1] * 3 + [1, 10**12])}, "y_train: labels go up to 1000000000000 but class 2 has"),
])
def test_bad_arrays_name_the_array_and_the_fix(tmp_path, arrays, expected):
    assert expected in _load_error(_npz(tmp_path, **arrays))


def test_whole_float_and_keras_shaped_labels_are_accepted(tmp_path):
    name = _npz(tmp_path, y_train=(np.arange(8) % 2).astype(np.float32), y_test=(np.arange(4) % 2)[:, None])
    data = ss.load_dataset(name)
    assert data.test.labels.tolist() == [0, 1, 0, 1] and data.train.labels.dtype == torch.int64


@pytest.mark.parametrize("value_range", [(16, 0), (0, 0), (0,), (0, 1, 2), "0,16", (0, float("nan")), (0, "x"), 5])
def test_value_range_is_checked(value_range):
    message = _load_error("mnist-5k", value_range=value_range)
    assert message.startswith("value_range must be two numbers (lo, hi) with lo < hi, e.g. (0, 16); got ")


# --------------------------------------------------------------------------------------------------
# imagefolder and JPEG-bytes npz


def _imagefolder(root, pixels: dict[str, list[int]]) -> str:
    """root/{train,test}/<class>/<i>.png, one constant 4×4 grey image per value."""
    for part in ("train", "test"):
        for cls, values in pixels.items():
            (root / part / cls).mkdir(parents=True)
            for i, v in enumerate(values):
                Image.fromarray(np.full((4, 4), v, np.uint8)).save(root / part / cls / f"{i}.png")
    return f"imagefolder:{root}"


def test_imagefolder_loads_and_checks(tmp_path):
    data = ss.load_dataset(_imagefolder(tmp_path / "a", {"cat": [0, 200], "dog": [50, 255]}))
    assert data.train.classes == ("cat", "dog") and data.image_shape == (1, 4, 4)
    # Read from the class folders in turn (a folder per class is a split sorted by class).
    assert data.test.images[:, 0, 0, 0].tolist() == [0, 50, 200, 255] and data.test.labels.tolist() == [0, 1, 0, 1]

    dark = _imagefolder(tmp_path / "b", {"cat": [0, 10], "dog": [5, 100]})
    message = _load_error(dark)
    assert f"imagefolder {tmp_path / 'b' / 'train'}: uint8 images use only 0..100" in message
    assert "value_range=(0, 100)" in message
    assert ss.load_dataset(dark, value_range=(0, 100)).test.images[:, 0, 0, 0].tolist() == [0, 13, 26, 255]

    (tmp_path / "a" / "train" / "cat" / "notes.txt").write_text("not a picture")
    assert "notes.txt: not an image Pillow can read" in _load_error(f"imagefolder:{tmp_path / 'a'}")


def _jpeg_npz(path, colours: dict[str, list[tuple[int, int, int]]], **overrides) -> str:
    """The JPEG-bytes layout of cifar10_jpegbytes.npz: one constant 8×8 RGB image per colour, label = index."""
    arrays = {}
    for part, cols in colours.items():
        blobs = []
        for c in cols:
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), c, np.uint8)).save(buf, format="JPEG", quality=95)
            blobs.append(buf.getvalue())
        arrays[f"jpeg_{part}"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"offsets_{part}"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"y_{part}"] = np.arange(len(cols)) % 2
    np.savez(path, classes=np.array(["red", "blue"]), **(arrays | overrides))
    return f"npz:{path}"


def test_jpeg_bytes_npz_decodes_and_checks(tmp_path):
    colours = {"train": [(250, 0, 0), (0, 0, 250)] * 2, "test": [(200, 30, 30), (30, 30, 200)]}
    data = ss.load_dataset(_jpeg_npz(tmp_path / "c.npz", colours))
    assert data.image_shape == (3, 8, 8) and data.train.classes == ("red", "blue")
    assert data.test.labels.tolist() == [0, 1]
    decoded = data.test.images[:, :, 0, 0].int()
    assert (decoded - torch.tensor(colours["test"])).abs().max() <= 4  # JPEG is lossy

    broken = _jpeg_npz(tmp_path / "d.npz", colours, offsets_train=np.array([0, 3, 6]))
    assert "jpeg_train image 0 does not decode" in _load_error(broken)
    np.savez(tmp_path / "e.npz", **{k: v for k, v in np.load(tmp_path / "c.npz").items() if k != "offsets_test"})
    assert "lacks arrays ['offsets_test']" in _load_error(f"npz:{tmp_path / 'e.npz'}")


# --------------------------------------------------------------------------------------------------
# evaluation images and shape conversion


def _numbered(labels: list[int]) -> ss.ImageSet:
    """Image i is filled with the value i, so the picked images can be read back from the pixels."""
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return ss.ImageSet(images, torch.tensor(labels), tuple(str(c) for c in range(max(labels) + 1)))


def _picked(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().int().tolist()


def test_first_per_class_gives_at_least_ten_images():
    x, y = _numbered([1, 0] * 10).first_per_class()
    assert x.shape == (10, 1, 2, 2) and x.dtype == torch.float32
    assert y.tolist() == [0] * 5 + [1] * 5
    assert _picked(x) == [1, 3, 5, 7, 9, 0, 2, 4, 6, 8]  # each class's first five, in set order

    assert _numbered([0, 1, 2] * 5).first_per_class()[1].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert _numbered([0] * 9 + [1] * 2).first_per_class()[1].tolist() == [0] * 5 + [1] * 2  # class 1 has only 2
    x, y = _numbered([1, 0] * 10).first_per_class(per_class=2)
    assert _picked(x) == [1, 3, 0, 2] and y.tolist() == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="per_class must be a positive number of images, got 0"):
        _numbered([0, 1]).first_per_class(per_class=0)


def test_first_per_class_with_ten_classes_is_one_each():
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    x, y = _numbered(order * 3).first_per_class()
    assert y.tolist() == list(range(10)) and _picked(x) == [order.index(c) for c in range(10)]


def test_conform_converts_grey_and_rgb():
    grey = ss.ImageSet(torch.tensor([0, 90, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone(),
                       torch.tensor([0, 1, 0]), ("a", "b"))
    rgb = conform(grey, (3, 4, 4))
    assert rgb.image_shape == (3, 4, 4) and rgb.labels.tolist() == [0, 1, 0] and rgb.classes == ("a", "b")
    assert rgb.images[:, :, 0, 0].tolist() == [[0, 0, 0], [90, 90, 90], [255, 255, 255]]

    colour = ss.ImageSet(torch.tensor([30, 60, 120], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 8, 8).clone(),
                         torch.tensor([0]), ("a",))
    small = conform(colour, (1, 4, 4))
    assert small.image_shape == (1, 4, 4) and small.images.unique().tolist() == [70]  # unweighted mean
    with pytest.raises(DataError, match="cannot convert 3-channel images to 2 channels"):
        conform(colour, (2, 8, 8))
    with pytest.raises(DataError, match=r"shape must be \(C, H, W\) with positive sizes, got \(3, 32\)"):
        conform(colour, (3, 32))
