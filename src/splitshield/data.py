"""Datasets: a registry of named image datasets, the victim/attacker splits, and batching.

Images are stored as uint8 NCHW tensors and handed out as float tensors in [0, 1]. Every dataset is
split three ways:

- ``train`` — what the target model is trained on (the *same set* an attacker may hold);
- ``holdout`` — a disjoint part of the official training split the target never sees (the attacker's
  *same distribution* data);
- ``test`` — the official test split, where attacks and accuracy are evaluated.

Names: ``mnist-5k`` (built in, shipped with the package), ``mnist``, ``fashion-mnist``, ``cifar10``
(from ``--data-dir`` / ``$SPLITSHIELD_DATA``: an npz file or a torchvision-layout folder; torchvision
download as a fallback when ``download=True``), ``npz:PATH`` and ``imagefolder:PATH``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

BUILTIN = "mnist-5k"
NAMED = ("mnist", "fashion-mnist", "cifar10")
_FILES = {
    "mnist": ("mnist.npz",),
    "fashion-mnist": ("fashion_mnist.npz", "fashion-mnist.npz"),
    "cifar10": ("cifar10.npz", "cifar10_jpegbytes.npz"),
}
_HOW_TO_GET = {
    "mnist": "an npz with x_train/y_train/x_test/y_test, or torchvision's MNIST folder; "
    "or load_dataset(..., download=True) where there is a network",
    "fashion-mnist": "an npz with x_train/y_train/x_test/y_test (Debian: apt-get install dataset-fashion-mnist), "
    "or torchvision's FashionMNIST folder; or download=True",
    "cifar10": "an npz with x_train/y_train/x_test/y_test, or torchvision's cifar-10-batches-py folder; "
    "or download=True",
}


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

    def first_per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """He et al.'s evaluation protocol: the first image of each class, in class order."""
        index = [int((self.labels == c).nonzero()[0]) for c in range(self.num_classes) if (self.labels == c).any()]
        return self.subset(index).tensors()

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
            labels; He et al.'s "rand set"), or ``other_distribution`` (the images of ``other``,
            converted to this dataset's image shape).
        n:
            Keep at most this many images.
        """
        if kind == "same_set":
            pool = self.train
        elif kind == "same_distribution":
            pool = self.holdout
        elif kind == "noise":
            count = n if n is not None else len(self.holdout)
            pool = noise_images(count, self.image_shape, self.train.classes, seed)
        elif kind == "other_distribution":
            if other is None:
                raise DataError("aux kind 'other_distribution' needs other=<ImageSet of another dataset>")
            pool = conform(other, self.image_shape)
        else:
            raise DataError(
                f"aux kind {kind!r} unknown; use same_set, same_distribution, noise or other_distribution"
            )
        return pool if n is None else pool.take(n)


def noise_images(n: int, shape: tuple[int, int, int], classes: tuple[str, ...], seed: int = 0) -> ImageSet:
    """``n`` Gaussian-noise images N(0.5, 0.5²) clipped to [0, 1], with uniformly random labels."""
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + 0.5 * torch.randn(n, *shape, generator=g)).clamp(0, 1)
    labels = torch.randint(len(classes), (n,), generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), labels, classes)


def conform(images: ImageSet, shape: tuple[int, int, int]) -> ImageSet:
    """Resize (bilinear) and convert channels (grey <-> RGB) so every image has ``shape`` (C, H, W)."""
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
# loading


def load_dataset(name: str = BUILTIN, data_dir: str | Path | None = None, holdout_fraction: float = 0.25,
                 seed: int = 0, download: bool = False) -> Dataset:
    """Load a dataset by name and split its training part into target ``train`` and attacker ``holdout``.

    Parameters
    ----------
    name:
        ``mnist-5k``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``npz:PATH`` or ``imagefolder:PATH``.
    data_dir:
        Where ``mnist``/``fashion-mnist``/``cifar10`` files live; default ``$SPLITSHIELD_DATA``.
    holdout_fraction:
        Fraction of the training split kept from the target, stratified per class.
    download:
        Let torchvision download a named dataset when no local copy is found (needs a network).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    train, test = _load_raw(name, data_dir, download)
    fit, holdout = _stratified_split(train, holdout_fraction, seed)
    return Dataset(name, fit, holdout, test)


