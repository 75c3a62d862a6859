"""Every bad input to the command line is one line and exit code 2, never a traceback (issue 17).

Each case runs the real command through typer's CliRunner and checks: exit code 2, exactly one non-empty
line of output (stdout and stderr together) that names the option or field at fault, and no traceback.
Commands that would do long work (training, serving) are made to fail the test if they get that far,
so each check is shown to happen before the work. ``serve`` itself runs as a subprocess where it must
really listen: its address is printed only once the port is bound.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from typer.testing import CliRunner

import splitshield as ss
from splitshield.cli import app
from splitshield.runtime.artifacts import export
from splitshield.train import Trainer, save_checkpoint

TOKEN = "cli-errors-secret"


def one_line_error(result, *names: str) -> str:
    """Assert exit code 2 and one line of output, naming each of ``names``; returns the line."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An (untrained) LeNet cut at ReLU2: the checkpoint, its edge and cloud artifacts, a token file."""
    root = tmp_path_factory.mktemp("models")
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    checkpoint = save_checkpoint(root / "model", target)
    export(checkpoint, root / "edge.safetensors", root / "cloud.safetensors")
    (root / "token").write_text(TOKEN + "\n")
    return {"checkpoint": checkpoint, "edge": root / "edge.safetensors", "cloud": root / "cloud.safetensors",
            "token": root / "token"}


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training or serving is a test failure: every check must come before it."""
    def fail(*_, **__):
        raise AssertionError("the command started training or serving before refusing its input")

    monkeypatch.setattr(Trainer, "fit", fail)
    monkeypatch.setattr(uvicorn.Server, "run", fail)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file: no one, root included, can create a folder below it (``a_file / "out"``)."""
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


# -- --device ------------------------------------------------------------------------------------------------


SPEC = "name: tiny\ndataset: mnist-5k\nmodel: lenet\nsplits: [ReLU2]\nattacks: [{name: rmle, iters: 5}]\n"


def _commands(models: dict[str, Path], tmp_path: Path) -> dict[str, list]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return {"run": ["run", spec, "--db", tmp_path / "r.db"],
            "audit": ["audit", spec, "--max-ssim", "0.5", "--db", tmp_path / "r.db"],
            "train": ["train", "lenet", "--split", "ReLU2", "--out", tmp_path / "m"],
            "attack": ["attack", models["checkpoint"]],
            "serve": ["serve", models["cloud"], "--token-file", models["token"], "--port", "0"],
            "infer": ["infer", models["edge"], tmp_path],
            "demo": ["demo", "--out", tmp_path / "report", "--quick"]}


@pytest.mark.parametrize("command", ["train", "attack", "serve", "infer", "demo", "run", "audit"])
@pytest.mark.parametrize(("device", "expected"), [("bogus", "is not a device"), ("cuda", "no CUDA GPU"),
                                                  ("cuda:7", "no CUDA GPU"), ("meta", "runs on cpu, cuda or mps")])
def test_device_is_checked_first(models, tmp_path, no_training, command, device, expected):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(run(*_commands(models, tmp_path)[command], "--device", device), "--device", expected)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "report").exists()
    assert not (tmp_path / "r.db").exists()


def test_a_specs_device_is_checked_first_and_named(tmp_path, no_training):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC + "device: cuda\n")
    one_line_error(run("run", spec, "--db", tmp_path / "r.db"), "spec.yaml: device", "no CUDA GPU")
    assert not (tmp_path / "r.db").exists()


def test_run_device_replaces_the_specs_and_keeps_its_cells(tmp_path, monkeypatch):
    from splitshield import experiment

    seen = []

    def fake_run(spec, db, **_):
        seen.append(spec)
        return experiment.RunSummary(run_id=1, cells_total=len(experiment.plan(spec)), cells_skipped=0,
                                     cells_done=0, failures={}, seconds=0.0, overhead_seconds=0.0,
                                     compute_seconds=0.0)

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC + "device: cuda\n")  # the spec's device is not checked when --device replaces it
    assert run("run", spec, "--db", tmp_path / "r.db", "--device", "cpu").exit_code == 0
    (override,) = seen
    assert override.device == "cpu"
    original = ss.load_spec(spec)
    assert [c.hash for c in experiment.plan(override)] == [c.hash for c in experiment.plan(original)]


