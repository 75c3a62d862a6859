"""Resuming training: a run stopped after epoch 1 and resumed ends with exactly the weights (and the
defense's training state) of an uninterrupted run, because the defense's training state is checkpointed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitshield import Trainer, split
from splitshield.data import ImageSet
from splitshield.defenses import CEM, AdversarialReconstruction, Defense, GaussianNoise, InfoScissors, Shredder
from splitshield.defenses.base import optimizer_tensors
from splitshield.errors import ConfigError
from splitshield.models import build_model

DEFENSES: dict[str, Callable[[], Defense]] = {
    # σ = 0.1: the clusters' variances after one epoch on 200 digits are above the hinge τσ², so CEM pulls.
    "cem": lambda: GaussianNoise(0.1) + CEM(lam=16),
    # MSE: always active (an SSIM penalty is 0 while the young decoder's SSIM is under its threshold).
    "adversarial": lambda: AdversarialReconstruction(alpha=1.0, metric="mse"),
    "infoscissors": lambda: InfoScissors(lam=1.0),
    "shredder": lambda: Shredder((16, 8, 8), lam=0.1),
}


@pytest.fixture(scope="module")
def digits(mnist5k) -> ImageSet:
    return mnist5k.train.take(200)


def _train(data: ImageSet, defense: Defense, epochs: int, checkpoint_dir: Path | None = None,
           resume: bool = False) -> Trainer:
    # lr 4e-3 halved after epoch 1: CEM's λ schedule then depends on the epoch's learning rate (s = 0.5).
    target = split(build_model("lenet"), "ReLU2", input_shape=data.image_shape)
    trainer = Trainer(target, defense, epochs=epochs, batch_size=32, lr=4e-3, lr_halve_every=1, seed=0,
                      progress=False, checkpoint_dir=checkpoint_dir)
    trainer.fit(data, resume=resume)
    return trainer


def _everything(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor training produced: the model, the defense's parameters, the optimiser, the training state."""
    return {**{f"model.{k}": v for k, v in trainer.target.state_dict().items()},
            **{f"defense.{k}": v for k, v in trainer.defense.state_dict().items()},
            **{f"optim.{k}": v for k, v in optimizer_tensors(trainer.optimizer).items()},
            **{f"train_state.{k}": v for k, v in trainer.defense.training_state().items()}}


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors are not identical, or present on one side only."""
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


@pytest.mark.parametrize("name", DEFENSES)
def test_resumed_training_equals_uninterrupted(name, digits, tmp_path, one_thread):
    make = DEFENSES[name]
    full = _train(digits, make(), epochs=2)
    _train(digits, make(), epochs=1, checkpoint_dir=tmp_path)  # killed after epoch 1
    saved = load_file(tmp_path / "last.safetensors")
    resumed = _train(digits, make(), epochs=2, checkpoint_dir=tmp_path, resume=True)  # fresh model and defense
    assert resumed.epoch == 2 and [row["epoch"] for row in resumed.history] == [1, 2]
    assert _differences(_everything(full), _everything(resumed)) == []
    state = full.defense.training_state()
    if name == "shredder":  # all its state is parameters (defense.*) and their Adam moments (optim.*)
        assert state == {} and any(k.startswith("defense.") for k in saved)
    else:
        assert state and {k for k in saved if k.startswith("train_state.")} == {f"train_state.{k}" for k in state}
    if name == "cem":
        assert {"train_state.parts.1.centroids", "train_state.parts.1.hinge_sigma"} <= set(saved)


@pytest.mark.parametrize("name", ["cem", "adversarial"])
def test_without_the_defense_state_resuming_diverges(name, digits, tmp_path, one_thread):
    # The comparison above can fail: resume from a checkpoint stripped of its train_state.* tensors.
    make = DEFENSES[name]
    full = _train(digits, make(), epochs=2)
    _train(digits, make(), epochs=1, checkpoint_dir=tmp_path)
    tensors = load_file(tmp_path / "last.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("train_state.")}, tmp_path / "last.safetensors")
    resumed = _train(digits, make(), epochs=2, checkpoint_dir=tmp_path, resume=True)
    differences = _differences(_everything(full), _everything(resumed))
    assert any(k.startswith("model.") for k in differences)
    assert any(k.startswith("train_state.") for k in differences)


class _Forgetful(Defense):
    """Counts the batches it saw in a plain attribute, which it does not export."""

    name = "forgetful"
    resumable = False

    def __init__(self):
        super().__init__()
        self.batches = 0

    def regularizer(self, x, y, z, z_sent, logits):
        self.batches += 1
        return None


def test_resuming_a_defense_that_cannot_save_its_state_is_refused(mnist5k, tmp_path, one_thread):
    data = mnist5k.train.take(64)
    assert GaussianNoise(0.1).resumable and (GaussianNoise(0.1) + CEM()).resumable
    assert not (GaussianNoise(0.1) + _Forgetful()).resumable
    _train(data, GaussianNoise(0.1) + _Forgetful(), epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"defense.parts\[1\] \(forgetful\): cannot resume") as err:
        _train(data, GaussianNoise(0.1) + _Forgetful(), epochs=2, checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(err.value) and "resume=False" in str(err.value)
    # Training from the start is still allowed, and so is resume=True with no checkpoint to resume from.
    assert _train(data, _Forgetful(), epochs=1, checkpoint_dir=tmp_path / "new", resume=True).epoch == 1