def _load_raw(name: str, data_dir: str | Path | None, download: bool) -> tuple[ImageSet, ImageSet]:
    if name == BUILTIN:
        with resources.files("splitshield").joinpath("_data/mnist_5k.npz").open("rb") as fh:
            arrays = _read_npz(io.BytesIO(fh.read()), "built-in mnist-5k")
        full = _imageset(arrays["x_train"], arrays["y_train"], arrays.get("classes"))
        # The file is sorted by digit; a fixed shuffle gives it MNIST's mixed order, so take(n) is balanced.
        full = full.subset(torch.randperm(len(full), generator=torch.Generator().manual_seed(5000)))
        # mnist-5k has no test split: the last 100 images of each digit are its test set.
        test_idx = torch.cat([(full.labels == c).nonzero().flatten()[-100:] for c in range(10)])
        mask = torch.ones(len(full), dtype=torch.bool)
        mask[test_idx] = False
        return full.subset(mask.nonzero().flatten()), full.subset(test_idx.sort().values)
    if name.startswith("npz:"):
        return _from_npz(Path(name[4:]))
    if name.startswith("imagefolder:"):
        return _from_imagefolder(Path(name[len("imagefolder:"):]))
    if name in NAMED:
        return _from_named(name, data_dir, download)
    raise DataError(
        f"dataset {name!r} unknown; use {BUILTIN} (built in), {', '.join(NAMED)}, npz:PATH or imagefolder:PATH"
    )


def _read_npz(source, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{label}: not a readable npz without pickled objects ({exc})") from None


def _imageset(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> ImageSet:
    if x.dtype != np.uint8:
        raise DataError(f"images must be uint8 in 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {x.shape}")
    labels = torch.from_numpy(np.asarray(y).astype(np.int64))
    names = tuple(str(c) for c in classes) if classes is not None else tuple(
        str(c) for c in range(int(labels.max()) + 1)
    )
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), labels, names)


def _from_npz(path: Path) -> tuple[ImageSet, ImageSet]:
    if not path.is_file():
        raise DataError(f"no file {path}: give an npz with x_train, y_train, x_test, y_test (uint8 images)")
    arrays = _read_npz(path, str(path))
    if "jpeg_train" in arrays:
        arrays = _decode_jpeg_npz(arrays)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks arrays {missing}; it has {sorted(arrays)}")
    classes = arrays.get("classes")
    train = _imageset(arrays["x_train"], arrays["y_train"], classes)
    return train, _imageset(arrays["x_test"], arrays["y_test"], classes)


def _decode_jpeg_npz(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the JPEG-bytes layout (``jpeg_<split>``, ``offsets_<split>``, ``y_<split>``)."""
    from PIL import Image

    out = {"classes": arrays["classes"]} if "classes" in arrays else {}
    for part in ("train", "test"):
        blob, off = arrays[f"jpeg_{part}"], arrays[f"offsets_{part}"]
        images = [np.asarray(Image.open(io.BytesIO(blob[off[i]: off[i + 1]].tobytes())).convert("RGB"))
                  for i in range(len(off) - 1)]
        out[f"x_{part}"], out[f"y_{part}"] = np.stack(images), arrays[f"y_{part}"]
    return out


def _from_named(name: str, data_dir: str | Path | None, download: bool) -> tuple[ImageSet, ImageSet]:
    root = data_dir or os.environ.get("SPLITSHIELD_DATA")
    tried: list[str] = []
    if root is not None:
        root = Path(root)
        candidates = [root] if root.suffix == ".npz" else [root / f for f in _FILES[name]]
        for path in candidates:
            tried.append(str(path))
            if path.is_file():
                return _from_npz(path)
    if root is not None or download:
        found = _from_torchvision(name, root or Path.home() / ".cache" / "splitshield", download)
        if found is not None:
            return found
        tried.append(f"torchvision layout under {root}")
    where = f"looked in: {', '.join(tried)}" if tried else "no --data-dir / $SPLITSHIELD_DATA given"
    raise DataError(f"dataset {name!r} not found ({where}); provide {_HOW_TO_GET[name]}")


def _from_torchvision(name: str, root: Path, download: bool) -> tuple[ImageSet, ImageSet] | None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError):
        return None
    sets = []
    for ds in parts:
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        sets.append(_imageset(x.astype(np.uint8), np.asarray(ds.targets), np.asarray(ds.classes)))
    return sets[0], sets[1]


def _from_imagefolder(root: Path) -> tuple[ImageSet, ImageSet]:
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
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
                ys.append(label)
        if not xs:
            raise DataError(f"imagefolder {root / part} has no images")
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(f"imagefolder {root / part}: images differ in size {sorted(shapes)[:3]}; resize them first")
        sets.append(_imageset(np.stack(xs), np.array(ys), np.array(classes)))
    return sets[0], sets[1]


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
