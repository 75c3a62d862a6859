"""Shared fixtures: the real data folder beside the repo, real images in it (tests/data), a small trained LeNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist.npz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist5k():
    import splitshield as ss

    return ss.load_dataset("mnist-5k")


@pytest.fixture
def one_thread():
    """Tiny convolutions: on a busy 2-core machine, a second OpenMP thread makes them ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_lenet(mnist5k):
    """LeNet trained 2 epochs on the built-in digits (about 90 % accuracy): the uncut model."""
    import splitshield as ss

    torch.set_num_threads(1)
    model = ss.build_model("lenet")
    target = ss.split(model, "ReLU2", input_shape=mnist5k.image_shape)
    ss.Trainer(target, epochs=2, seed=0, progress=False).fit(mnist5k.train)
    return model


TEST_IMAGES = Path(__file__).resolve().parent / "data" / "images.npz"


@pytest.fixture(scope="session")
def real_images(mnist5k) -> dict[str, np.ndarray]:
    """Real images in the repository, uint8: ``mnist`` [20, 28, 28], two digits of each class from the
    built-in digits' test split, and ``cifar10`` [10, 32, 32, 3], CIFAR-10 test images 0-9
    (tests/data/README.md). No skip: a fresh clone has both."""
    labels = mnist5k.test.labels
    picks = torch.cat([(labels == c).nonzero().flatten()[:2] for c in range(10)])
    mnist = mnist5k.test.images[picks, 0].numpy()
    with np.load(TEST_IMAGES, allow_pickle=False) as data:
        cifar10 = data["x_cifar10"]
    assert mnist.shape == (20, 28, 28) and cifar10.shape == (10, 32, 32, 3)
    assert mnist.dtype == cifar10.dtype == np.uint8
    return {"mnist": mnist, "cifar10": cifar10}
