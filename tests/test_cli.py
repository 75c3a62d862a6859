"""CLI data options: bad values are one line on stderr and exit code 2, before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from splitshield.cli import app


@pytest.fixture
def dark_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "dark.npz"
    np.savez(path, x_train=rng.integers(0, 17, (30, 16, 16), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 17, (12, 16, 16), dtype=np.uint8), y_test=np.arange(12) % 3)
    return path


@pytest.mark.parametrize(("options", "expected"), [
    ([], "uint8 images use only 0..16, not 0..255; pass value_range=(0, 16)"),
    (["--value-range", "a,b"], "--value-range: expected LO,HI such as 0,16, got 'a,b'"),
    (["--value-range", "16,0"], "value_range must be two numbers (lo, hi) with lo < hi"),
    (["--value-range", "0,16", "--image-shape", "3,32"], "--image-shape: expected three positive integers"),
])
def test_bad_data_options_are_one_line(dark_npz, tmp_path, options, expected):
    out = CliRunner().invoke(app, ["train", "lenet", "--split", "ReLU2", "--out", str(tmp_path / "m"),
                                   "--dataset", f"npz:{dark_npz}", *options])
    assert out.exit_code == 2, out.output
    assert expected in out.output and "Traceback" not in out.output
    assert not (tmp_path / "m.safetensors").exists()


def test_data_options_load_and_convert(dark_npz, tmp_path):
    out = CliRunner().invoke(app, ["train", "lenet", "--split", "ReLU2", "--out", str(tmp_path / "m"), "--epochs", "1",
                                   "--dataset", f"npz:{dark_npz}", "--value-range", "0,16", "--image-shape", "3,20,20"])
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["input_shape"] == [3, 20, 20] and meta["model_spec"]["input_shape"] == [3, 20, 20]


def test_negative_image_count_is_refused_before_loading(tmp_path):
    out = CliRunner().invoke(app, ["attack", str(tmp_path / "missing.safetensors"), "--n-images", "-3"])
    assert out.exit_code == 2 and "--n-images: 0 (the first test image of each class) or a positive count" in out.output


@pytest.mark.parametrize("key", ["progress", "seed", "decoder"])
def test_attack_options_the_command_sets_are_one_line_errors(tmp_path, key):
    result = CliRunner().invoke(app, ["attack", str(tmp_path / "none.safetensors"), "--options", f'{{"{key}": 1}}'])
    assert result.exit_code == 2 and f"'{key}' is set by splitshield attack" in result.output
    assert "Traceback" not in result.output
