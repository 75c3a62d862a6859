"""Experiments: cells expand and hash stably, run once, resume after SIGKILL, and give the same numbers
whichever executor runs them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from splitshield.config import parse_spec
from splitshield.errors import ConfigError, DataError
from splitshield.experiment import plan, run_experiment
from splitshield.store import ResultStore

SRC = Path(__file__).resolve().parents[1] / "src"

TINY = {
    "name": "tiny",
    "dataset": "mnist-5k",
    "model": "lenet",
    "splits": ["ReLU2"],
    "defenses": [{"name": "none"}],
    "attacks": [{"name": "rmle", "iters": 25}, {"name": "inverse_network", "steps": 10, "batch_size": 16},
                {"name": "model_completion", "steps": 20}],
    "train": {"epochs": 1, "train_n": 300},
    "evaluation": {"test_n": 200},
}


def _rows(db: Path) -> list[tuple]:
    """Every metric row but the training times (wall-clock: they differ between any two runs)."""
    with ResultStore(db) as store:
        return [r for r in store.metric_rows() if not r[1].startswith("train_")]


def test_plan_is_the_full_product_with_stable_unique_hashes():
    spec = parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "seeds": [0, 1],
                       "attacks": [{"name": "black_box", "steps": [5, 10]}, {"name": "white_box"}]})
    cells = plan(spec)
    assert len(cells) == 2 * 1 * 2 * 3  # splits x defenses x seeds x attack settings
    assert len({c.hash for c in cells}) == len(cells)
    assert len({c.target_hash for c in cells}) == 2 * 2  # attacks on the same model share its target
    assert [c.hash for c in plan(spec)] == [c.hash for c in cells]  # deterministic
    # The old names (threat names) are read as the attacks they meant.
    assert {c.attack_label for c in cells} == {"inverse_network(steps=5)", "inverse_network(steps=10)", "rmle"}
    changed = plan(parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "seeds": [0, 1],
                               "attacks": [{"name": "black_box", "steps": [5, 20]}, {"name": "white_box"}]}))
    shared = {c.hash for c in cells} & {c.hash for c in changed}
    assert len(shared) == 2 * 2 * 2  # only the steps=20 cells are new


def test_a_new_results_revision_gives_every_target_and_cell_a_new_hash(monkeypatch):
    import splitshield.experiment as experiment

    spec = parse_spec(TINY)
    before = plan(spec)
    monkeypatch.setattr(experiment, "RESULTS_REVISION", experiment.RESULTS_REVISION + 1)
    after = plan(spec)
    assert not {c.hash for c in before} & {c.hash for c in after}
    assert not {c.target_hash for c in before} & {c.target_hash for c in after}  # the model is trained again


def test_unknown_split_lists_the_legal_points():
    with pytest.raises(ConfigError, match=r"spec field splits: 'ReLU9' is not a split point of lenet.*conv1.*ReLU2"):
        plan(parse_spec({**TINY, "splits": ["ReLU9"]}))


@pytest.mark.parametrize("field, entry", [
    ("attacks[1]", {"name": "shadow_head", "shadow": ["same", "he2019"]}),  # a grid
    ("attacks[1]", {"name": "model_reconstruction", "shadow": "he2019"}),
    ("attacks[1].members.model_reconstruction", {"name": "strongest", "threat": "black_box",
                                                 "members": {"model_reconstruction": {"shadow": "he2019"}}}),
])
def test_a_he2019_shadow_at_a_point_without_their_net_fails_at_plan_not_mid_sweep(field, entry):
    attacks = [{"name": "rmle"}, entry]
    field = field.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=rf"^spec field {field}\.shadow: shadow 'he2019'.*'pool2'.*"
                                          r", or remove split 'pool2'$"):
        plan(parse_spec({**TINY, "splits": ["conv1", "pool2"], "attacks": attacks}))
    assert plan(parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "attacks": attacks}))  # their points: fine


@pytest.mark.parametrize("field, entry", [
    ("attacks[0]", {"name": "rmle", "search": "he2019"}),
    ("attacks[0]", {"name": "white_box", "search": ["auto", "he2019"]}),  # an alias, a grid
    ("attacks[0].members.rmle", {"name": "strongest", "members": {"white_box": {"search": "he2019"}}}),
    ("attacks[0].members.rmle", {"name": "strongest", "members": [{"rmle": {}}, {"rmle": {"search": "he2019"}}]}),
])
def test_rmle_at_he2019s_setting_at_a_point_they_did_not_attack_fails_at_plan(field, entry):
    field = field.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=rf"^spec field {field}\.search: search='he2019' at 'pool2': He et al.*"
                                          r"lenet: conv1, ReLU2.*, or remove split 'pool2'$"):
        plan(parse_spec({**TINY, "splits": ["ReLU2", "pool2"], "attacks": [entry]}))
    assert plan(parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "attacks": [entry]}))


def test_rmle_at_he2019s_setting_on_a_u_shaped_split_fails_at_plan():
    with pytest.raises(ConfigError, match=r"^spec field attacks\[0\]\.search: search='he2019' at 'conv1\.\.fc3'"):
        plan(parse_spec({**TINY, "splits": ["conv1..fc3"], "attacks": [{"name": "rmle", "search": "he2019"}]}))


def test_run_stores_every_cell_once_and_rerun_skips(tmp_path):
    spec = parse_spec(TINY)
    db = tmp_path / "results.db"
    first = run_experiment(spec, db, progress=False, pngs=True)
    assert (first.cells_total, first.cells_done, first.cells_skipped, first.failures) == (3, 3, 0, {})
    with ResultStore(db) as store:
        cells = store.cells()
        assert all(c["status"] == "done" for c in cells)
        # The target is trained once: the first cell trains it, the others reuse it.
        assert sorted(c["target_cached"] for c in cells) == [0, 1, 1]
        wb = next(c for c in cells if c["attack_label"] == "rmle")
        mc = next(c for c in cells if c["attack_label"] == "model_completion")
        assert set(wb["metrics"]) == {"accuracy", "mse", "psnr", "ssim", "feature_std", "noise_std",
                                      "train_seconds", "train_cpu_seconds"}
        assert wb["metrics"]["noise_std"] == 0 and wb["metrics"]["feature_std"] > 0
        assert 0.0 <= mc["metrics"]["completion_accuracy"] <= 1.0
        assert 0.0 <= mc["metrics"]["scratch_accuracy"] <= 1.0
        # Independent check of the stored numbers: recompute from the saved tensors with scikit-image.
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        saved = load_file(str(wb["artifacts"]["reconstruction"]))
        x, x_hat = saved["original"].astype(np.float64), saved["reconstruction"].astype(np.float64)
        assert x.shape == (10, 1, 28, 28)
        psnr = [peak_signal_noise_ratio(x[i, 0], x_hat[i, 0], data_range=1.0) for i in range(10)]
        ssim = [structural_similarity(x[i, 0], x_hat[i, 0], data_range=1.0) for i in range(10)]
        assert wb["metrics"]["psnr"] == pytest.approx(np.mean(psnr), abs=1e-4)
        assert wb["metrics"]["ssim"] == pytest.approx(np.mean(ssim), abs=1e-4)
        assert wb["artifacts"]["grid"].is_file() and wb["artifacts"]["checkpoint"].is_file()
    rows = _rows(db)
    again = run_experiment(spec, db, progress=False)
    assert (again.cells_done, again.cells_skipped) == (0, 3)
    assert _rows(db) == rows
    # Changing one parameter runs only the new cell, on the cached target.
    grown = parse_spec({**TINY, "attacks": [*TINY["attacks"],
                                            {"name": "inverse_network", "steps": 5, "batch_size": 16}]})
    third = run_experiment(grown, db, progress=False)
    assert (third.cells_done, third.cells_skipped) == (1, 3)
    with ResultStore(db) as store:
        assert len(store.cells()) == 4
        assert all(c["target_cached"] for c in store.cells() if c["attack"]["params"].get("steps") == 5)


@pytest.mark.slow  # spawns two worker processes (~20 s); the Ray test covers cross-executor equality by default
def test_same_seed_same_numbers_sequential_and_processes(tmp_path):
    spec = parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "attacks": TINY["attacks"][1:2]})
    run_experiment(spec, tmp_path / "a.db", progress=False, pngs=False)
    run_experiment(spec, tmp_path / "b.db", progress=False, pngs=False, jobs=2)  # one process per target
    a, b = _rows(tmp_path / "a.db"), _rows(tmp_path / "b.db")
    # (accuracy, feature_std, noise_std) + (mse, psnr, ssim) x (10 images + mean) per cell
    assert len(a) == 2 * (3 + 3 * 11) and a == b


def test_different_seed_changes_the_numbers(tmp_path):
    run_experiment(parse_spec({**TINY, "attacks": TINY["attacks"][:1]}), tmp_path / "a.db", progress=False,
                   pngs=False)
    run_experiment(parse_spec({**TINY, "attacks": TINY["attacks"][:1], "seeds": [1]}), tmp_path / "b.db",
                   progress=False, pngs=False)
    assert [r[3] for r in _rows(tmp_path / "a.db")] != [r[3] for r in _rows(tmp_path / "b.db")]


KILL_SPEC = """
name: kill-test
dataset: mnist-5k
model: lenet
splits: [conv1, ReLU2]
defenses: [{name: none}]
attacks:
  - {name: rmle, iters: [60, 80]}
