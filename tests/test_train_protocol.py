"""CEM's official training protocol (Trainer(protocol="cem_official")): its schedule against the official 240-epoch
table, CEM's learning-rate factor under it, the best late epoch chosen on held-out images, exact resumption and
determinism, and the spec and engine path to it. The default protocol keeps its spec hashes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from splitshield import Trainer, load_checkpoint, split
from splitshield.config import TrainSpec, load_spec, parse_spec
from splitshield.data import ImageSet
from splitshield.defenses import CEM, Defense, GaussianNoise
from splitshield.errors import CheckpointError, ConfigError
from splitshield.experiment import plan, run_experiment
from splitshield.models import build_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cem_official_protocol.yaml"
#: The official run (xiasong0501/CEM run_exp.sh, model_training_paral_pruning.py): lr 0.05, × 0.2 at these of its
#: 240 epochs (its fifth milestone, 260, is never reached); the checkpoint is the best after epoch 200.
OFFICIAL_LR, OFFICIAL_MILESTONES, OFFICIAL_EPOCHS = 0.05, (60, 120, 180, 210), 240


def official_lr(position: float) -> float:
    """The official run's learning rate after ``position`` of its 240 epochs (past the warm-up)."""
    return OFFICIAL_LR * 0.2 ** sum(position >= m for m in OFFICIAL_MILESTONES)


