"""An honest audit gate: no number, a failed or missing cell, a bar no attack measures and a weak attack never
pass; report and audit read stores read-only and refuse files that are not stores (no training needed)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitshield.cli import app
from splitshield.config import load_spec, parse_spec
from splitshield.errors import ConfigError
from splitshield.experiment import RESULTS_REVISION, CellOutcome
from splitshield.report import (
    MIN_AUDIT_BUDGETS,
    attack_budgets,
    audit,
    bar_setters,
    budget_lines,
    build_report,
    weak_attacks,
)
from splitshield.store import CellRecord, ResultStore

NAN = float("nan")


def _add(store: ResultStore, run: int, h: str, attack: str, metrics: dict[str, float] | None) -> None:
    """A cell of ``attack`` with these aggregate metrics (``None``: registered, never run)."""
    store.register_cells(run, [{
        "hash": h, "target_hash": "t", "dataset": "mnist", "model": "lenet", "split": "ReLU2",
        "defense": {"name": "none"}, "defense_label": "none", "attack": {"name": attack}, "attack_label": attack,
        "seed": 0, "config": {"revision": RESULTS_REVISION, "attack": h}}])
    if metrics is not None:
        store.record(CellRecord(h, [(name, -1, value) for name, value in metrics.items()]))


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "results.db") as s:
        yield s, s.start_run("t", {}, "local", 1)


# --------------------------------------------------------------------------------------------------
# no number, no pass


def test_a_nan_or_missing_metric_fails_with_its_reason(store):
    s, run = store
    _add(s, run, "nan", "rmle", {"accuracy": 0.9, "ssim": NAN, "psnr": NAN, "mse": NAN})
    _add(s, run, "nopsnr", "inverse_network", {"accuracy": 0.9, "ssim": 0.1})
    found = {(v.attack, v.metric): str(v) for v in audit(s, max_ssim=0.3, max_psnr=30)}
    assert found[("rmle", "ssim")].endswith("ssim is NaN: the attack produced no number")
    assert found[("rmle", "psnr")].endswith("psnr is NaN: the attack produced no number")
    assert found[("inverse_network", "psnr")].endswith("psnr missing: the attack produced no number")
    assert ("inverse_network", "ssim") not in found  # 0.1 is within the bar
    assert "mnist/lenet/ReLU2 defense=none attack=rmle seed=0" in found[("rmle", "ssim")]


def test_the_audit_names_the_attack_closest_to_each_bar(store):
    s, run = store
    _add(s, run, "a", "rmle", {"ssim": 0.21, "psnr": 14.0})
    _add(s, run, "b", "strongest", {"ssim": 0.35, "psnr": 13.0})
    _add(s, run, "c", "inverse_network", {"ssim": NAN, "psnr": 15.5})
    assert bar_setters(s, ["ssim", "psnr", "completion_accuracy"]) == [
        "ssim 0.35: attack=strongest on mnist/lenet/ReLU2 defense=none seed=0",
        "psnr 15.5: attack=inverse_network on mnist/lenet/ReLU2 defense=none seed=0"]


def test_a_failed_pending_or_absent_cell_fails(store):
    s, run = store
    _add(s, run, "ok", "rmle", {"ssim": 0.1, "psnr": 9.0, "mse": 0.1})
    _add(s, run, "boom", "rmle", None)
    s.record_failure("boom", "RuntimeError: boom")
    _add(s, run, "later", "rmle", None)
    reasons = [str(v) for v in audit(s, max_ssim=0.3, hashes=["ok", "boom", "later", "absent"])]
    assert len(reasons) == 3
    assert "the cell failed (RuntimeError: boom)" in reasons[0]
    assert "never ran (status pending)" in reasons[1]
    assert reasons[2] == "cell absent is not in the store: it never ran"
    assert audit(s, max_ssim=0.3, hashes=["ok"]) == []


def test_a_bar_no_attack_measures_fails(store):
    s, run = store
    _add(s, run, "mc", "model_completion", {"accuracy": 0.9, "completion_accuracy": 0.2})
    assert audit(s, max_completion_accuracy=0.5) == []
    (v,) = audit(s, max_ssim=0.3, max_completion_accuracy=0.5)
    assert str(v) == "no audited attack measures ssim: a gate with no attack cannot pass"
    # A completion cell has no SSIM, and that is not "missing": only the bar without an attack fails.


# --------------------------------------------------------------------------------------------------
# attack budgets

SPEC = {"dataset": "mnist-5k", "splits": ["ReLU2"]}


def test_budgets_resolve_defaults_and_flag_weak_settings():
    spec = parse_spec({**SPEC, "attacks": [{"name": "rmle"}, {"name": "rmle", "iters": 300},
                                           {"name": "inverse_network", "batch_size": 8, "aux_n": 100},
                                           {"name": "model_completion", "adaptive": False}]})
    budgets = attack_budgets(spec)
    lines = budget_lines(budgets)
    assert lines[0] == "rmle: iters=5000 (He et al.'s default at ReLU2; minimum 1000)"
    assert lines[1] == "rmle(iters=300): iters=300 (minimum 1000)"
    assert lines[2] == ("inverse_network: steps=3000 (default; minimum 1000), batch_size=8 (minimum 32), "
                        "aux_n=100 (minimum 256)")
    assert lines[3] == "model_completion: steps=500 (default; minimum 500), n_labels=40 (default; minimum 40)"
    weak = weak_attacks(spec, budgets)
    assert weak == [
        "spec field attacks[1].iters (rmle): 300 is below the audit's minimum 1000; raise it",
        "spec field attacks[2].batch_size (inverse_network): 8 is below the audit's minimum 32; raise it",
        "spec field attacks[2].aux_n (inverse_network): 100 is below the audit's minimum 256; raise it",
        "spec field attacks[3].adaptive (model_completion): a non-adaptive attacker ignores the defense and "
        "under-reports leakage; remove `adaptive: false`"]


def test_defaults_are_never_weak_and_every_attack_has_minimums():
    from splitshield.attacks import ATTACKS

    assert set(MIN_AUDIT_BUDGETS) | {"strongest"} == set(ATTACKS)  # the portfolio's budgets are its members'
    spec = parse_spec({**SPEC, "splits": ["fc2"], "attacks": [{"name": n} for n in ATTACKS]})
    budgets = attack_budgets(spec)
    assert weak_attacks(spec, budgets) == []
    rmle = next(b for b in budgets if b.name == "rmle")
    assert (rmle.value, rmle.source) == (500, "He et al.'s default at fc2")  # below 1000, but He et al.'s own


def test_the_portfolio_is_held_to_each_members_budget():
    spec = parse_spec({**SPEC, "attacks": [{"name": "strongest", "members": {"rmle": {"iters": 10},
                                                                             "inverse_network": {}}}]})
    budgets = attack_budgets(spec)
    assert {(b.attack, b.field) for b in budgets} >= {("strongest/rmle", "iters"),
                                                      ("strongest/inverse_network", "steps")}
    assert weak_attacks(spec, budgets) == [
        "spec field attacks[0].members.rmle.iters (rmle): 10 is below the audit's minimum 1000; raise it"]
    held_back = parse_spec({**SPEC, "attacks": [{"name": "strongest", "aux_n": 256}]})  # 16 calibrate the choice
    (aux,) = [b for b in attack_budgets(held_back) if b.name == "inverse_network" and b.field == "aux_n"]
    assert (aux.value, aux.weak) == (240, True)
    default = parse_spec({**SPEC, "attacks": [{"name": "strongest"}]})  # every white-box attack, at its defaults
    assert {b.name for b in attack_budgets(default)} >= {"rmle", "inverse_network"}
    assert weak_attacks(default, attack_budgets(default)) == []


@pytest.mark.parametrize(("attack", "words"), [
    ({"name": "inverse_network", "steps": 0}, ["attacks[0]", "steps must be a positive integer, got 0"]),
    ({"name": "rmle", "iters": -5}, ["attacks[0]", "iters must be a positive integer, got -5"]),
    ({"name": "rmle", "iters": "abc"}, ["attacks[0]", "iters must be a positive integer, got 'abc'"]),
    ({"name": "shadow_head", "steps": 0}, ["attacks[0]", "steps must be a positive integer"]),
    ({"name": "model_completion", "steps": -1}, ["attacks[0]", "steps must be a positive integer"]),
    ({"name": "rmle", "lr": NAN}, ["attacks[0]", "lr must be > 0, got nan"]),
])
def test_budgets_must_be_positive_in_a_spec(attack, words):
    with pytest.raises(ConfigError) as err:
        parse_spec({**SPEC, "attacks": [attack]})
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


@pytest.mark.parametrize(("options", "expected"), [
    ('{"iters": -5}', "--options for rmle: iters must be a positive integer, got -5"),
    ('{"iters": "abc"}', "--options for rmle: iters must be a positive integer, got 'abc'"),
    ('{"iters": 0}', "--options for rmle: iters must be a positive integer, got 0"),
])
def test_budgets_must_be_positive_on_the_command_line(tmp_path, options, expected):
    # Checked before the checkpoint is read: it does not even exist.
    result = CliRunner().invoke(app, ["attack", str(tmp_path / "none.safetensors"), "--attack", "rmle",
                                      "--options", options])
    assert result.exit_code == 2 and expected in result.output
    assert "Traceback" not in result.output


def _spec(tmp_path: Path, attacks: str) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(f"dataset: mnist-5k\nsplits: [ReLU2]\nattacks: {attacks}\n"
                    "train: {epochs: 1, train_n: 200}\nevaluation: {test_n: 100}\n")
    return path


def test_weak_attacks_are_refused_before_anything_runs(tmp_path):
    spec = _spec(tmp_path, "[{name: rmle, iters: 300}, {name: inverse_network, steps: 100}]")
    db = tmp_path / "gate.db"
    result = CliRunner().invoke(app, ["audit", str(spec), "--db", str(db), "--max-ssim", "0.3"])
    assert result.exit_code == 2, result.output
    assert "rmle: iters=300 (minimum 1000)" in result.output  # the budgets are printed first
    assert "inverse_network: steps=100 (minimum 1000), batch_size=64 (default; minimum 32)" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: spec field attacks[0].iters (rmle): 300 is below the audit's minimum 1000; raise it, or pass "
        "--allow-weak-attacks",
        "error: spec field attacks[1].steps (inverse_network): 100 is below the audit's minimum 1000; raise it, "
        "or pass --allow-weak-attacks"]
    assert not db.exists()  # nothing ran


def test_a_bar_without_its_attack_is_refused_even_with_weak_attacks_allowed(tmp_path):
    spec = _spec(tmp_path, "[{name: model_completion}]")
    result = CliRunner().invoke(app, ["audit", str(spec), "--db", str(tmp_path / "g.db"), "--max-psnr", "20",
                                      "--allow-weak-attacks"])
    assert result.exit_code == 2
    from splitshield.attacks import ATTACKS, InversionAttack

    names = [n for n, cls in ATTACKS.items() if issubclass(cls, InversionAttack)]
    assert (f"error: --max-psnr: the spec's attacks do not measure psnr; add an inversion attack "
            f"({', '.join(names[:-1])} or {names[-1]}) to its attacks (a gate with no attack cannot fail)"
            ) in result.output.replace("\n", " ")
    assert not (tmp_path / "g.db").exists()


def _fake_cells(monkeypatch, metrics: list[tuple[str, int, float]] | None = None, error: str | None = None):
    """Every cell's worker returns these metrics (or fails with ``error``) at once: no training."""
    def run_unit(unit, root, progress=False, threads=1):
        for cell in unit["cells"]:
            yield CellOutcome(cell["hash"], metrics=list(metrics or []), error=error)

    monkeypatch.setattr("splitshield.experiment.run_unit", run_unit)


