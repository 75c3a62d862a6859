"""Experiment specs: grids expand to the right settings, and every mistake is one line naming field and fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from splitshield.attacks import ATTACKS
from splitshield.config import expand_grid, load_spec, parse_spec
from splitshield.defenses import DEFENSES, Defense
from splitshield.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE = {"dataset": "mnist-5k", "splits": ["ReLU2"], "attacks": [{"name": "black_box", "steps": 5}]}


class Scale(Defense):
    """A test defense with two parameters: z * factor + shift."""

    name = "scale_for_test"

    def __init__(self, factor: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.factor, self.shift = factor, shift

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z * self.factor + self.shift

    def config(self) -> dict:
        return {"name": self.name, "factor": self.factor, "shift": self.shift}


@pytest.fixture
def scale_registered(monkeypatch):
    monkeypatch.setitem(DEFENSES, Scale.name, Scale)


def test_expand_grid_is_the_cartesian_product_in_key_order():
    assert expand_grid({"a": [1, 2], "b": 3, "c": ["x", "y"]}) == [
        {"a": 1, "b": 3, "c": "x"}, {"a": 1, "b": 3, "c": "y"}, {"a": 2, "b": 3, "c": "x"}, {"a": 2, "b": 3, "c": "y"}]
    assert expand_grid({"a": 1}) == [{"a": 1}]
    assert expand_grid({}) == [{}]


def test_defense_grid_and_compose_expand_to_every_setting(scale_registered):
    spec = parse_spec({**BASE, "defenses": [
        {"name": "none"},
        {"name": "scale_for_test", "factor": [0.1, 0.5, 1.0]},
        {"name": "compose", "parts": [{"name": "scale_for_test", "factor": [1, 2]},
                                      {"name": "scale_for_test", "shift": [0.0, 0.1, 0.2]}]},
    ]})
    settings = spec.defense_settings()
    assert settings[0] == {"name": "none"}
    assert [s["factor"] for s in settings[1:4]] == [0.1, 0.5, 1.0]
    composed = settings[4:]
    assert len(composed) == 2 * 3
    assert composed[0] == {"name": "compose", "parts": [{"name": "scale_for_test", "factor": 1},
                                                        {"name": "scale_for_test", "shift": 0.0}]}


def test_attack_grid_and_default_threats():
    spec = parse_spec({**BASE, "attacks": [{"name": "black_box", "steps": [5, 10]}, {"name": "white_box"},
                                           {"name": "query_free"}, {"name": "model_completion"}]})
    settings = spec.attack_settings()
    assert [s["params"] for s in settings[:2]] == [{"steps": 5}, {"steps": 10}]
    assert [s["threat"] for s in settings] == ["black_box", "black_box", "white_box", "query_free", "black_box"]
    assert all(s["aux"] == "same_distribution" for s in settings)


@pytest.mark.parametrize("change, expected", [
    ({"attacks": [{"name": "deep_leak"}]}, ["attacks[0].name", "'deep_leak'", *sorted(ATTACKS)]),
    ({"defenses": [{"name": "magic"}]}, ["defenses[0].name", "'magic'", "none", "compose"]),
    ({"attacks": [{"name": "black_box", "threat": "grey_box"}]},
     ["attacks[0].threat", "'grey_box'", "white_box", "black_box", "query_free"]),
    ({"attacks": [{"name": "white_box", "threat": "black_box"}]}, ["attacks[0]", "rmle", "white_box", "'black_box'"]),
    ({"attacks": [{"name": "black_box", "aux": "internet"}]}, ["attacks[0].aux", "'internet'", "same_set", "noise"]),
    ({"attacks": [{"name": "black_box", "stepz": 3}]}, ["attacks[0].stepz", "inverse_network", "steps"]),
    ({"attacks": [{"name": "inverse_network", "steps": 0}]}, ["attacks[0]", "steps", "0"]),
    ({"attacks": [{"name": "black_box", "seed": 3}]}, ["attacks[0]", "seed", "set by the experiment"]),
    ({"dataset": "svhn"}, ["dataset", "'svhn'", "mnist-5k", "npz:PATH"]),
    ({"model": "resnet9000"}, ["model", "'resnet9000'", "lenet"]),
    ({"seeds": [1, 1]}, ["seeds", "[1, 1]", "distinct"]),
    ({"train": {"epochs": 0}}, ["train.epochs", "0", "greater than or equal to 1"]),
    ({"evaluation": {"images": 0}}, ["evaluation.images", "first_per_class"]),
    ({"evaluation": {"metrics": ["psnr", "lpips"]}}, ["evaluation.metrics[1]", "'lpips'", "ssim"]),
    ({"device": "tpu"}, ["device", "'tpu'", "cuda"]),
    ({"colour": "blue"}, ["colour", "unknown field"]),
    ({"defenses": [{"name": "compose"}]}, ["defenses[0]", "compose needs parts"]),
])
def test_bad_spec_is_one_line_naming_field_value_and_allowed(change, expected):
    with pytest.raises(ConfigError) as info:
        parse_spec({**BASE, **change})
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} missing from: {message}"


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"^spec field splits: required but missing$"):
        parse_spec({"dataset": "mnist-5k", "attacks": [{"name": "black_box"}]})


def test_unknown_defense_lists_newly_registered_names(scale_registered):
    with pytest.raises(ConfigError, match="scale_for_test"):
        parse_spec({**BASE, "defenses": [{"name": "nope"}]})


def test_bad_defense_parameter_fails_at_load(scale_registered):
    with pytest.raises(ConfigError, match=r"defenses\[0\].*colour"):
        parse_spec({**BASE, "defenses": [{"name": "scale_for_test", "colour": [1, 2]}]})


def test_yaml_and_toml_give_the_same_spec(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "dataset: mnist-5k\nsplits: [ReLU2]\nattacks:\n  - {name: black_box, steps: [5, 10]}\ntrain: {epochs: 1}\n")
    (tmp_path / "s.toml").write_text(
        'dataset = "mnist-5k"\nsplits = ["ReLU2"]\n[[attacks]]\nname = "black_box"\nsteps = [5, 10]\n'
        "[train]\nepochs = 1\n")
    assert load_spec(tmp_path / "s.yaml") == load_spec(tmp_path / "s.toml")


def test_load_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        load_spec(tmp_path / "s.json")


def test_relative_data_dir_is_resolved_against_the_spec_file(tmp_path):
    (tmp_path / "s.yaml").write_text("dataset: mnist\ndata_dir: data\nsplits: [ReLU2]\nattacks: [{name: white_box}]\n")
    assert load_spec(tmp_path / "s.yaml").data_dir == str((tmp_path / "data").resolve())


EXAMPLE_SPECS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".toml"))


def test_the_examples_are_found():
    """An empty glob would make the test below an empty parameter set, which pytest skips."""
    assert {"mnist_3x4x3.yaml", "noise_sweep.toml"} <= {p.name for p in EXAMPLE_SPECS}


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_examples_validate(path, monkeypatch):
    """Every example loads and plans (each split point checked on its model) without any data: a fresh clone
    validates them all."""
    import splitshield.experiment as experiment

    def no_data(*args, **kwargs):
        raise AssertionError(f"validating {path.name} loaded data: {args}")

    monkeypatch.setattr(experiment, "_load_data", no_data)
    monkeypatch.setenv("SPLITSHIELD_DATA", str(path.parent / "no-such-data-dir"))
    if path.suffix == ".toml" and sys.version_info < (3, 11):
        with pytest.raises(ConfigError, match="TOML specs need Python >= 3.11"):
            load_spec(path)
        return
    spec = load_spec(path)
    defenses, attacks = spec.defense_settings(), spec.attack_settings()
    assert defenses and attacks
    cells = experiment.plan(spec)
    assert len(cells) == (len(spec.dataset) * len(spec.model) * len(spec.splits) * len(defenses) * len(spec.seeds)
                          * len(attacks))
    assert len({c.hash for c in cells}) == len(cells)


def test_spec_accepts_every_registered_model_and_dataset_and_lists_them_when_wrong():
    from splitshield import list_datasets, list_models

    assert "vgg11-bottleneck-slim" in list_models()
    for name in list_models():
        assert parse_spec({**BASE, "model": name}).model == [name]
    with pytest.raises(ConfigError, match="vgg11-bottleneck-slim"):
        parse_spec({**BASE, "model": "vgg11-bottleneck-tiny"})
    for name in list_datasets():
        assert parse_spec({**BASE, "dataset": name}).dataset == [name]  # a pattern takes any PATH, even "PATH"
    with pytest.raises(ConfigError, match=", ".join(list_datasets())):
        parse_spec({**BASE, "dataset": "cifar100"})


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_quick_spec_keeps_the_grid_at_smoke_budgets_under_other_hashes(path):
    import splitshield.experiment as experiment
    from splitshield.config import QUICK_ATTACK_BUDGETS, QUICK_AUX_N, QUICK_IMAGES, QUICK_TRAIN_N, quick_spec

    if path.suffix == ".toml" and sys.version_info < (3, 11):
        pytest.skip("TOML specs need Python >= 3.11")
    spec = load_spec(path)
    quick = quick_spec(spec)
    full, smoke = experiment.plan(spec), experiment.plan(quick)
    # The same cells (dataset/model/split/defense/attack/seed paths), none sharing a hash with the real run.
    assert [c.path for c in smoke] == [c.path for c in full]
    assert not {c.hash for c in smoke} & {c.hash for c in full}
    assert quick.name == f"{spec.name}-quick" and quick.seeds == spec.seeds
    assert quick.train.epochs == 1 and quick.train.train_n <= QUICK_TRAIN_N
    assert quick.train.protocol == spec.train.protocol and quick.train.augment == spec.train.augment
    images = quick.evaluation.images
    assert images == "first_per_class" or images <= QUICK_IMAGES

    def within(name: str, params: dict) -> bool:
        return all(params[k] <= v for k, v in QUICK_ATTACK_BUDGETS[name].items() if isinstance(v, int))

    for setting in quick.attack_settings():
        assert setting["aux_n"] <= QUICK_AUX_N
        if setting["name"] == "strongest":
            members = setting["params"]["members"]
            assert members and all(within(name, params) for name, params in members.items())
        else:
            assert within(setting["name"], setting["params"])


def test_quick_spec_keeps_what_a_spec_sets_below_the_smoke_budgets():
    from splitshield.config import quick_spec

    spec = parse_spec({**BASE, "train": {"epochs": 3, "train_n": 100},
                       "evaluation": {"images": 4, "test_n": 200},
                       "attacks": [{"name": "rmle", "iters": 5, "aux_n": 64, "images": 3},
                                   {"name": "strongest", "members": {"rmle": {"iters": 2000, "tv": 0.5}}}]})
    quick = quick_spec(spec)
    assert (quick.train.epochs, quick.train.train_n) == (1, 100)
    assert (quick.evaluation.images, quick.evaluation.test_n) == (4, 200)
    rmle, strongest = quick.attack_settings()
    assert rmle["params"] == {"iters": 5} and rmle["aux_n"] == 64 and rmle["images"] == 3
    assert strongest["params"]["members"] == {"rmle": {"iters": 20, "tv": 0.5}}


def test_quick_spec_caps_grids_point_by_point_and_keeps_members_grids():
    from splitshield.config import quick_spec
    from splitshield.experiment import plan

    spec = parse_spec({**BASE, "attacks": [
        {"name": "rmle", "iters": [5, 10, 3000]},
        {"name": "strongest", "members": [{"rmle": {"iters": 3000}}, {"inverse_network": {"steps": 3000}}]},
        {"name": "model_completion", "method": "mixmatch", "n_labels": 200}]})
    quick = quick_spec(spec)
    rmle = [s["params"]["iters"] for s in quick.attack_settings() if s["name"] == "rmle"]
    assert rmle == [5, 10, 20]  # below the cap they stay; 3000 is capped
    members = [s["params"]["members"] for s in quick.attack_settings() if s["name"] == "strongest"]
    assert members == [{"rmle": {"iters": 20}}, {"inverse_network": {"steps": 20}}]  # still a grid of two
    (completion,) = [s for s in quick.attack_settings() if s["name"] == "model_completion"]
    assert completion["aux_n"] >= 2 * 200  # unlabelled images left for mixmatch
    assert len(plan(quick)) == len(plan(spec))
