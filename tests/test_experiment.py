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
    "attacks": [{"name": "white_box", "iters": 25}, {"name": "black_box", "steps": 10, "batch_size": 16},
                {"name": "model_completion", "steps": 20}],
    "train": {"epochs": 1, "train_n": 300},
    "evaluation": {"test_n": 200},
}


def _rows(db: Path) -> list[tuple]:
    with ResultStore(db) as store:
        return store.metric_rows()


def test_plan_is_the_full_product_with_stable_unique_hashes():
    spec = parse_spec({**TINY, "splits": ["conv1", "ReLU2"], "seeds": [0, 1],
                       "attacks": [{"name": "black_box", "steps": [5, 10]}, {"name": "white_box"}]})
    cells = plan(spec)
    assert len(cells) == 2 * 1 * 2 * 3  # splits x defenses x seeds x attack settings
    assert len({c.hash for c in cells}) == len(cells)
    assert len({c.target_hash for c in cells}) == 2 * 2  # attacks on the same model share its target
    assert [c.hash for c in plan(spec)] == [c.hash for c in cells]  # deterministic
    assert {c.attack_label for c in cells} == {"black_box(steps=5)", "black_box(steps=10)", "white_box"}
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
        wb = next(c for c in cells if c["attack_label"] == "white_box")
        mc = next(c for c in cells if c["attack_label"] == "model_completion")
        assert set(wb["metrics"]) == {"accuracy", "mse", "psnr", "ssim"}
        assert 0.0 <= mc["metrics"]["completion_accuracy"] <= 1.0
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
    grown = parse_spec({**TINY, "attacks": [*TINY["attacks"], {"name": "black_box", "steps": 5, "batch_size": 16}]})
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
    assert len(a) == 2 * (1 + 3 * 11) and a == b  # accuracy + (mse, psnr, ssim) x (10 images + mean) per cell


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
  - {name: white_box, iters: [60, 80]}
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
    assert len(before) == killed_done * (1 + 3 * 11)
    subprocess.run(_run_cmd(spec_path, db), env=env, check=True, capture_output=True, timeout=60)
    after = _rows(db)
    assert _done(db) == 4
    assert len(after) == 4 * (1 + 3 * 11) == len(set((h, n, i) for h, n, i, _ in after))  # none lost or doubled
    assert set(before) <= set(after)  # the rows written before the kill are untouched
    # Resuming (target from the cache) gives exactly what an uninterrupted run gives.
    fresh = tmp_path / "fresh.db"
    subprocess.run(_run_cmd(spec_path, fresh), env=env, check=True, capture_output=True, timeout=60)
    assert _rows(fresh) == after


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
