"""Datasets: the built-in digits, real files, the attacker's splits, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import splitshield as ss
from splitshield.errors import DataError


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