def test_audit_fails_on_a_nan_metric_end_to_end(tmp_path, monkeypatch):
    _fake_cells(monkeypatch, [("accuracy", -1, 0.9), ("ssim", -1, NAN), ("psnr", -1, NAN), ("mse", -1, NAN)])
    spec = _spec(tmp_path, "[{name: rmle}]")
    result = CliRunner().invoke(app, ["audit", str(spec), "--db", str(tmp_path / "g.db"), "--max-ssim", "0.3", "-q"])
    assert result.exit_code == 1, result.output
    assert "FAIL mnist-5k/lenet/ReLU2 defense=none attack=rmle seed=0: ssim is NaN: the attack produced no number" \
        in result.output
    assert "PASS" not in result.output


def test_audit_fails_on_a_failed_cell_end_to_end(tmp_path, monkeypatch):
    _fake_cells(monkeypatch, error="RuntimeError: out of memory")
    spec = _spec(tmp_path, "[{name: rmle}]")
    result = CliRunner().invoke(app, ["audit", str(spec), "--db", str(tmp_path / "g.db"), "--max-ssim", "0.3", "-q"])
    assert result.exit_code == 1, result.output
    assert "the cell failed (RuntimeError: out of memory): it measured nothing" in result.output


def test_weak_attacks_allowed_pass_is_labelled(tmp_path, monkeypatch):
    _fake_cells(monkeypatch, [("accuracy", -1, 0.9), ("ssim", -1, 0.1), ("psnr", -1, 8.0), ("mse", -1, 0.2)])
    spec = _spec(tmp_path, "[{name: rmle, iters: 10}]")
    result = CliRunner().invoke(app, ["audit", str(spec), "--db", str(tmp_path / "g.db"), "--max-ssim", "0.3", "-q",
                                      "--allow-weak-attacks"])
    assert result.exit_code == 0, result.output
    assert "warning: weak attack allowed: spec field attacks[0].iters (rmle): 10 is below" in result.output
    assert "PASS (with weak attacks: not evidence of privacy)" in result.output
    strong = _spec(tmp_path, "[{name: rmle, iters: 1000}]")
    result = CliRunner().invoke(app, ["audit", str(strong), "--db", str(tmp_path / "g.db"), "--max-ssim", "0.3",
                                      "-q"])
    assert result.exit_code == 0 and "PASS every attack" in result.output and "with weak attacks" not in result.output