# -- attack options ------------------------------------------------------------------------------------------


def test_negative_image_count(models):
    one_line_error(run("attack", models["checkpoint"], "--n-images", "-3"), "--n-images", "-3")


def test_infer_stream_needs_a_positive_window(models, tmp_path):
    one_line_error(run("infer", models["edge"], tmp_path, "--stream", "0"), "--stream", "0")


@pytest.mark.parametrize("attack", ["rmle", "shadow_head", "inverse_network"])
def test_attack_options_of_the_wrong_type(models, attack):
    one_line_error(run("attack", models["checkpoint"], "--attack", attack, "--options", '{"iters": "abc"}'),
                   f"--options for {attack}")


# -- serve ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_out_of_range(models, no_training, port):
    one_line_error(run("serve", models["cloud"], "--token-file", models["token"], "--port", port),
                   "--port", "0..65535")


def test_serve_port_in_use(models, no_training):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(run("serve", models["cloud"], "--token-file", models["token"], "--port", port),
                       "--port", port, "cannot listen")


def test_serve_record_in_an_unwritable_folder(models, no_training, a_file):
    one_line_error(run("serve", models["cloud"], "--token-file", models["token"], "--port", "0",
                       "--record", a_file / "transcript.db"), "--record", str(a_file))


# -- train --out ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("below", ["out", "sub/out"])
def test_train_out_in_an_unwritable_folder_is_refused_before_training(no_training, a_file, below):
    one_line_error(run("train", "lenet", "--split", "ReLU2", "--epochs", "1", "--out", a_file / below),
                   "--out", "cannot write")


# -- checkpoints ---------------------------------------------------------------------------------------------


def _bad_checkpoint(models: dict[str, Path], tmp_path: Path, meta) -> Path:
    """A copy of the checkpoint whose JSON is ``meta``, or the original JSON changed by ``meta(dict)``."""
    original = json.loads(models["checkpoint"].with_suffix(".json").read_text())
    path = tmp_path / "bad.safetensors"
    path.write_bytes(models["checkpoint"].read_bytes())
    path.with_suffix(".json").write_text(json.dumps(meta(original) if callable(meta) else meta))
    return path


def _without(key: str):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _spec(**changes):
    return lambda meta: {**meta, "model_spec": {**meta["model_spec"], **changes}}


@pytest.mark.parametrize(("meta", "names"), [
    (_without("split"), ["'split'"]),
    (lambda meta: {**meta, "split": 3}, ["'split'"]),
    ([1, 2, 3], ["JSON object", "list"]),
    (lambda meta: {**meta, "model_spec": "lenet"}, ["'model_spec'"]),
    (lambda meta: {**meta, "model_spec": {"num_classes": 10}}, ["'model_spec'", "'name'"]),
    (_spec(name="no-such-model"), ["'model_spec'", "no-such-model"]),
    (_spec(num_classes="ten"), ["'model_spec'", "'num_classes'"]),
    (_spec(width=3), ["'model_spec'", "'width'"]),
    (_spec(input_shape=[1, 4, 4]), ["'model_spec'", "16×16"]),
    (lambda meta: {**meta, "input_shape": "1,28,28"}, ["'input_shape'"]),
    (lambda meta: {**meta, "defense": "none"}, ["'defense'"]),
])
@pytest.mark.parametrize("command", ["attack", "export"])
def test_malformed_checkpoint_json(models, tmp_path, meta, names, command):
    bad = _bad_checkpoint(models, tmp_path, meta)
    args = [bad] if command == "attack" else [bad, "--edge", tmp_path / "e.safetensors", "--cloud",
                                              tmp_path / "c.safetensors"]
    one_line_error(run(command, *args), str(bad.with_suffix(".json")), *names)


# -- npz datasets --------------------------------------------------------------------------------------------