train: {epochs: 1, train_n: 300}
evaluation: {test_n: 200}
"""


def _done(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM cells WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _run_cmd(spec: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "splitshield.cli", "run", str(spec), "--db", str(db), "--quiet"]


def test_sigkill_mid_cell_loses_only_that_cell(tmp_path):
    spec_path = tmp_path / "kill.yaml"
    spec_path.write_text(KILL_SPEC)
    db = tmp_path / "results.db"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_run_cmd(spec_path, db), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 45
    while _done(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_done = _done(db)
    assert 1 <= killed_done < 4, f"kill landed at {killed_done} done cells: {proc.stderr.read().decode()[-500:]}"
    before = _rows(db)
    done_hashes = {r[0] for r in before}
    assert len(done_hashes) == killed_done  # no half-written cell left rows behind
    assert len(before) == killed_done * (3 + 3 * 11)  # accuracy, feature_std, noise_std + (mse, psnr, ssim) x 11
    subprocess.run(_run_cmd(spec_path, db), env=env, check=True, capture_output=True, timeout=60)
    after = _rows(db)
    assert _done(db) == 4
    assert len(after) == 4 * (3 + 3 * 11) == len(set((h, n, i) for h, n, i, _ in after))  # none lost or doubled
    assert set(before) <= set(after)  # the rows written before the kill are untouched
    # Resuming (target from the cache) gives exactly what an uninterrupted run gives.
    fresh = tmp_path / "fresh.db"
    subprocess.run(_run_cmd(spec_path, fresh), env=env, check=True, capture_output=True, timeout=60)
    assert _rows(fresh) == after


def test_worker_processes_hand_over_each_cell_so_a_kill_keeps_the_measured_ones(tmp_path):
    # One target: one worker runs both cells, the first quick, the second far too long to finish here. The first
    # must be in the store while the second runs, not only when the worker's whole unit is done.
    spec_path = tmp_path / "kill.yaml"
    spec_path.write_text(KILL_SPEC.replace("[conv1, ReLU2]", "[conv1]").replace("[60, 80]", "[60, 1000000]"))
    db = tmp_path / "results.db"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_run_cmd(spec_path, db) + ["--jobs", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while _done(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its worker and the queue's manager
    proc.wait()
    assert _done(db) == 1, proc.stderr.read().decode()[-500:]


def test_ray_executor_matches_local(tmp_path):
    ray = pytest.importorskip("ray")
    spec = parse_spec({**TINY, "attacks": TINY["attacks"][:2]})
    run_experiment(spec, tmp_path / "local.db", progress=False, pngs=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_experiment(spec, tmp_path / "ray.db", executor="ray", progress=False, pngs=False)
    finally:
        ray.shutdown()
    assert summary.cells_done == 2
    assert _rows(tmp_path / "ray.db") == _rows(tmp_path / "local.db")


def test_spec_loads_data_at_another_scale_and_shape(tmp_path):
    """A user's npz on a 0..16 scale, converted to 3×32×32 for a colour model, through the engine."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(120, 8, 8), dtype=np.uint8)
    y = np.arange(120) % 3
    np.savez(tmp_path / "tiny.npz", x_train=x[:90], y_train=y[:90], x_test=x[90:], y_test=y[90:])
    spec = {**TINY, "dataset": f"npz:{tmp_path / 'tiny.npz'}", "model": "cifar-cnn", "splits": ["ReLU22"],
            "attacks": [{"name": "white_box", "iters": 5}], "evaluation": {}}
    with pytest.raises(DataError, match=r"0\.\.16, not 0\.\.255; pass value_range=\(0, 16\)"):
        run_experiment(parse_spec(spec), tmp_path / "a.db", progress=False)
    spec = {**spec, "value_range": [0, 16], "image_shape": [3, 32, 32]}
    cells = plan(parse_spec(spec))
    assert cells[0].config["loading"] == {"value_range": [0.0, 16.0], "image_shape": [3, 32, 32]}
    outcome = run_experiment(parse_spec(spec), tmp_path / "b.db", progress=False, pngs=True)
    assert outcome.failures == {}
    with ResultStore(tmp_path / "b.db") as store:
        saved = load_file(str(store.cells()[0]["artifacts"]["reconstruction"]))
    assert saved["original"].shape == (12, 3, 32, 32)  # 3 classes: the first 4 of each
    assert np.allclose(saved["original"][:, 0], saved["original"][:, 2])  # grey copied to RGB


