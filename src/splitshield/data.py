"""Datasets: a registry of named image datasets, the victim/attacker splits, and batching.

Images are stored as uint8 NCHW tensors and handed out as float tensors in [0, 1]. Every dataset is
split three ways:

- ``train`` — what the target model is trained on (the *same set* an attacker may hold);
- ``holdout`` — a disjoint part of the official training split the target never sees (the attacker's
  *same distribution* data);
- ``test`` — the official test split, where attacks and accuracy are evaluated (a file that stores it
  sorted by class is read from the classes in turn, so its first n images hold every class).

Each dataset is registered once (:func:`register_dataset`) with its image shape, class count,
normalisation and loader; :func:`list_datasets` gives the names. ``mnist-5k`` is built in (shipped with
the package); ``mnist``, ``fashion-mnist`` and ``cifar10`` come from ``--data-dir`` / ``$SPLITSHIELD_DATA``
(an npz file or a torchvision-layout folder; torchvision download as a fallback when ``download=True``);
the patterns ``npz:PATH`` and ``imagefolder:PATH`` load any file or folder of images.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError

BUILTIN = "mnist-5k"


@dataclass
class ImageSet:
    """Labelled images held in memory.

    Attributes
    ----------
    images:
        uint8 tensor [N, C, H, W].
    labels:
        int64 tensor [N].
    classes:
        Class names, index = label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must have shape [{self.images.shape[0]}], got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image (C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: torch.Tensor | list[int]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def take(self, n: int) -> ImageSet:
        """The first ``n`` images (fewer when the set is smaller)."""
        return self.subset(torch.arange(min(n, len(self))))

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float [N, C, H, W] in [0, 1] and labels [N]."""
        return to_float(self.images).to(device), self.labels.to(device)

    def first_per_class(self, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation images: the first ``per_class`` images of each class, class by class.

        He et al. evaluate the first image of each of MNIST's 10 classes; with fewer classes that is
        too few images to average over, so by default each class gives as many images as it takes to
        reach at least 10 in all (10 classes: 1 each, as He et al.; 2 classes: 5 each; 3 classes: 4 each).

        Parameters
        ----------
        per_class:
            Images taken from each class, or ``None`` for ``ceil(10 / number of classes present)``.
            A class with fewer images gives all it has.

        Returns
        -------
        images, labels:
            Float [N, C, H, W] in [0, 1] and int64 [N]: class 0's images first (in set order), then
            class 1's, and so on.
        """
        return self.subset(self.first_per_class_index(per_class)).tensors()

    def first_per_class_index(self, per_class: int | None = None) -> list[int]:
        """Positions of the images :meth:`first_per_class` returns, in its order."""
        if per_class is not None and per_class < 1:
            raise ConfigError(f"per_class must be a positive number of images, got {per_class}")
        present = [c for c in range(self.num_classes) if (self.labels == c).any()]
        k = per_class if per_class is not None else -(-10 // max(len(present), 1))
        return [int(i) for c in present for i in (self.labels == c).nonzero().flatten()[:k]]

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float [B, C, H, W] in [0, 1], labels [B]); the order depends only on ``seed``."""
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield to_float(self.images[idx]).to(device), self.labels[idx].to(device)


def evaluation_split(test: ImageSet, images: str | int, traffic: int) -> tuple[ImageSet, ImageSet]:
    """The images an attack is evaluated on, and other users' images the cloud has seen (its traffic).

    Parameters
    ----------
    test:
        The test split.
    images:
        ``"first_per_class"`` (He et al.'s protocol, :meth:`ImageSet.first_per_class`) or a number n
        (the first n test images).
    traffic:
        At most this many test images, none of them evaluated: the cloud never sees an evaluated image twice.

    Returns
    -------
    evaluated, traffic:
        Two disjoint :class:`ImageSet` of ``test`` (the traffic may be empty).
    """
    index = test.first_per_class_index() if images == "first_per_class" else list(range(min(int(images), len(test))))
    rest = torch.ones(len(test), dtype=torch.bool)
    rest[index] = False
    return test.subset(index), test.subset(rest.nonzero().flatten()).take(traffic)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]."""
    return images.float().div_(255.0)


@dataclass
class Dataset:
    """A named dataset split into target ``train``, attacker ``holdout`` and ``test``."""

    name: str
    train: ImageSet
    holdout: ImageSet
    test: ImageSet

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def aux(self, kind: str = "same_distribution", n: int | None = None, seed: int = 0,
            other: ImageSet | None = None) -> ImageSet:
        """The attacker's auxiliary data.

        Parameters
        ----------
        kind:
            ``same_set`` (the target's own training images), ``same_distribution`` (the disjoint
            holdout), ``noise`` (Gaussian noise images, mean 0.5, std 0.5, clipped to [0, 1], random
            labels; He et al.'s "rand set"), ``random_fields`` (data-free like noise, but smooth random
            shapes: :func:`random_field_images`), or ``other_distribution`` (the images of ``other``,
            converted to this dataset's image shape).
        n:
            Keep at most this many images.
        """
        if kind == "same_set":
            pool = self.train
        elif kind == "same_distribution":
            pool = self.holdout
        elif kind in _DATA_FREE:
            count = n if n is not None else len(self.holdout)
            pool = _DATA_FREE[kind](count, self.image_shape, self.train.classes, seed)
        elif kind == "other_distribution":
            if other is None:
                raise DataError("aux kind 'other_distribution' needs other=<ImageSet of another dataset>")
            pool = conform(other, self.image_shape)
        else:
            raise DataError(
                f"aux kind {kind!r} unknown; use same_set, same_distribution, noise, random_fields or "
                "other_distribution"
            )
        return pool if n is None else pool.take(n)


def noise_images(n: int, shape: tuple[int, int, int], classes: tuple[str, ...], seed: int = 0) -> ImageSet:
    """``n`` Gaussian-noise images N(0.5, 0.5²) clipped to [0, 1], with uniformly random labels."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + 0.5 * torch.randn(n, *shape, generator=g)).clamp(0, 1)
    labels = torch.randint(len(classes), (n,), generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), labels, classes)


#: Coarse grids of :func:`random_field_images`, as fractions of the image side: from a few blobs to pixel noise.
FIELD_GRIDS = (1 / 8, 1 / 4, 1 / 2, 1)


def random_field_images(n: int, shape: tuple[int, int, int], classes: tuple[str, ...],
                        seed: int = 0) -> ImageSet:
    """``n`` smooth random images with random contrast and uniformly random labels: data-free queries.

    Each image is uniform noise on a coarse grid (side ``FIELD_GRIDS`` × the image's, one of them at random),
    bilinearly upsampled and passed through a random contrast curve ``sigmoid(k·(u − t))``, k ~ U(1, 20),
    t ~ U(0, 1): from low-contrast clouds to near-binary blobs, with large flat regions that pixel noise
    never has. An attacker without a single natural image can draw them; an inverse network trained on them
    meets features of flat backgrounds and edges, which Gaussian noise's features never show it.
    Channels get their own fields (colour blobs for RGB).
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(len(FIELD_GRIDS), (n,), generator=g)
    slope = 1 + 19 * torch.rand(n, 1, 1, 1, generator=g)
    threshold = torch.rand(n, 1, 1, 1, generator=g)
    x = torch.empty(n, c, h, w)
    for i, fraction in enumerate(FIELD_GRIDS):
        rows = (grid == i).nonzero().flatten()
        coarse = torch.rand(len(rows), c, max(2, round(h * fraction)), max(2, round(w * fraction)), generator=g)
        x[rows] = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.sigmoid(slope * (x - threshold))
    labels = torch.randint(len(classes), (n,), generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), labels, classes)


#: The auxiliary kinds that need no data: their image makers.
_DATA_FREE: dict[str, Callable[[int, tuple[int, int, int], tuple[str, ...], int], ImageSet]] = {
    "noise": noise_images, "random_fields": random_field_images}


def conform(images: ImageSet, shape: tuple[int, int, int]) -> ImageSet:
    """Give every image of ``images`` the shape ``shape``: convert grey <-> RGB, then resize.

    Use it to feed one dataset's images to a model built for another (MNIST digits to a CIFAR-10
    model, or the reverse).

    Parameters
    ----------
    images:
        The images, uint8 [N, C, H, W] on 0..255.
    shape:
        The wanted (C, H, W) in channels and pixels, e.g. ``(3, 32, 32)`` or ``(1, 28, 28)``.

    Returns
    -------
    ImageSet
        uint8 [N, *shape] on 0..255, with the same labels and classes. Grey -> RGB copies the grey
        channel into each of the C channels; C channels -> grey is their unweighted mean (not a
        luma formula); resizing is bilinear. Other channel changes (RGB -> 2 channels) raise
        :class:`DataError`.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    x = to_float(images.images)
    c = shape[0]
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1) if x.shape[1] == 1 else None
        if x is None:
            raise DataError(f"cannot convert {images.images.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), images.labels, images.classes)


# --------------------------------------------------------------------------------------------------
# the registry

#: ``load(name, data_dir, download, value_range) -> (train, test)``; a pattern's loader gets the PATH as name.
Loader = Callable[[str, str | Path | None, bool, tuple[float, float] | None], tuple[ImageSet, ImageSet]]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset name :func:`load_dataset` takes, how it loads, and what is known of it before loading.

    Attributes
    ----------
    name:
        The name (``mnist``), or a pattern ending in ``:PATH`` (``npz:PATH``) that the user completes.
    load:
        ``load(name, data_dir, download, value_range)`` returns the official (train, test) splits; a
        pattern's loader gets the user's PATH in place of the name.
    image_shape:
        (C, H, W) of every image; ``None`` when only loading tells (a pattern).
    num_classes:
        Number of classes; ``None`` when only loading tells.
    normalization:
        Per-channel (mean, std) of the training images on [0, 1]; ``None`` when unknown.
    files:
        File names looked for in ``data_dir``.
    torchvision:
        The ``torchvision.datasets`` class that reads (or downloads) a torchvision-layout copy.
    how_to_get:
        What to provide when no copy is found (the error says it).
    sorted_files:
        Copies of it may store the test split sorted by class (CIFAR-10's JPEG copy, the faces, a folder per
        class), which :func:`load_dataset` then reads from the classes in turn. Cells on such a dataset record
        that order in their configs, so none measured in file order by an earlier version is reused.
    """

    name: str
    load: Loader
    image_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    files: tuple[str, ...] = ()
    torchvision: str | None = None
    how_to_get: str = ""
    sorted_files: bool = False

    @property
    def is_pattern(self) -> bool:
        """Whether the name is a pattern such as ``npz:PATH``."""
        return self.name.endswith(":PATH")


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Make ``info.name`` a name :func:`load_dataset` and specs take; a taken name raises :class:`ValueError`."""
    if info.name in _DATASETS:
        raise ValueError(f"dataset {info.name!r} is already registered")
    _DATASETS[info.name] = info
    return info


def unregister_dataset(name: str) -> None:
    """Remove dataset ``name`` from the registry (a plug-in's or a test's temporary dataset)."""
    if _DATASETS.pop(name, None) is None:
        raise KeyError(f"dataset {name!r} is not registered")


def get_dataset_info(name: str) -> DatasetInfo:
    """The registration of dataset ``name``: a registered name, or a pattern's prefix and a path
    (``npz:data/digits.npz`` gives ``npz:PATH``'s). An unknown name raises :class:`DataError` listing the known ones."""
    prefix, colon, path = name.partition(":")
    info = _DATASETS.get(f"{prefix}:PATH" if colon and path else name)
    if info is None:
        raise DataError(f"dataset {name!r} unknown; use {', '.join(_DATASETS)}")
    return info


def list_datasets() -> list[str]:
    """The registered dataset names and patterns (``npz:PATH``), in registration order."""
    return list(_DATASETS)


# --------------------------------------------------------------------------------------------------
# loading


def load_dataset(name: str = BUILTIN, data_dir: str | Path | None = None, holdout_fraction: float = 0.25,
                 seed: int = 0, download: bool = False,
                 value_range: tuple[float, float] | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> Dataset:
    """Load a dataset by name and split its training part into target ``train`` and attacker ``holdout``.

    Parameters
    ----------
    name:
        A name of :func:`list_datasets` (``mnist-5k``, ``cifar10``, …), a pattern's PATH filled in
        (``npz:data/digits.npz``, ``imagefolder:photos``).
    data_dir:
        Where the files of named datasets (``mnist``, ``cifar10``, …) live; default ``$SPLITSHIELD_DATA``.
    holdout_fraction:
        Fraction of the training split kept from the target, stratified per class.
    download:
        Let torchvision download a named dataset when no local copy is found (needs a network).
    value_range:
        ``(lo, hi)``: the scale the stored pixel values are on, e.g. ``(0, 16)`` for scikit-learn's
        digits or ``(-1, 1)`` for normalised floats. Pixels are mapped linearly from ``lo..hi`` to
        ``0..255`` (rounded; values outside are clipped), whatever their dtype. ``None`` (default)
        accepts uint8 images that use the 0..255 scale and float images in [0, 1]; anything else
        raises :class:`DataError` naming the array and its range.
    image_shape:
        ``(C, H, W)``: convert every image to this shape on loading (grey <-> RGB, bilinear resizing;
        see :func:`conform`), e.g. ``(3, 32, 32)`` to feed digits to a colour model. ``None`` keeps the
        stored shape.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if value_range is not None:
        value_range = _check_value_range(value_range)
    train, test = _load_raw(name, data_dir, download, value_range)
    if image_shape is not None:
        train, test = conform(train, image_shape), conform(test, image_shape)
    fit, holdout = _stratified_split(train, holdout_fraction, seed)
    return Dataset(name, fit, holdout, _classes_in_turn(test))


def _check_value_range(value_range: object) -> tuple[float, float]:
    try:
        if isinstance(value_range, str | bytes):  # "0,16" would otherwise unpack character by character
            raise TypeError
        lo, hi = (float(v) for v in value_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not lo < hi or not np.isfinite([lo, hi]).all():
        raise DataError(f"value_range must be two numbers (lo, hi) with lo < hi, e.g. (0, 16); got {value_range!r}")
    return lo, hi


def _load_raw(name: str, data_dir: str | Path | None, download: bool,
              value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    info = get_dataset_info(name)
    return info.load(name.partition(":")[2] if info.is_pattern else name, data_dir, download, value_range)


def _load_builtin(name: str, data_dir: str | Path | None, download: bool,
                  value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    """The built-in digits; ``data_dir`` and ``download`` do not apply."""
    with resources.files("splitshield").joinpath("_data/mnist_5k.npz").open("rb") as fh:
        arrays = _read_npz(io.BytesIO(fh.read()), "built-in mnist-5k")
    full = _imageset(arrays["x_train"], arrays["y_train"], arrays.get("classes"),
                     ("built-in mnist-5k x_train", "built-in mnist-5k y_train"), value_range)
    # The file is sorted by digit; a fixed shuffle gives it MNIST's mixed order, so take(n) is balanced.
    full = full.subset(torch.randperm(len(full), generator=torch.Generator().manual_seed(5000)))
    # mnist-5k has no test split: the last 100 images of each digit are its test set.
    test_idx = torch.cat([(full.labels == c).nonzero().flatten()[-100:] for c in range(10)])
    mask = torch.ones(len(full), dtype=torch.bool)
    mask[test_idx] = False
    return full.subset(mask.nonzero().flatten()), full.subset(test_idx.sort().values)


def _read_npz(source, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{label}: not a readable npz without pickled objects ({exc})") from None


def _imageset(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None, names: tuple[str, str],
              value_range: tuple[float, float] | None = None, train: ImageSet | None = None) -> ImageSet:
    """Check images ``x`` and labels ``y`` (called ``names`` in errors, e.g. x_train, y_train) and wrap them.

    Without ``classes`` the classes are 0..max label of the training split: ``train`` is that split when
    ``y`` are test labels, which must then be among its classes."""
    if classes is not None and len(classes) == 0:
        classes = None  # some files (foolbox_samples.npz) store an empty array for "no names"
    x, y = _checked(x, y, classes, *names, value_range)
    if classes is None and train is not None and y.max() >= train.num_classes:
        raise DataError(f"{names[1]}: label {y.max()} is not a class of the training split (its labels are "
                        f"0..{train.num_classes - 1}); fix the labels, or name every class in a classes array")
    if classes is None and train is None:
        present = np.unique(y)  # not bincount: a label of 10**9 would allocate 8 GB
        if len(present) <= y.max():
            missing = int(np.flatnonzero(present != np.arange(len(present)))[0])
            raise DataError(f"{names[1]}: labels go up to {y.max()} but class {missing} has no image; number the "
                            "classes 0..K-1 without gaps, or name every class in a classes array")
    class_names = tuple(str(c) for c in (classes if classes is not None else range(int(y.max()) + 1)))
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), class_names)


def _checked(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None, x_name: str, y_name: str,
             value_range: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, C, H, W] on 0..255 and labels as int64 [N], or a one-line DataError."""
    x, y = np.asarray(x), np.asarray(y)
    given = x.shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{x_name}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {given}")
    if x.size == 0:
        raise DataError(f"{x_name}: holds no images (shape {given}); give at least one image")
    if x.dtype.kind not in "buif":
        raise DataError(f"{x_name}: images must be numbers (uint8 0..255 or float 0..1), got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{x_name}: float images contain NaN or inf; replace them before loading")

    lo, hi = x.min().item(), x.max().item()
    if value_range is not None:
        x = _rescale(x, *value_range)
    elif x.dtype == np.uint8:
        # A uint8 array that never reaches 128 is almost surely on a smaller scale (scikit-learn's
        # digits are 0..16); used as 0..255 it would train on near-black images without a word.
        if hi < 128:
            raise DataError(f"{x_name}: uint8 images use only 0..{hi}, not 0..255; pass value_range=(0, {max(hi, 1)}) "
                            "to rescale them (or value_range=(0, 255) if they really are that dark)")
    elif x.dtype.kind == "f":
        if lo < 0 or hi > 1:
            # Rounded outwards: float pixels on 0..255 rarely hit 0 and 255 exactly.
            raise DataError(f"{x_name}: float images span {lo:g}..{hi:g}, not 0..1; pass value_range=(lo, hi), "
                            f"their nominal scale (e.g. ({np.floor(lo):g}, {np.ceil(hi):g})), to rescale them")
        x = _rescale(x, 0.0, 1.0)
    else:
        raise DataError(f"{x_name}: {x.dtype} images (values {lo}..{hi}) need value_range=(lo, hi) to be mapped "
                        f"to 0..255, e.g. value_range=({lo}, {hi}); or store them as uint8 0..255 or float 0..1")

    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # Keras stores labels as [N, 1]
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{y_name}: labels have shape {y.shape} but there are {len(x)} images; "
                        f"give one label per image, shape ({len(x)},)")
    if y.dtype.kind not in "buif":
        raise DataError(f"{y_name}: labels must be integers 0..K-1, got dtype {y.dtype}; "
                        "store class numbers and pass the names as a classes array")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise DataError(f"{y_name}: labels must be whole numbers, found {y[bad][0]:g}; store class numbers 0..K-1")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{y_name}: labels must be 0..K-1, found {y.min()}; renumber the classes from 0")
    if classes is not None and y.max() >= len(classes):
        raise DataError(f"{y_name}: largest label is {y.max()} but the classes array names only {len(classes)} "
                        f"classes (labels 0..{len(classes) - 1}); fix the labels or the classes array")
    return x, y


def _rescale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto uint8 0..255 (rounded, clipped)."""
    # float32, not float64: a full 60k-image set would otherwise take a 400 MB temporary.
    scaled = (x.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _from_npz(path: Path, value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    if not path.is_file():
        raise DataError(f"no file {path}: give an npz with x_train, y_train, x_test, y_test "
                        "(uint8 0..255 or float 0..1 images)")
    arrays = _read_npz(path, str(path))
    if "jpeg_train" in arrays:
        arrays = _decode_jpeg_npz(arrays, path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks arrays {missing}; it has {sorted(arrays)}")
    train = _imageset(arrays["x_train"], arrays["y_train"], arrays.get("classes"),
                      (f"{path}: x_train", f"{path}: y_train"), value_range)
    test = _imageset(arrays["x_test"], arrays["y_test"], arrays.get("classes"),
                     (f"{path}: x_test", f"{path}: y_test"), value_range, train=train)
    return train, test


def _decode_jpeg_npz(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Decode the JPEG-bytes layout (``jpeg_<split>``, ``offsets_<split>``, ``y_<split>``)."""
    missing = [f"{k}_{part}" for part in ("train", "test") for k in ("jpeg", "offsets", "y")
               if f"{k}_{part}" not in arrays]
    if missing:
        raise DataError(f"{path} (JPEG-bytes layout) lacks arrays {missing}; it has {sorted(arrays)}")
    out = {"classes": arrays["classes"]} if "classes" in arrays else {}
    for part in ("train", "test"):
        out[f"x_{part}"] = _decode_jpegs(arrays[f"jpeg_{part}"], arrays[f"offsets_{part}"], f"{path}: jpeg_{part}")
        out[f"y_{part}"] = arrays[f"y_{part}"]
    return out


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, what: str) -> np.ndarray:
    """The images [N, H, W, 3] uint8 whose JPEG files lie at ``blob[offsets[i]:offsets[i + 1]]``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision decodes a list in one call, about 3x faster than PIL image by image, to the same pixels
    # (both are libjpeg-turbo): on CIFAR-10 that is seconds saved by every run.
    data = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.uint8))
    files = [data[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]
    if not files:
        return np.zeros((0, 0, 0, 3), np.uint8)
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB)
    except RuntimeError:
        for i, file in enumerate(files):  # name the first file that does not decode
            try:
                decode_jpeg(file, mode=ImageReadMode.RGB)
            except RuntimeError as exc:
                raise DataError(f"{what} image {i} does not decode ({exc}); check its offsets") from None
        raise
    shapes = {tuple(image.shape) for image in decoded}
    if len(shapes) > 1:
        raise DataError(f"{what}: the images have different sizes {sorted(shapes)[:3]}; store one size")
    return torch.stack(decoded).permute(0, 2, 3, 1).numpy()


def _named_file(name: str, data_dir: str | Path | None) -> tuple[Path | None, Path | None, list[str]]:
    """The file of dataset ``name`` in ``data_dir`` (default ``$SPLITSHIELD_DATA``; a path ending in .npz is the
    file itself): (the file or ``None``, the folder looked in or ``None``, the paths tried)."""
    root = data_dir or os.environ.get("SPLITSHIELD_DATA")
    if root is None:
        return None, None, []
    root = Path(root)
    tried: list[str] = []
    for path in [root] if root.suffix == ".npz" else [root / f for f in _DATASETS[name].files]:
        tried.append(str(path))
        if path.is_file():
            return path, root, tried
    return None, root, tried


def _not_found(name: str, tried: list[str]) -> DataError:
    where = f"looked in: {', '.join(tried)}" if tried else "no --data-dir / $SPLITSHIELD_DATA given"
    return DataError(f"dataset {name!r} not found ({where}); provide {_DATASETS[name].how_to_get}")


def _from_named(name: str, data_dir: str | Path | None, download: bool,
                value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    path, root, tried = _named_file(name, data_dir)
    if path is not None:
        return _from_npz(path, value_range)
    if root is not None or download:
        found = _from_torchvision(name, root or Path.home() / ".cache" / "splitshield", download, value_range)
        if found is not None:
            return found
        tried.append(f"torchvision layout under {root}")
    raise _not_found(name, tried)


#: The AT&T faces' people each named set holds (1-based, as the files s1..s40 number them), and the mean and
#: standard deviation of its training images on [0, 1].
ATT_PEOPLE = {"att-faces": range(1, 41), "att-faces-first20": range(1, 21), "att-faces-last20": range(21, 41)}
_ATT_STATS = {"att-faces": (0.4413, 0.1945), "att-faces-first20": (0.4621, 0.2029),
              "att-faces-last20": (0.4206, 0.1833)}
#: Images 1-7 of each person train, 8-10 test (the usual protocol; the file defines no split).
ATT_TRAIN_IMAGES = 7


def _from_att_faces(name: str, data_dir: str | Path | None, download: bool,
                    value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    """AT&T (ORL) faces: 10 grey 112×92 images per person; the people of ``ATT_PEOPLE[name]``, relabelled 0..n-1."""
    path, _, tried = _named_file(name, data_dir)
    if path is None:
        raise _not_found(name, tried)
    arrays = _read_npz(path, str(path))
    missing = [k for k in ("x_all", "y_all", "image_index") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks arrays {missing}; it has {sorted(arrays)} (expected the AT&T faces layout)")
    x, y, index = arrays["x_all"], arrays["y_all"].reshape(-1), arrays["image_index"].reshape(-1)
    if x.ndim != 3 or not len(x) == len(y) == len(index):
        raise DataError(f"{path}: x_all must be [N, H, W] grey images with N entries in y_all and image_index; got "
                        f"{x.shape}, {len(y)} and {len(index)}")
    if len(index) and not (index.min() >= 1 and index.max() <= 10):
        raise DataError(f"{path}: image_index must number each person's images 1..10, got {index.min()}..{index.max()}")
    people = np.asarray(ATT_PEOPLE[name]) - 1
    keep = np.isin(y, people)
    x, y, index = x[keep], np.searchsorted(people, y[keep]), index[keep]
    names = arrays.get("classes")
    classes = names[people] if names is not None and len(names) > people.max() else None
    train_part = index <= ATT_TRAIN_IMAGES
    train = _imageset(x[train_part], y[train_part], classes, (f"{path}: x_all", f"{path}: y_all"), value_range)
    test = _imageset(x[~train_part], y[~train_part], classes, (f"{path}: x_all", f"{path}: y_all"), value_range,
                     train=train)
    return train, test


def _from_torchvision(name: str, root: Path, download: bool,
                      value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet] | None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _DATASETS[name].torchvision)
    try:
        parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError):
        return None
    sets = []
    for part, ds in zip(("train", "test"), parts, strict=True):
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        sets.append(_imageset(x, np.asarray(ds.targets), np.asarray(ds.classes),
                              (f"torchvision {name} {part} images", f"torchvision {name} {part} labels"), value_range))
    return sets[0], sets[1]


def _from_imagefolder(root: Path, value_range: tuple[float, float] | None = None) -> tuple[ImageSet, ImageSet]:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; images are decoded with Pillow."""
    from PIL import Image

    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"imagefolder {root} needs train/<class>/ and test/<class>/ subfolders of images")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    sets = []
    for part in ("train", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((root / part / cls).glob("*")):
                try:
                    with Image.open(f) as im:
                        xs.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
                except OSError as exc:
                    raise DataError(f"imagefolder {f}: not an image Pillow can read ({exc}); remove it") from None
                ys.append(label)
        if not xs:
            raise DataError(f"imagefolder {root / part} has no images")
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(f"imagefolder {root / part}: images differ in size {sorted(shapes)[:3]}; resize them first")
        where = f"imagefolder {root / part}"
        sets.append(_imageset(np.stack(xs), np.array(ys), np.array(classes), (where, where), value_range))
    return sets[0], sets[1]


def _from_path(read: Callable[[Path, tuple[float, float] | None], tuple[ImageSet, ImageSet]]) -> Loader:
    """A pattern's loader: ``read(Path(PATH), value_range)``; ``data_dir`` and ``download`` do not apply."""
    return lambda path, data_dir, download, value_range: read(Path(path), value_range)


# The datasets, in the order list_datasets() gives them. Normalisation: MNIST's, Fashion-MNIST's and
# CIFAR-10's published per-channel statistics (mnist-5k's agree with MNIST's to 1e-4).
_MNIST_STATS = ((0.1307,), (0.3081,))
register_dataset(DatasetInfo(name=BUILTIN, load=_load_builtin, image_shape=(1, 28, 28), num_classes=10,
                             normalization=_MNIST_STATS))
register_dataset(DatasetInfo(
    name="mnist", load=_from_named, image_shape=(1, 28, 28), num_classes=10, normalization=_MNIST_STATS,
    files=("mnist.npz",), torchvision="MNIST",
    how_to_get="an npz with x_train/y_train/x_test/y_test, or torchvision's MNIST folder; "
               "or load_dataset(..., download=True) where there is a network"))
register_dataset(DatasetInfo(
    name="fashion-mnist", load=_from_named, image_shape=(1, 28, 28), num_classes=10,
    normalization=((0.2860,), (0.3530,)), files=("fashion_mnist.npz", "fashion-mnist.npz"), torchvision="FashionMNIST",
    how_to_get="an npz with x_train/y_train/x_test/y_test (Debian: apt-get install dataset-fashion-mnist), "
               "or torchvision's FashionMNIST folder; or download=True"))
register_dataset(DatasetInfo(
    name="cifar10", load=_from_named, image_shape=(3, 32, 32), num_classes=10,
    normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    files=("cifar10.npz", "cifar10_jpegbytes.npz"), torchvision="CIFAR10", sorted_files=True,
    how_to_get="an npz with x_train/y_train/x_test/y_test, or torchvision's cifar-10-batches-py folder; "
               "or download=True"))
for _name, _people in ATT_PEOPLE.items():
    register_dataset(DatasetInfo(
        name=_name, load=_from_att_faces, image_shape=(1, 112, 92), num_classes=len(_people),
        normalization=((_ATT_STATS[_name][0],), (_ATT_STATS[_name][1],)), files=("att_faces.npz",), sorted_files=True,
        how_to_get="att_faces.npz with x_all [400, 112, 92] uint8, y_all (person 0-39) and image_index (1-10), "
                   "made from the AT&T (ORL) Database of Faces"))
del _name, _people
register_dataset(DatasetInfo(name="npz:PATH", load=_from_path(_from_npz), sorted_files=True))
register_dataset(DatasetInfo(name="imagefolder:PATH", load=_from_path(_from_imagefolder), sorted_files=True))


def _classes_in_turn(data: ImageSet) -> ImageSet:
    """``data`` as stored, or, when the file stores it sorted by class (CIFAR-10's JPEG copy, the faces), the
    same images taken from the classes in turn: the first image of each class, then the second of each, and so
    on. The first n test images (``test_n``, ``images: n``) are then every class's, not the first class's;
    within a class the file's order stays, and with it the first image of each class (``first_per_class``)."""
    labels = data.labels
    if len(labels) < 2 or not bool((labels[1:] >= labels[:-1]).all()):
        return data
    rank = torch.empty_like(labels)  # each image's place within its class
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    return data.subset(torch.argsort(rank * (int(labels.max()) + 1) + labels))


def _stratified_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in range(data.num_classes):
        idx = (data.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(len(idx) * fraction))
        hold.append(idx[:cut])
        keep.append(idx[cut:])
    # Shuffled, not in file order: some copies (CIFAR-10's) are sorted by class, and take(n) must be balanced.
    keep_all, hold_all = torch.cat(keep), torch.cat(hold)
    keep_all = keep_all[torch.randperm(len(keep_all), generator=g)]
    hold_all = hold_all[torch.randperm(len(hold_all), generator=g)]
    return data.subset(keep_all), data.subset(hold_all)