def _npz(tmp_path: Path, **changes) -> str:
    """A valid 3-class npz (30 train, 12 test grey 16×16 uint8 images) with ``changes`` swapped in."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (30, 16, 16), dtype=np.uint8), "y_train": np.arange(30) % 3,
              "x_test": rng.integers(0, 256, (12, 16, 16), dtype=np.uint8), "y_test": np.arange(12) % 3}
    np.savez(tmp_path / "d.npz", **(arrays | changes))
    return f"npz:{tmp_path / 'd.npz'}"


def _labels(n: int, bad) -> np.ndarray:
    y = (np.arange(n) % 3).astype(np.float64)
    y[1] = bad
    return y


@pytest.mark.parametrize(("changes", "names"), [
    ({"x_train": np.zeros((0, 16, 16), np.uint8), "y_train": np.zeros(0, np.int64)}, ["x_train", "no images"]),
    ({"x_test": np.zeros(0, np.uint8)}, ["x_test"]),
    ({"y_test": np.zeros(0, np.int64)}, ["y_test", "one label per image"]),
    ({"y_train": _labels(30, np.nan)}, ["y_train", "whole numbers", "nan"]),
    ({"y_test": _labels(12, -1)}, ["y_test", "found -1"]),
    ({"y_test": _labels(12, 7)}, ["y_test", "label 7 is not a class of the training split"]),
    ({"y_train": _labels(30, 10**9)}, ["y_train", "class 3 has no image"]),
    ({"y_train": np.arange(30) % 3 + 1, "y_test": np.arange(12) % 3 + 1}, ["y_train", "class 0 has no image"]),
    ({"classes": np.array(["a", "b", "c"]), "y_test": _labels(12, 3)}, ["y_test", "names only 3 classes"]),
])
def test_bad_npz_is_refused_before_training(tmp_path, no_training, changes, names):
    one_line_error(run("train", "lenet", "--split", "ReLU2", "--out", tmp_path / "m",
                       "--dataset", _npz(tmp_path, **changes)), *names)


# -- split-points --------------------------------------------------------------------------------------------


def test_split_points_for_another_input_shape_lists_the_points():
    """LeNet is built for the shape asked (its first linear layer sized for it): a table, not an error."""
    result = run("split-points", "lenet", "--input-shape", "3,32,32")
    assert result.exit_code == 0, result.output
    assert "legal split points for input (3, 32, 32)" in result.output and "8×28×28" in result.output


@pytest.mark.parametrize(("shape", "names"), [("3,4,4", ["lenet takes images of at least 16×16"]),
                                              ("3,32", ["--input-shape", "3,32"]),
                                              ("0,28,28", ["--input-shape"])])
def test_split_points_shape_errors(shape, names):
    line = one_line_error(run("split-points", "lenet", "--input-shape", shape), *names)
    assert "graph" not in line and "%" not in line  # no torch.fx dump


# -- serve and infer over a real socket ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(models) -> Iterator[tuple[str, subprocess.Popen]]:
    """``splitshield serve`` on a port the system picks; yields the URL it prints, read as soon as printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitshield.cli", "serve", str(models["cloud"]),
                             "--token-file", str(models["token"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("serving the tail of"), (line, proc.poll())
        url = re.search(r"http://\S+", line).group(0)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_prints_its_address_once_bound(server):
    url, _ = server
    assert not url.endswith(":0")  # the port actually bound, not the one asked for
    started = time.monotonic()
    # At once, with no retry: a port printed before it is bound would refuse this connection.
    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(server, scheme):
    url, _ = server
    assert httpx.get(f"{url}/v1/model", headers={"authorization": f"{scheme} {TOKEN}"}, timeout=30).status_code == 200


@pytest.mark.parametrize("value", [f"bearer {TOKEN}x", f"basic {TOKEN}", TOKEN, f"bearer{TOKEN}", "bearer"])
def test_wrong_credentials_stay_refused(server, value):
    url, _ = server
    assert httpx.get(f"{url}/v1/model", headers={"authorization": value}, timeout=30).status_code == 401


def test_infer_warns_once_per_converted_image(server, models, tmp_path):
    url, _ = server
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "fits.png")
    result = CliRunner().invoke(app, ["infer", str(models["edge"]), str(tmp_path), "--server", url,
                                      "--token-file", str(models["token"])])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == [f"warning: image {tmp_path / 'colour.png'}: converted RGB to grey and resized 32×32 to "
                        "28×28 (H×W) for the model's 1×28×28 input"], result.stderr
    assert "colour.png" in result.stdout and "fits.png" in result.stdout