@pytest.mark.parametrize(("change", "field"), [({"value_range": [16, 0]}, "value_range"),
                                               ({"image_shape": [3, 0, 32]}, "image_shape"),
                                               ({"image_shape": [3, 32]}, "image_shape")])
def test_bad_loading_options_are_one_line(change, field):
    with pytest.raises(ConfigError, match=field) as info:
        parse_spec({**TINY, **change})
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# one cell pipeline: what `splitshield run` and `splitshield attack` measure is the same


@pytest.mark.parametrize(("entry", "options"), [
    ({}, []),
    # the example specs' form: images and aux_n of the attack's own
    ({"images": 12, "aux_n": 300}, ["--n-images", "12", "--aux-n", "300"]),
])
def test_attack_command_gives_the_engines_numbers(tmp_path, entry, options):
    """The engine's cell and `splitshield attack` on the engine's checkpoint, with the same attack settings and
    seed, reconstruct bit for bit the same images: one pipeline, one seeding rule."""
    import torch
    from typer.testing import CliRunner

    from splitshield.cli import app

    spec = parse_spec({**TINY, "defenses": [{"name": "gaussian_noise", "sigma": 0.3}],
                       "attacks": [{"name": "inverse_network", "steps": 15, "batch_size": 16, **entry}]})
    db = tmp_path / "results.db"
    run_experiment(spec, db, progress=False)
    with ResultStore(db) as store:
        (cell,) = store.cells()
    engine = load_file(str(cell["artifacts"]["reconstruction"]))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's cells run on one thread
    try:
        result = CliRunner().invoke(app, [
            "attack", str(cell["artifacts"]["checkpoint"]), "--attack", "black_box",  # the old name, on purpose
            "--options", '{"steps": 15, "batch_size": 16}', "--out", str(tmp_path / "cli"), "--seed", "0", *options])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    cli = load_file(str(tmp_path / "cli" / "reconstructions.safetensors"))
    assert np.array_equal(cli["x"], engine["original"])
    assert np.array_equal(cli["x_hat"], engine["reconstruction"])
    assert f"MSE {cell['metrics']['mse']:.5f}" in " ".join(result.output.split())


