"""Reports and the audit gate, on a store filled with known numbers (no training needed)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from splitshield.cli import app
from splitshield.errors import ConfigError
from splitshield.experiment import RESULTS_REVISION
from splitshield.report import audit, build_report, load_sections, summary_sentence
from splitshield.store import CellRecord, ResultStore

# (defense config, accuracy, {attack: (ssim, psnr, mse)}, ce_floor)
GRID = [
    ({"name": "none"}, 0.985, {"white_box": (0.80, 20.0, 0.010), "black_box": (0.60, 15.0, 0.030)}, None),
    ({"name": "gaussian_noise", "sigma": 0.5}, 0.980, {"white_box": (0.40, 12.0, 0.060),
                                                       "black_box": (0.45, 13.0, 0.050)}, 0.002),
    ({"name": "gaussian_noise", "sigma": 1.0}, 0.950, {"white_box": (0.20, 9.0, 0.120),
                                                       "black_box": (0.25, 10.0, 0.100)}, 0.004),
    ({"name": "dropout", "rate": 0.5}, 0.978, {"white_box": (0.50, 11.0, 0.080),
                                               "black_box": (0.55, 12.0, 0.070)}, None),
]


def _label(config: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in config.items() if k != "name")
    return f"{config['name']}({params})" if params else config["name"]


def _fill(db: Path) -> None:
    rng = np.random.default_rng(0)
    original = rng.random((10, 1, 28, 28), dtype=np.float32)
    with ResultStore(db) as store:
        run = store.start_run("synthetic", {}, "local", 8)
        for d, (defense, acc, attacks, floor) in enumerate(GRID):
            for a, (attack, (ssim, psnr, mse)) in enumerate(attacks.items()):
                h = f"cell{d}{a}"
                store.register_cells(run, [{
                    "hash": h, "target_hash": f"t{d}", "dataset": "mnist", "model": "lenet", "split": "ReLU2",
                    "defense": defense, "defense_label": _label(defense), "attack": {"name": attack},
                    "attack_label": attack, "seed": 0, "config": {"revision": RESULTS_REVISION}}])
                rel = f"artifacts/{h}.safetensors"
                (db.parent / "artifacts").mkdir(exist_ok=True)
                save_file({"original": original, "reconstruction": (original * ssim).astype(np.float32)},
                          str(db.parent / rel))
                rows = [("accuracy", -1, acc), ("ssim", -1, ssim), ("psnr", -1, psnr), ("mse", -1, mse)]
                if floor is not None:
                    rows.append(("ce_floor", -1, floor))
                timings = {"compute_seconds": 1.0, "attack_seconds": 10.0 * (a + 1) + d}
                store.record(CellRecord(h, rows, timings, {"reconstruction": rel}))


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "results.db"
    _fill(path)
    return path


def test_sections_average_and_pick_the_best_attack(db):
    with ResultStore(db) as store:
        (section,) = load_sections(store)
    assert section.inversion_attacks == ["white_box", "black_box"]
    rows = {r.label: r for r in section.rows}
    assert rows["none"].accuracy == pytest.approx(0.985)
    assert rows["gaussian_noise(sigma=0.5)"].best("ssim") == ("black_box", pytest.approx(0.45))
    assert rows["gaussian_noise(sigma=0.5)"].best("mse") == ("black_box", pytest.approx(0.050))
    assert rows["gaussian_noise(sigma=1.0)"].ce_floor == pytest.approx(0.004)
    assert rows["dropout(rate=0.5)"].family == "dropout"


def test_summary_names_the_best_defense_within_one_point(db):
    with ResultStore(db) as store:
        (section,) = load_sections(store)
    # sigma=1.0 costs 3.5 pt; among the two within 1 pt, noise 0.5 (best SSIM 0.45) beats dropout (0.55).
    assert summary_sentence(section) == (
        "At split ReLU2 (lenet, mnist), gaussian_noise(sigma=0.5) keeps accuracy within 1 pt (98.0 % vs 98.5 %, "
        "-0.5 pt) and pushes the best attack's SSIM from 0.80 to 0.45 (black_box).")


def test_report_files_are_self_contained_and_images_valid(db, tmp_path):
    files = build_report(db, tmp_path / "report")
    text = files.html.read_text()
    assert "<table>" in text and "gaussian_noise(sigma=1.0)" in text and "98.5 %" in text
    # Every image is embedded: no src attribute points at a file or the network.
    sources = re.findall(r"src='([^']*)'", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(files.figures) == 1 + 2  # the plot, a grid per defense family (noise, dropout)
    for src, fig in zip(sources, files.figures, strict=True):
        assert base64.b64decode(src.split(",", 1)[1]) == fig.read_bytes()
        with Image.open(fig) as im:
            assert im.format == "PNG" and im.size[0] > 300
    md = files.markdown.read_text()
    assert "| none | 98.5 % | 0.800 | 20.00 | 0.0100 | 0.600 | 15.00 | 0.0300 | – |" in md
    for fig in files.figures:
        assert f"({fig.relative_to(tmp_path / 'report').as_posix()})" in md
    # Attacks compared: quality on the undefended model, time per cell averaged over the four defenses.
    assert "| white_box | – | – | 0.800 | 20.00 | 11.5 |" in md and "| black_box | – | – | 0.600 | 15.00 | 21.5 |" in md


def test_a_reconstruction_file_not_on_disk_is_named_not_silently_dropped(db, tmp_path):
    # The undefended white_box row opens both families' grids: named once; every other row is drawn.
    (db.parent / "artifacts" / "cell00.safetensors").unlink()
    files = build_report(db, tmp_path / "report")
    md = files.markdown.read_text()
    assert "Not in the reconstruction figures: none · white_box. Their cells" in md
    assert md.count("Not in the reconstruction figures") == 1
    assert len(files.figures) == 1 + 2  # both grids are still drawn, from the rows they have


def test_report_of_missing_or_empty_store_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "nope.db", tmp_path / "out")
    ResultStore(tmp_path / "empty.db").close()
    with pytest.raises(ConfigError, match="no finished cells"):
        build_report(tmp_path / "empty.db", tmp_path / "out")


def _add_stale_cell(db: Path) -> None:
    """A finished cell written by an older splitshield (no revision in its config) that beats every bar."""
    with ResultStore(db) as store:
        run = store.start_run("old", {}, "local", 1)
        store.register_cells(run, [{
            "hash": "stale", "target_hash": "t-old", "dataset": "mnist", "model": "lenet", "split": "ReLU2",
            "defense": {"name": "old_defense"}, "defense_label": "old_defense", "attack": {"name": "black_box"},
            "attack_label": "black_box", "seed": 0, "config": {}}])
        store.record(CellRecord("stale", [("accuracy", -1, 0.99), ("ssim", -1, 0.99), ("psnr", -1, 40.0),
                                          ("mse", -1, 1e-4)], {"compute_seconds": 1.0}, {}))


def test_cells_of_an_older_revision_are_left_out_and_said_so(db, tmp_path):
    _add_stale_cell(db)
    with ResultStore(db) as store:
        (section,) = load_sections(store)
        assert "old_defense" not in {r.label for r in section.rows}
        assert all(v.defense != "old_defense" for v in audit(store, max_ssim=0.1))
    md = build_report(db, tmp_path / "report").markdown.read_text()
    assert "1 cells measured by another splitshield revision" in md and "old_defense" not in md
    only_old = tmp_path / "old.db"
    _add_stale_cell(only_old)
    with pytest.raises(ConfigError, match="1 were measured by another splitshield revision"):
        build_report(only_old, tmp_path / "out")


def test_audit_flags_exactly_the_attacks_above_the_bar(db):
    with ResultStore(db) as store:
        found = audit(store, max_ssim=0.5)
        assert sorted((v.defense, v.attack) for v in found) == [
            ("dropout(rate=0.5)", "black_box"), ("none", "black_box"), ("none", "white_box")]
        assert {(v.defense, v.attack) for v in audit(store, max_psnr=12.5)} == {
            ("none", "white_box"), ("none", "black_box"), ("gaussian_noise(sigma=0.5)", "black_box")}
        assert audit(store, max_ssim=0.9, max_psnr=25) == []
        assert audit(store, max_ssim=0.1, hashes=["cell20"])[0].defense == "gaussian_noise(sigma=1.0)"
        with pytest.raises(ConfigError, match="at least one bar"):
            audit(store)


def test_cli_report_and_audit_exit_codes(db, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(db), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").is_file()
    spec = tmp_path / "gate.yaml"
    spec.write_text("dataset: mnist-5k\nsplits: [ReLU2]\nattacks: [{name: model_completion, steps: 10}]\n"
                    "train: {epochs: 1, train_n: 200}\nevaluation: {test_n: 100}\n")
    gate_db = str(tmp_path / "gate.db")
    weak = ["--allow-weak-attacks", "-q"]  # 10 steps keep the test fast, below the gate's minimum of 500
    passing = runner.invoke(app, ["audit", str(spec), "--db", gate_db, "--max-completion-accuracy", "1.0", *weak])
    assert passing.exit_code == 0, passing.output
    assert "model_completion: steps=10 (minimum 500)" in passing.output and "with weak attacks" in passing.output
    failing = runner.invoke(app, ["audit", str(spec), "--db", gate_db, "--max-completion-accuracy", "0.0", *weak])
    assert failing.exit_code == 1 and "FAIL" in failing.output
    bad = runner.invoke(app, ["audit", str(spec), "--db", gate_db])
    assert bad.exit_code == 2
    refused = runner.invoke(app, ["audit", str(spec), "--db", gate_db, "--max-completion-accuracy", "1.0"])
    assert refused.exit_code == 2 and "steps (model_completion): 10 is below" in refused.output


# --------------------------------------------------------------------------------------------------
# paired comparisons: a defense with and without a plug-in

NOISE = [{"name": "gaussian_noise", "sigma": 0.5}, {"name": "gaussian_noise", "sigma": 1.0}]
CEM = {"name": "cem", "lam": 16}
# (defense config, seed) -> (accuracy, inverse-network MSE, training CPU seconds)
PAIRED = {
    (0, False, 0): (0.980, 0.05, 10.0), (0, False, 1): (0.970, 0.04, 10.0),
    (1, False, 0): (0.950, 0.10, 10.0), (1, False, 1): (0.960, 0.08, 12.0),
    (0, True, 0): (0.975, 0.06, 15.0), (0, True, 1): (0.950, 0.06, 16.0),
    (1, True, 0): (0.945, 0.12, 20.0), (1, True, 1): (0.955, 0.10, 18.0),
}


@pytest.fixture
def paired_db(tmp_path):
    path = tmp_path / "paired.db"
    with ResultStore(path) as store:
        run = store.start_run("paired", {}, "local", len(PAIRED))
        for (strength, cem, seed), (acc, mse, cpu) in PAIRED.items():
            defense = {"name": "compose", "parts": [NOISE[strength], CEM]} if cem else NOISE[strength]
            label = _label(NOISE[strength]) + ("+cem(lam=16)" if cem else "")
            h = f"p{strength}{int(cem)}{seed}"
            store.register_cells(run, [{
                "hash": h, "target_hash": h, "dataset": "mnist", "model": "lenet", "split": "ReLU2",
                "defense": defense, "defense_label": label, "attack": {"name": "inverse_network"},
                "attack_label": "inverse_network", "seed": seed, "config": {"revision": RESULTS_REVISION}}])
            store.record(CellRecord(h, [("accuracy", -1, acc), ("mse", -1, mse), ("ssim", -1, 0.5),
                                        ("psnr", -1, 15.0), ("train_cpu_seconds", -1, cpu)]))
    return path


def test_paired_gains_against_a_hand_computation(paired_db):
    from splitshield.report import paired_gains

    with ResultStore(paired_db) as store:
        (section,) = load_sections(store)
    (gain,) = paired_gains(section, window=0.01)
    assert (gain.base, gain.plugin, gain.attack) == ("gaussian_noise", "cem(lam=16)", "inverse_network")
    # Pairs by (strength, seed): gains 0.2 (dacc -0.5 pt), 0.5 (-2 pt), 0.2 (-0.5 pt), 0.25 (-0.5 pt).
    assert (gain.pairs, gain.matched) == (4, 3)
    assert gain.gain_matched == pytest.approx((0.2 + 0.2 + 0.25) / 3)
    assert gain.gain_all == pytest.approx((0.2 + 0.5 + 0.2 + 0.25) / 4)
    assert gain.accuracy_change == pytest.approx((-0.005 - 0.02 - 0.005 - 0.005) / 4)
    assert gain.time_ratio == pytest.approx((1.5 + 1.6 + 2.0 + 1.5) / 4)
    # The base's curve (seed means): (95.5 %, 0.09), (97.5 %, 0.045). CEM at sigma 0.5 (96.25 %, 0.06) lies
    # on its segment: 0.09 - 0.045 * 0.375; CEM at sigma 1 (95 %, 0.11) is 0.5 pt below it, within the
    # window, against its end point 0.09.
    reference = 0.09 - 0.045 * 0.375
    assert gain.curve_points == 2
    assert gain.gain_curve == pytest.approx((0.06 / reference - 1 + 0.11 / 0.09 - 1) / 2)
    # A narrower window matches fewer pairs and leaves the CEM point outside the curve's range out.
    narrow = paired_gains(section, window=0.001)[0]
    assert (narrow.matched, narrow.curve_points) == (0, 1) and narrow.gain_matched is None


def test_report_has_the_paired_section_in_markdown_and_html(paired_db, tmp_path):
    files = build_report(paired_db, tmp_path / "out")
    md, page = files.markdown.read_text(), files.html.read_text()
    assert "### Paired comparisons: with and without a plug-in" in md
    assert "| gaussian_noise | cem(lam=16) | inverse_network | 3 / 4 | +21.7 % | +28.7 % |" in md
    assert "<h3>Paired comparisons: with and without a plug-in</h3>" in page and "+21.7 %" in page
    result = CliRunner().invoke(app, ["report", str(paired_db), "--out", str(tmp_path / "cli"), "--window", "3"])
    assert result.exit_code == 0, result.output
    assert "| 4 / 4 | +28.7 % | +28.7 % |" in (tmp_path / "cli" / "report.md").read_text()
    bad = CliRunner().invoke(app, ["report", str(paired_db), "--out", str(tmp_path / "x"), "--window", "150"])
    assert bad.exit_code == 2 and "--window" in bad.output and "Traceback" not in bad.output


def test_imported_rows_form_sections_of_their_own_and_are_never_audited(paired_db, tmp_path):
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "import_sweep_json.py"
    spec = importlib.util.spec_from_file_location("import_sweep_json", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"dataset": "mnist", "base": "noise", "strength": 0.5, "lam": 0.0, "seed": 0, "epochs": 3,
           "batch_size": 128, "adaptive": True, "bb_raw_features": False, "accuracy": 0.98, "feature_std": 2.0,
           "noise_std": 0.5, "floor": 1e-4, "train_time": 100.0, "train_cpu": 90.0, "test_size": 10000,
           "bb": {"mse": 0.02, "psnr": 17.0, "ssim": 0.6}, "wb": {"mse": 0.05, "psnr": 13.0, "ssim": 0.3}}
    with_cem = {**row, "lam": 16.0, "accuracy": 0.975, "bb": {"mse": 0.03, "psnr": 15.2, "ssim": 0.5}}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"settings": {"model": "lenet", "bound": "none", "train_size": 0, "aux_size": 15000,
                                              "bb_steps": 1000, "bb_batch": 128, "eval_size": 1000,
                                              "wb_iters": 300, "seed": 0}, "rows": [row, with_cem]}))
    module.main([str(sweep), "--db", str(paired_db)])
    with ResultStore(paired_db) as store:
        sections = load_sections(store)
        assert audit(store, max_ssim=0.0) and all(v.attack == "inverse_network" and v.seed in (0, 1)
                                                  for v in audit(store, max_ssim=0.0))
        assert len(audit(store, max_ssim=0.0)) == len(PAIRED)  # the imported cells are never audited
    imported = next(s for s in sections if s.source)
    assert imported.title == "mnist · lenet · split ReLU2 · imported from sweep.json (benchmarks/defense_sweep.py)"
    labels = {r.label for r in imported.rows}
    assert labels == {"gaussian_noise(sigma=0.5)", "gaussian_noise(sigma=0.5)+cem(lam=16.0)"}
    from splitshield.report import paired_gains

    gains = {g.attack: g for g in paired_gains(imported)}
    assert gains["inverse_network"].gain_all == pytest.approx(0.03 / 0.02 - 1)
    assert gains["rmle"].gain_all == pytest.approx(0.0)


def test_cells_of_different_protocols_are_never_averaged(tmp_path):
    """Two trainings of the same defense (here 1 and 2 epochs) are two sections, titled by how they differ, and
    a switch (adversarial's standardize) makes a privacy-utility curve of its own."""
    from splitshield.experiment import defense_family

    path = tmp_path / "protocols.db"
    with ResultStore(path) as store:
        run = store.start_run("protocols", {}, "local", 2)
        for epochs, acc in ((1, 0.9), (2, 0.95)):
            h = f"e{epochs}"
            store.register_cells(run, [{
                "hash": h, "target_hash": h, "dataset": "mnist", "model": "lenet", "split": "ReLU2",
                "defense": {"name": "none"}, "defense_label": "none", "attack": {"name": "rmle"},
                "attack_label": "rmle", "seed": 0,
                "config": {"revision": RESULTS_REVISION, "train": {"epochs": epochs, "lr": 0.001}}}])
            store.record(CellRecord(h, [("accuracy", -1, acc), ("mse", -1, 0.01)]))
        sections = load_sections(store)
    assert sorted((s.title, s.rows[0].accuracy) for s in sections) == [
        ("mnist · lenet · split ReLU2 · train.epochs=1", 0.9), ("mnist · lenet · split ReLU2 · train.epochs=2", 0.95)]
    assert defense_family({"name": "adversarial", "alpha": 1.0, "standardize": False}) == \
        "adversarial(standardize=False)"
    assert defense_family({"name": "adversarial", "alpha": 3.0}) == "adversarial"


def test_two_specs_one_label_two_attackers_are_told_apart(tmp_path):
    """One spec's ``rmle`` (its setting search) and another's ``rmle`` (``search: null``, the only rmle there)
    meet in one section: they are two columns, never averaged as if they were seeds."""
    path = tmp_path / "labels.db"
    base = {"name": "rmle", "threat": "white_box", "aux": "same_distribution", "aux_n": None, "adaptive": True}
    with ResultStore(path) as store:
        run = store.start_run("labels", {}, "local", 2)
        for h, params, psnr in (("auto", {}, 26.0), ("table", {"search": None}, 21.0)):
            attack = {**base, "params": params}
            store.register_cells(run, [{
                "hash": h, "target_hash": "t", "dataset": "mnist", "model": "lenet", "split": "ReLU2",
                "defense": {"name": "none"}, "defense_label": "none", "attack": attack, "attack_label": "rmle",
                "seed": 0, "config": {"revision": RESULTS_REVISION, "attack": attack}}])
            store.record(CellRecord(h, [("accuracy", -1, 0.98), ("psnr", -1, psnr)]))
        (section,) = load_sections(store)
    assert section.inversion_attacks == ["rmle", "rmle(search=None)"]
    assert section.rows[0].attacks["rmle"]["psnr"] == pytest.approx(26.0)
    assert section.rows[0].attacks["rmle(search=None)"]["psnr"] == pytest.approx(21.0)