class Recording(CEM):
    """CEM that notes, at every training step, the optimiser's learning rate and its own λ factor."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list[tuple[float, float, bool]] = []  # (lr, factor, clustered yet)

    def regularizer(self, x, y, z, z_sent, logits):
        optimizer = self._optimizer_ref()
        self.steps.append((optimizer.param_groups[0]["lr"], self.schedule_factor(), self.centroids is not None))
        return super().regularizer(x, y, z, z_sent, logits)


@pytest.fixture(scope="module")
def digits(mnist5k) -> ImageSet:
    return mnist5k.train.take(200)


def _trainer(data_shape, defense: Defense | None = None, epochs: int = 12, checkpoint_dir: Path | None = None,
             seed: int = 0, batch_size: int = 32) -> Trainer:
    target = split(build_model("lenet", seed=seed), "ReLU2", input_shape=data_shape)
    return Trainer(target, defense, epochs=epochs, batch_size=batch_size, protocol="cem_official", seed=seed,
                   progress=False, checkpoint_dir=checkpoint_dir)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in trainer.target.state_dict().items()},
            **{f"defense.{k}": v for k, v in trainer.defense.state_dict().items()}}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Killed(Exception):
    pass


def _kill_after(trainer: Trainer, epoch: int, snapshots: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    """Make ``trainer`` die right after writing its checkpoint of ``epoch`` (and note each epoch's model)."""
    save = trainer.save

    def save_then_maybe_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if snapshots is not None:
            snapshots[trainer.epoch] = {k: v.clone() for k, v in _state(trainer).items()}
        if trainer.epoch == epoch:
            raise Killed
        return path

    trainer.save = save_then_maybe_die


def test_schedule_is_the_official_one_compressed_and_cem_factor_follows_it(mnist5k, one_thread):
    # 300 images, 10 % held out: 270 trained on in 34 batches of 8, 8 epochs = 272 steps, so the warm-up (1/240 of
    # the steps) takes 2 of them.
    cem = Recording(lam=16.0)
    trainer = _trainer(mnist5k.image_shape, GaussianNoise(0.1) + cem, epochs=8, batch_size=8)
    trainer.fit(mnist5k.train.take(300))
    lrs = [lr for lr, _, _ in cem.steps]
    assert len(lrs) == 272 and len(trainer.train_data) == 270 and len(trainer.val_data) == 30
    assert lrs[:2] == pytest.approx([0.025, 0.05])  # the linear warm-up
    assert lrs[2:] == pytest.approx([official_lr(OFFICIAL_EPOCHS * s / 272) for s in range(2, 272)], rel=1e-12)
    assert lrs[-1] == pytest.approx(8e-5)
    # Each stage lasts its share of the official run: 60, 60, 60, 30 and 30 of 240 epochs.
    stages = Counter(round(lr, 10) for lr in lrs[2:])
    assert [stages[round(v, 10)] for v in (0.05, 0.01, 0.002, 4e-4, 8e-5)] == [66, 68, 68, 34, 34]
    # CEM's factor is the official one of each stage, read from the optimiser at every step once it has clusters.
    factors = {round(lr, 10): factor for lr, factor, clustered in cem.steps if clustered}
    assert factors == pytest.approx({0.05: 0.02, 0.01: 0.1, 0.002: 0.5, 0.0004: 1.0, 0.00008: 1.0})
    assert all(not clustered for _, _, clustered in cem.steps[:34])  # the first epoch, warm-up included


def test_the_best_late_epoch_is_kept_on_held_out_images(digits, tmp_path, one_thread):
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    trainer = _trainer(digits.image_shape, epochs=12, checkpoint_dir=tmp_path)
    _kill_after(trainer, epoch=-1, snapshots=snapshots)  # never dies: notes every epoch's model
    history = trainer.fit(digits)
    # The held-out images are a tenth of the set, never trained on.
    seen = Counter(bytes(img.numpy()) for img in trainer.train_data.images)
    held = Counter(bytes(img.numpy()) for img in trainer.val_data.images)
    assert len(trainer.val_data) == 20 and seen + held == Counter(bytes(img.numpy()) for img in digits.images)
    # Validated only after 200/240 of the run: epochs 11 and 12 of 12; the first best is kept.
    validated = {row["epoch"]: row["val_accuracy"] for row in history if "val_accuracy" in row}
    assert list(validated) == [11, 12]
    best = max(validated.values())
    assert trainer.selected_epoch == min(e for e, a in validated.items() if a == best)
    assert _same(_state(trainer), snapshots[trainer.selected_epoch])
    assert trainer.evaluate(trainer.val_data) == best


@pytest.mark.parametrize("killed_after", [5, 11, 12])
def test_a_resumed_run_ends_with_the_uninterrupted_model(digits, tmp_path, killed_after, one_thread):
    """Killed before the selection window, inside it (a best so far to carry over) and after the last epoch's
    checkpoint but before the best model was restored."""
    def defense():
        return GaussianNoise(0.1) + CEM(lam=16.0)

    full = _trainer(digits.image_shape, defense())
    full.fit(digits)
    first = _trainer(digits.image_shape, defense(), checkpoint_dir=tmp_path)
    _kill_after(first, killed_after)
    with pytest.raises(Killed):
        first.fit(digits)
    resumed = _trainer(digits.image_shape, defense(), checkpoint_dir=tmp_path)
    resumed.fit(digits, resume=True)
    assert resumed.selected_epoch == full.selected_epoch is not None
    assert resumed.history == full.history
    assert _same(_state(resumed), _state(full))


def test_same_seed_same_model_another_seed_another(digits, one_thread):
    a, b, c = (_trainer(digits.image_shape, epochs=3, seed=s) for s in (0, 0, 1))
    for trainer in (a, b, c):
        trainer.fit(digits)
    assert _same(_state(a), _state(b)) and a.selected_epoch == b.selected_epoch == 3
    assert not _same(_state(a), _state(c))
    assert not torch.equal(a.val_data.images, c.val_data.images)  # the held-out draw follows the seed


def test_bad_settings_are_one_line(digits, tmp_path):
    target = split(build_model("lenet"), "ReLU2", input_shape=digits.image_shape)
    with pytest.raises(ConfigError, match="protocol must be one of default, cem_official"):
        Trainer(target, protocol="sgd")
    with pytest.raises(ConfigError, match="lr_halve_every .* remove it"):
        Trainer(target, protocol="cem_official", lr_halve_every=2)
    with pytest.raises(ConfigError, match=r"val_fraction must be a share .* in \(0, 1\)"):
        Trainer(target, protocol="cem_official", val_fraction=1.0)
    with pytest.raises(ConfigError, match="holds out 0"):
        Trainer(target, protocol="cem_official", progress=False).fit(digits.take(3))
    # A checkpoint of one protocol does not resume under another (Adam's moments are not SGD's momentum).
    default = Trainer(target, epochs=1, progress=False, checkpoint_dir=tmp_path)
    default.fit(digits.take(40))
    again = split(build_model("lenet"), "ReLU2", input_shape=digits.image_shape)
    with pytest.raises(CheckpointError, match="trained with protocol 'default'"):
        Trainer(again, epochs=2, protocol="cem_official", progress=False, checkpoint_dir=tmp_path).fit(
            digits.take(40), resume=True)


def test_specs_name_the_protocol_and_default_specs_keep_their_hashes():
    # The default protocol dumps exactly the fields it had before protocols: its targets' and cells' hashes stay.
    assert TrainSpec().model_dump() == {"epochs": 2, "batch_size": 64, "lr": 1e-3, "lr_halve_every": None,
                                        "tail_epochs": 0, "train_n": None}
    official = TrainSpec(protocol="cem_official")
    assert official.lr == 0.05 and official.model_dump()["protocol"] == "cem_official"
    assert TrainSpec(protocol="cem_official", lr=0.01).lr == 0.01
    with pytest.raises(ConfigError, match="spec field train: lr_halve_every is the default protocol's schedule"):
        parse_spec({"dataset": "mnist-5k", "splits": ["ReLU2"], "attacks": [{"name": "rmle"}],
                    "train": {"protocol": "cem_official", "lr_halve_every": 2}})
    # The example: LeNet on MNIST, four noise levels with and without CEM, three seeds, all under the protocol.
    cells = plan(load_spec(EXAMPLE))
    targets = {c.target_hash: c.config for c in cells}
    assert len(targets) == (1 + 4 + 4) * 3
    assert {c["train"]["protocol"] for c in targets.values()} == {"cem_official"}
    assert {c["seed"] for c in targets.values()} == {0, 1, 2}


def test_the_engine_trains_with_the_protocol(mnist5k, tmp_path, one_thread):
    spec = parse_spec({"dataset": "mnist-5k", "splits": ["ReLU2"], "attacks": [{"name": "rmle", "iters": 1}],
                       "train": {"epochs": 2, "train_n": 100, "protocol": "cem_official"},
                       "evaluation": {"metrics": ["accuracy"], "test_n": 50}})
    run_experiment(spec, tmp_path / "results.db", progress=False)
    (cached,) = (tmp_path / "artifacts" / "targets").glob("*.safetensors")
    target, _, meta = load_checkpoint(cached)
    assert meta["target_config"]["train"]["protocol"] == "cem_official"
    direct = _trainer(mnist5k.image_shape, epochs=2, batch_size=64)
    direct.fit(mnist5k.train.take(100))
    assert _same({f"model.{k}": v for k, v in target.state_dict().items()},
                 {f"model.{k}": v for k, v in direct.target.state_dict().items()})