@pytest.mark.parametrize("model", ["lenet", "vgg11-bottleneck-slim"])  # the second has batch norm in its head
def test_tail_only_epochs_leave_the_edge_head_and_its_defense_as_they_were(model):
    import torch

    from splitshield import ImageSet, Trainer, split
    from splitshield.defenses import CEM, GaussianNoise, Shredder
    from splitshield.models import build_model

    point = "ReLU2" if model == "lenet" else "sigmoid"
    target = split(build_model(model, in_channels=1), point, input_shape=(1, 28, 28))
    defense = Shredder(target.feature_shape(), init_scale=0.1) + GaussianNoise(0.5) + CEM(16, k=2)
    g = torch.Generator().manual_seed(0)
    data = ImageSet((torch.rand(64, 1, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(64) % 4,
                    tuple("abcd"))
    trainer = Trainer(target, defense, epochs=1, batch_size=16, progress=False)
    trainer.fit(data)
    edge = {k: v.clone() for k, v in [*target.head.state_dict().items(), *defense.state_dict().items()]}
    tail = {k: v.clone() for k, v in target.tail.state_dict().items()}
    trainer.fit_tail(data, 2)
    assert trainer.epoch == 3
    # Every tensor of the head (batch norm statistics included) and of the defense is as it was.
    assert all(torch.equal(v, {**target.head.state_dict(), **defense.state_dict()}[k]) for k, v in edge.items())
    assert any(not torch.equal(v, target.tail.state_dict()[k]) for k, v in tail.items())
    assert all(p.requires_grad for p in [*target.head.parameters(), *defense.parameters()])  # unfrozen after
    trainer.epochs += 1
    trainer.fit(data)  # and training the whole model afterwards moves the head again
    assert any(not torch.equal(v, target.head.state_dict()[k]) for k, v in edge.items() if k in
               target.head.state_dict())


def test_spec_options_of_the_retired_sweep(tmp_path):
    """Per-attack evaluated images, tail-only epochs, a defense that takes the feature's shape from the target,
    the noise's and the feature's scale and the CE floor with every Gaussian part."""
    spec = parse_spec({**TINY, "train": {**TINY["train"], "tail_epochs": 1},
                       "defenses": [{"name": "compose", "parts": [{"name": "gaussian_noise", "sigma": 0.3},
                                                                  {"name": "gaussian_noise", "sigma": 0.4}]},
                                    {"name": "shredder", "lam": 1.0, "init_scale": 0.2}],
                       "attacks": [{"name": "inverse_network", "steps": 5, "batch_size": 16, "images": 12}]})
    db = tmp_path / "results.db"
    summary = run_experiment(spec, db, progress=False)
    assert summary.failures == {}
    with ResultStore(db) as store:
        noise, shredder = store.cells()
    assert load_file(str(noise["artifacts"]["reconstruction"]))["original"].shape[0] == 12
    assert noise["metrics"]["noise_std"] == pytest.approx(0.5)  # sqrt(0.3² + 0.4²): variances add
    assert noise["metrics"]["ce_floor"] > 0
    assert "ce_floor" not in shredder["metrics"]  # learned Laplace noise: no Gaussian floor
    assert shredder["metrics"]["noise_std"] > 0
    assert noise["config"]["train"]["tail_epochs"] == 1
    assert all(c["metrics"]["train_cpu_seconds"] > 0 for c in (noise, shredder))


def test_ce_floor_grows_with_the_noise_of_every_gaussian_part():
    """Two Gaussian parts act like one of their summed variance: the floor equals the single part's."""
    import torch

    from splitshield import load_dataset, split
    from splitshield.defenses import GaussianNoise
    from splitshield.measure import ce_floor
    from splitshield.models import build_model

    data = load_dataset("mnist-5k")
    target = split(build_model("lenet"), "ReLU2", input_shape=(1, 28, 28)).eval()
    x, y = data.train.take(1500).tensors()
    with torch.no_grad():
        two = ce_floor(x, y, target, GaussianNoise(0.6) + GaussianNoise(0.8))
        one = ce_floor(x, y, target, GaussianNoise(1.0))
        weak = ce_floor(x, y, target, GaussianNoise(0.6))
    assert two == pytest.approx(one, rel=1e-6) and weak < one


def test_only_runs_the_matching_cells_and_says_when_none_match(tmp_path):
    spec = parse_spec({**TINY, "defenses": [{"name": "none"}, {"name": "gaussian_noise", "sigma": [0.2, 0.4]}],
                       "attacks": [{"name": "inverse_network", "steps": 5, "batch_size": 16}]})
    db = tmp_path / "results.db"
    summary = run_experiment(spec, db, progress=False, only=["*/gaussian_noise(sigma=0.4)/*"])
    assert (summary.cells_total, summary.cells_done) == (1, 1)
    with ResultStore(db) as store:
        assert [c["defense_label"] for c in store.cells()] == ["gaussian_noise(sigma=0.4)"]
    with pytest.raises(ConfigError, match=r"--only \*/dropout\*: matches none .* look like 'mnist-5k/lenet/ReLU2/"):
        run_experiment(spec, db, progress=False, only=["*/dropout*"])


def test_engine_measures_the_features_the_server_decodes(tmp_path):
    """With ``wire``, the accuracy the engine stores is the one the deployed pair gives: the edge client's
    frames, decoded by the cloud server, classified by its tail. The wire is a cell's setting: the target is
    trained once for both specs."""
    import torch

    from splitshield.data import load_dataset
    from splitshield.runtime.client import EdgeClient
    from splitshield.runtime.codec import WireFormat
    from splitshield.runtime.server import TailService

    wired = {**TINY, "attacks": [{"name": "inverse_network", "steps": 5, "batch_size": 16}],
             "train": {"epochs": 1, "train_n": 2000}, "wire": {"dtype": "uint4", "compress": "zstd"}}
    db = tmp_path / "results.db"
    run_experiment(parse_spec({**wired, "wire": None}), db, progress=False)
    run_experiment(parse_spec(wired), db, progress=False)
    with ResultStore(db) as store:
        plain, cell = store.cells()
    assert cell["config"]["wire"] == {"dtype": "uint4", "compress": "zstd", "batch_size": 1}
    assert cell["target_hash"] == plain["target_hash"] and cell["target_cached"]
    assert cell["metrics"]["mse"] != plain["metrics"]["mse"]  # the attack saw the 4-bit features
    assert cell["metrics"]["accuracy"] != plain["metrics"]["accuracy"]  # 4 bits change some predictions
    checkpoint = cell["artifacts"]["checkpoint"]
    x, y = load_dataset("mnist-5k").test.take(TINY["evaluation"]["test_n"]).tensors()
    service = TailService(checkpoint, allow_head_weights=True)  # the engine's full checkpoint
    with EdgeClient(checkpoint, "http://127.0.0.1:9", codec=WireFormat("uint4", "zstd"), batch_size=1) as client:
        z = client.features(x)
        with torch.no_grad():
            logits = torch.cat([service.forward(service.decode(client.frame(row))) for row in z.split(1)])
    assert cell["metrics"]["accuracy"] == int((logits.argmax(1) == y).sum()) / len(y)


@pytest.mark.parametrize(("wire", "expected"), [
    ({"dtype": "int8"}, "spec field wire: wire dtype must be one of float32, float16, uint8, uint4, got 'int8'"),
    ({"compress": "zlib"}, "zstd"),
    ({"batch_size": 0}, "spec field wire.batch_size: got 0;"),
])
def test_bad_wire_options_are_one_line(wire, expected):
    with pytest.raises(ConfigError) as err:
        parse_spec({**TINY, "wire": wire})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_spec_validation_reports_every_problem_before_any_work():
    """CEM without a noise level is caught when the spec is read (it used to fail after a whole epoch), for
    every defense entry at once."""
    bad = {**TINY, "defenses": [{"name": "cem", "lam": 8},
                                {"name": "compose", "parts": [{"name": "dropout", "rate": 0.5}, {"name": "cem"}]}]}
    with pytest.raises(ConfigError) as err:
        parse_spec(bad)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("spec field defenses[0]") and "defenses[1]" in lines[1]
    assert all("gaussian_noise + cem" in line for line in lines)


def test_a_target_killed_mid_training_continues_from_its_last_epoch(tmp_path):
    """The engine checkpoints a target's training after every epoch: what a killed run left behind is resumed,
    and the result equals an uninterrupted training."""
    import torch

    from splitshield import Trainer, split
    from splitshield.defenses import build_defense
    from splitshield.experiment import _get_target, _load_data, _target_path
    from splitshield.models import build_model

    spec = parse_spec({**TINY, "train": {"epochs": 2, "train_n": 200},
                       "defenses": [{"name": "compose", "parts": [{"name": "gaussian_noise", "sigma": 0.1},
                                                                  {"name": "cem", "lam": 16, "k": 2}]}]})
    cell = plan(spec)[0]
    data = _load_data("mnist-5k", None, 0)
    whole, _, _, cached = _get_target(cell.config, cell.target_hash, data, tmp_path / "a", "cpu", False)
    assert not cached
    # What a run killed after its first epoch leaves: the training state of epoch 1.

    def resume_from_epoch_one_of(seed: int, root: Path):
        state = _target_path(root, cell.target_hash)
        state = state.with_name(state.name + ".training")
        target = split(build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
        Trainer(target, build_defense(cell.config["defense"]), epochs=1, seed=seed, progress=False,
                checkpoint_dir=state).fit(data.train.take(200))
        resumed = _get_target(cell.config, cell.target_hash, data, root, "cpu", False)[0]
        assert not state.exists()  # the training state goes once the target is saved
        return [torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                  strict=True)]

    assert all(resume_from_epoch_one_of(0, tmp_path / "b"))
    # The state is really used: an epoch 1 of another run (seed 5) leads elsewhere.
    assert not all(resume_from_epoch_one_of(5, tmp_path / "c"))


def test_the_attackers_draws_are_not_the_devices():
    """The noise the device put on the evaluated images and the noise on the attacker's own oracle queries are
    independent streams (an adaptive attacker knows the defense, never its draws)."""
    import torch

    from splitshield import load_dataset, split
    from splitshield._random import seeded
    from splitshield.defenses import GaussianNoise
    from splitshield.measure import attack_seed, fit_attack
    from splitshield.models import build_model

    target = split(build_model("lenet"), "ReLU2", input_shape=(1, 28, 28)).eval()
    setting = {"name": "inverse_network", "threat": "black_box", "aux": "same_distribution", "aux_n": 64,
               "adaptive": True, "params": {"steps": 1, "batch_size": 16}}
    fitted = fit_attack(target, GaussianNoise(1.0), load_dataset("mnist-5k"), setting, images=20,
                        seed=attack_seed(0, setting))
    x = fitted.evaluated.tensors()[0]
    with torch.no_grad():
        clean = target.head(x)
        observed = fitted.victim.observe(x) - clean
        with seeded(fitted.attack.seed):  # the attacker queries its oracle from its own seed
            queried = fitted.victim.view().query(x) - clean
    assert abs(float(torch.corrcoef(torch.stack([observed.flatten(), queried.flatten()]))[0, 1])) < 0.05


def test_an_undefended_model_is_trained_once_for_every_split_point(tmp_path, one_thread):
    # one_thread: the engine trains with one torch thread, and a second one changes float sums in the last bit.
    import torch

    import splitshield as ss

    spec = parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "defenses": [{"name": "none"},
                                                                          {"name": "gaussian_noise", "sigma": 0.5}],
                       "attacks": [{"name": "rmle", "iters": 5}]})
    summary = run_experiment(spec, tmp_path / "r.db", progress=False)
    assert summary.failures == {}
    with ResultStore(tmp_path / "r.db") as store:
        cells = store.cells()
    trained = {(c["split"], c["defense_label"]): c["train_seconds"] > 0 for c in cells}
    # The undefended model trains at the first split only; a defense at the cut trains at each split.
    assert trained == {("conv1", "none"): True, ("ReLU2", "none"): False,
                       ("conv1", "gaussian_noise(sigma=0.5)"): True, ("ReLU2", "gaussian_noise(sigma=0.5)"): True}
    # The reused model is the one training at ReLU2 would give, bit for bit.
    relu2 = next(c for c in cells if c["split"] == "ReLU2" and c["defense_label"] == "none")
    reused, _, _ = ss.load_checkpoint(tmp_path / relu2["artifacts"]["checkpoint"])
    data = ss.load_dataset("mnist-5k")
    model = ss.build_model("lenet", num_classes=10, input_shape=(1, 28, 28))
    target = ss.split(model, "ReLU2", input_shape=(1, 28, 28))
    ss.Trainer(target, epochs=1, batch_size=64, lr=1e-3, seed=0, progress=False).fit(data.train.take(300))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in reused.state_dict().items())


def test_run_quick_is_a_smoke_run_in_its_own_store(tmp_path, one_thread):
    from typer.testing import CliRunner

    from splitshield.cli import app

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: smoke\ndataset: mnist-5k\nmodel: lenet\nsplits: [ReLU2]\n"
                         "attacks: [{name: rmle, iters: 3000}, {name: inverse_network}]\n")
    result = CliRunner().invoke(app, ["run", str(spec_path), "--db", str(tmp_path / "r.db"), "--quick", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "r.db").exists()  # the real store never sees smoke cells
    with ResultStore.open_readonly(tmp_path / "r-quick.db") as store:
        cells = store.cells()
        assert [r["name"] for r in store.runs()] == ["smoke-quick"]
    assert len(cells) == 2 and {c["attack"]["params"]["iters" if c["attack"]["name"] == "rmle" else "steps"]
                                for c in cells} == {20}
    assert all(c["config"]["train"]["epochs"] == 1 and c["config"]["train"]["train_n"] == 500 for c in cells)
