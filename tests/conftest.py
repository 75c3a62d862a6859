"""Shared fixtures: the real data folder beside the repo, and a small trained LeNet."""

from __future__ import annotations

from pathlib import Path

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
