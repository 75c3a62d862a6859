"""The attacker's auxiliary images from another dataset (aux ``other_distribution``): specs, the engine, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import splitshield as ss
from splitshield.cli import app
from splitshield.config import parse_spec
from splitshield.errors import ConfigError
from splitshield.experiment import plan, run_experiment
from splitshield.measure import attack_seed, fit_attack
from splitshield.store import ResultStore

SPEC = {
    "name": "other", "dataset": "mnist-5k", "model": "lenet", "splits": ["ReLU2"], "defenses": [{"name": "none"}],
    "train": {"epochs": 1, "train_n": 200}, "evaluation": {"test_n": 100},
}


@pytest.fixture
def bright_npz(tmp_path: Path) -> str:
    """An npz dataset of 40 training images, 20 px square, every pixel 200..255: nothing like a digit."""
    rng = np.random.default_rng(0)
    path = tmp_path / "bright.npz"
    np.savez(path, x_train=rng.integers(200, 256, (40, 20, 20), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(200, 256, (8, 20, 20), dtype=np.uint8), y_test=np.arange(8) % 4)
    return f"npz:{path}"


@pytest.mark.parametrize(("entry", "message"), [
    ({"aux": "other_distribution"}, "aux other_distribution needs aux_data"),
    ({"aux_data": "mnist-5k"}, "aux_data 'mnist-5k' is read only with aux: other_distribution"),
    ({"aux": "other_distribution", "aux_data": "no-such-set"}, "aux_data: "),
])
def test_spec_errors_name_the_field(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec({**SPEC, "attacks": [{"name": "inverse_network", **entry}]})


def test_settings_without_aux_data_keep_their_keys_and_seeds():
    spec = parse_spec({**SPEC, "attacks": [{"name": "inverse_network"},
                                           {"name": "inverse_network", "aux": "other_distribution",
                                            "aux_data": "mnist-5k"}]})
    plain, other = spec.attack_settings()
    assert "aux_data" not in plain and other["aux_data"] == "mnist-5k"
    # The seed of a setting without aux_data is the one it had before the field existed.
    legacy = {k: plain[k] for k in ("name", "threat", "aux", "aux_n", "adaptive", "params")}
    assert attack_seed(0, plain) == attack_seed(0, legacy) != attack_seed(0, other)
    assert [c.attack_label for c in plan(spec)] == ["inverse_network(aux=same_distribution)",
                                                    "inverse_network(aux=other_distribution:mnist-5k)"]


def test_the_attacker_holds_exactly_the_other_datasets_training_images(bright_npz):
    data = ss.load_dataset("mnist-5k")
    other = ss.load_dataset(bright_npz, holdout_fraction=0.0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=data.image_shape)
    setting = {"name": "inverse_network", "threat": "black_box", "aux": "other_distribution", "aux_n": None,
               "adaptive": True, "params": {"steps": 2}, "aux_data": bright_npz}
    fitted = fit_attack(target, None, data, setting, images=2, seed=0, other=other)
    aux = fitted.victim.aux
    assert aux.image_shape == (1, 28, 28) and len(aux) == len(other.train) == 40
    x, _ = aux.tensors()
    assert x.min() >= 190 / 255  # bright resized images, not digits (bilinear keeps them within 200..255)
    with pytest.raises(ConfigError, match="load the dataset aux_data names"):
        fit_attack(target, None, data, setting, images=2, seed=0)


def test_the_engine_loads_the_other_dataset_and_it_changes_the_attack(tmp_path, bright_npz):
    spec = parse_spec({**SPEC, "attacks": [{"name": "inverse_network", "steps": 20, "batch_size": 16},
                                           {"name": "inverse_network", "steps": 20, "batch_size": 16,
                                            "aux": "other_distribution", "aux_data": bright_npz}]})
    summary = run_experiment(spec, tmp_path / "r.db", progress=False)
    assert summary.failures == {}
    with ResultStore(tmp_path / "r.db") as store:
        psnr = {c["attack_label"]: c["metrics"]["psnr"] for c in store.cells()}
    same = psnr["inverse_network(aux=same_distribution)"]
    (other,) = [v for k, v in psnr.items() if k.startswith("inverse_network(aux=other_distribution:npz:")]
    assert other != same


def test_cli_attack_with_other_distribution(tmp_path, bright_npz):
    model = ss.build_model("lenet")
    ckpt = tmp_path / "m.safetensors"
    ss.save_checkpoint(ckpt, ss.split(model, "ReLU2", input_shape=(1, 28, 28)))
    runner = CliRunner()
    missing = runner.invoke(app, ["attack", str(ckpt), "--aux", "other_distribution"])
    assert missing.exit_code != 0 and "--aux other_distribution needs --aux-data NAME" in missing.output
    stray = runner.invoke(app, ["attack", str(ckpt), "--aux-data", "mnist-5k"])
    assert stray.exit_code != 0 and "--aux-data is read only with --aux other_distribution" in stray.output
    ok = runner.invoke(app, ["attack", str(ckpt), "--aux", "other_distribution", "--aux-data", bright_npz,
                             "--options", '{"steps": 5, "batch_size": 8}'])
    assert ok.exit_code == 0, ok.output
    assert "PSNR" in ok.output