# --------------------------------------------------------------------------------------------------
# read-only reading


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def strangers(tmp_path) -> list[Path]:
    """An SQLite database of another program, a text file and an empty file."""
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 50)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    return [other, text, empty]


def test_report_refuses_a_file_that_is_not_a_store_and_leaves_it_unchanged(strangers, tmp_path):
    other, text, empty = strangers
    before = {p: _digest(p) for p in strangers}
    expected = {other: "expected the tables runs, cells, metrics, artifacts, its tables are notes",
                text: "not an SQLite database", empty: "it has no tables"}
    for path in strangers:
        with pytest.raises(ConfigError, match="is not a splitshield results store") as err:
            build_report(path, tmp_path / "out")
        assert str(path) in str(err.value) and expected[path] in str(err.value)
        result = CliRunner().invoke(app, ["report", str(path), "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert {p: _digest(p) for p in strangers} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.txt", "other.db"]  # no out/, no journal


def test_report_reads_a_store_without_writing_it(tmp_path):
    db = tmp_path / "results.db"
    with ResultStore(db) as s:
        _add(s, s.start_run("t", {}, "local", 1), "c", "model_completion", {"accuracy": 0.9,
                                                                            "completion_accuracy": 0.3})
    before = _digest(db)
    build_report(db, tmp_path / "report")
    assert _digest(db) == before
    with ResultStore.open_readonly(db) as ro, pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.start_run("x", {}, "local", 0)


def test_open_readonly_never_creates_a_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ResultStore.open_readonly(tmp_path / "missing.db")
    assert list(tmp_path.iterdir()) == []


def test_the_readme_audit_example_needs_allow_weak_attacks():
    """examples/noise_sweep.toml's budgets (rMLE 300, inverse network 400) are below the gate's minimums."""
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "noise_sweep.toml")
    assert weak_attacks(spec, attack_budgets(spec))


def test_fine_tuning_mixmatch_alone_on_a_u_shaped_split_is_a_weak_label_attack():
    u_shaped = {**SPEC, "splits": ["ReLU2..fc1act"]}
    mixmatch = {"name": "model_completion", "method": "mixmatch", "steps": 2000}
    spec = parse_spec({**u_shaped, "attacks": [mixmatch]})
    assert weak_attacks(spec, attack_budgets(spec)) == [
        "spec field attacks[0].fine_tune (model_completion): on a U-shaped split, mixmatch fine-tuning the cloud's "
        "part alone can under-report label leakage; set fine_tune: false or add the supervised probe, "
        "{name: model_completion}, beside it"]
    frozen = {**mixmatch, "fine_tune": False}
    for fine in ({**u_shaped, "attacks": [mixmatch, {"name": "model_completion"}]}, {**SPEC, "attacks": [mixmatch]},
                 {**u_shaped, "attacks": [frozen]}):
        spec = parse_spec(fine)
        assert weak_attacks(spec, attack_budgets(spec)) == []
