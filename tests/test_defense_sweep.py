"""The defense sweep's bookkeeping: the CEM gain it prints and ``--resume`` (no training: cells are faked)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "defense_sweep.py"
_spec = importlib.util.spec_from_file_location("defense_sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _row(strength: float, lam: float, accuracy: float, bb_mse: float, **extra) -> dict:
    row = {"dataset": "mnist", "model": "lenet", "bound": "none", "epochs": 3, "batch_size": 128,
           "bb_raw_features": False, "base": "noise",
           "strength": strength, "lam": lam, "cem_k": 5, "cem_tau": 0.125, "cem_variance": "mean", "seed": 0,
           "accuracy": accuracy, "bb": {"mse": bb_mse, "ssim": 0.5, "psnr": 20.0},
           "wb": {"mse": 0.02, "ssim": 0.5, "psnr": 17.0}, "floor": 1e-4, "floor_ok": True, "noise_std": strength,
           "learned_noise_std": None, "feature_std": 1.0, "train_time": 10.0 * (1 + (lam > 0)), "adaptive": True}
    return {**row, **extra}


def test_cem_gain_matches_within_one_point_and_interpolates_the_no_cem_curve():
    rows = [_row(0.5, 0, 0.98, 0.010), _row(0.5, 16, 0.975, 0.015),  # 0.5 points apart: matched, +50 %
            _row(1.0, 0, 0.97, 0.012), _row(1.0, 16, 0.95, 0.020)]  # 2 points apart: not matched, +66.7 %
    (gain,) = sweep.cem_gains(rows)
    assert gain["matched"] == pytest.approx([0.5])
    assert gain["all"] == pytest.approx([0.5, 0.02 / 0.012 - 1])
    # The no-CEM curve at 97.5 % lies halfway between (97 %, 0.012) and (98 %, 0.010); 95 % is off the curve.
    assert gain["curve_matched"] == pytest.approx([0.015 / 0.011 - 1])
    assert gain["time_ratio"] == pytest.approx(2.0)


def test_cells_of_another_protocol_are_never_paired():
    rows = [_row(0.5, 0, 0.98, 0.010), _row(0.5, 16, 0.975, 0.015, batch_size=64)]
    assert all(not g["all"] for g in sweep.cem_gains(rows))
    older = {k: v for k, v in _row(0.5, 16, 0.975, 0.015).items() if k != "bb_raw_features"}  # before the field
    assert sweep._setting(older).endswith("/raw-bb")
    assert all(not g["all"] for g in sweep.cem_gains([_row(0.5, 0, 0.98, 0.010), older]))


@pytest.fixture
def fake_sweep(monkeypatch):
    """Run ``main`` with cells that cost nothing; yields the list of cells actually measured."""
    threads = torch.get_num_threads()  # main() sets the thread count for the whole process
    measured: list[tuple[float, float]] = []

    def run_cell(args, data, train, base, strength, lam):
        measured.append((strength, lam))
        return _row(strength, lam, 0.98 - 0.001 * lam, 0.01 * (1 + lam / 32), seed=args.seed, epochs=args.epochs,
                    batch_size=args.batch_size, bound=args.bound, base=base,
                    cem_sigma=sweep._cem_sigma(args, base, lam))

    monkeypatch.setattr(sweep, "run_cell", run_cell)
    monkeypatch.setattr(sweep, "load_dataset", lambda name, **kw: SimpleNamespace(name=name, train=[0] * 8,
                                                                                   test=[0] * 8))
    yield measured
    torch.set_num_threads(threads)


def _main(out: Path, *extra: str) -> None:
    sweep.main(["--bound", "none", "--train-size", "0", "--epochs", "3", "--batch-size", "128", "--bases", "noise",
                "--noise-lambdas", "0", "16", "--out", str(out), *extra])


def test_resume_runs_only_the_missing_cells_and_keeps_the_rest(fake_sweep, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    _main(out, "--strengths", "0.5", "--resume")  # no file yet: everything runs
    assert fake_sweep == [(0.5, 0.0), (0.5, 16.0)]
    _main(out, "--strengths", "0.5", "1", "--resume")
    assert fake_sweep[2:] == [(1.0, 0.0), (1.0, 16.0)]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["strength"], r["lam"]) for r in rows) == [(0.5, 0), (0.5, 16), (1.0, 0), (1.0, 16)]
    _main(out, "--strengths", "0.5", "1", "--resume")
    assert len(fake_sweep) == 4
    assert "4 cells already measured" in capsys.readouterr().out


def test_resume_refuses_a_file_of_another_protocol(fake_sweep, tmp_path):
    out = tmp_path / "sweep.json"
    _main(out, "--strengths", "0.5")
    with pytest.raises(SystemExit, match="bb_steps=1400, this run has 500"):
        _main(out, "--strengths", "0.5", "--bb-steps", "500", "--resume")
    out.write_text("not json")
    with pytest.raises(SystemExit, match="not a defense_sweep result file"):
        _main(out, "--strengths", "0.5", "--resume")


def test_without_resume_an_existing_file_is_replaced(fake_sweep, tmp_path):
    out = tmp_path / "sweep.json"
    _main(out, "--strengths", "0.5")
    _main(out, "--strengths", "1")
    assert {r["strength"] for r in json.loads(out.read_text())["rows"]} == {1.0}


def test_resume_reruns_cem_cells_of_a_base_without_noise_when_the_hinge_sigma_changes(fake_sweep, tmp_path):
    out = tmp_path / "sweep.json"
    _main(out, "--bases", "dropout", "--strengths", "0.5", "--other-lambdas", "0", "16", "--cem-sigma", "0.5")
    _main(out, "--bases", "dropout", "--strengths", "0.5", "--other-lambdas", "0", "16", "--cem-sigma", "0.2",
          "--resume")
    assert fake_sweep == [(0.5, 0.0), (0.5, 16.0), (0.5, 16.0)]  # the no-CEM cell does not depend on σ


def test_concurrent_resumed_runs_merge_their_rows_instead_of_overwriting(tmp_path):
    out = tmp_path / "sweep.json"
    first, second = (sweep.parse_args(["--bound", "none", "--resume", "--out", str(out), "--bases", base])
                     for base in ("noise", "dropout"))
    assert sweep.resumed_rows(first) == sweep.resumed_rows(second) == []  # both start before either saves
    sweep.save_rows(first, [_row(0.5, 0, 0.98, 0.01, epochs=first.epochs, batch_size=first.batch_size)])
    merged = sweep.save_rows(second, [_row(0.2, 0, 0.97, 0.01, base="dropout", epochs=second.epochs,
                                           batch_size=second.batch_size)])
    assert sorted(r["base"] for r in merged) == ["dropout", "noise"]
    assert json.loads(out.read_text())["rows"] == merged
    assert not list(tmp_path.glob("*.partial"))


def test_an_out_file_in_a_missing_folder_is_a_one_line_error_before_any_cell(fake_sweep, tmp_path):
    with pytest.raises(SystemExit, match="--out: folder .*missing does not exist"):
        _main(tmp_path / "missing" / "sweep.json", "--strengths", "0.5")
    assert fake_sweep == []


def test_sweeps_given_the_same_grid_share_it_through_claims(fake_sweep, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "sweep.json"
    grid = ["--bound", "none", "--train-size", "0", "--epochs", "3", "--batch-size", "128", "--bases", "noise",
            "--noise-lambdas", "0", "8", "16", "--strengths", "0.5", "--resume", "--out", str(out)]
    args = sweep.parse_args(grid)
    busy, ended, reused = (json.dumps(list(sweep._cell_key(sweep._cell_identity(args, "mnist", "noise", 0.5, lam))))
                           for lam in (0.0, 8.0, 16.0))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    parent = sweep._process_id(os.getppid())
    sweep._claims_path(args).write_text(json.dumps({
        busy: parent,  # a running sweep
        ended: f"{finished.pid}:1",  # a sweep that was killed
        reused: f"{os.getppid()}:1",  # a killed sweep whose pid now belongs to another process
    }))
    sweep.main(grid)
    assert fake_sweep == [(0.5, 8.0), (0.5, 16.0)]  # the running sweep's cell is left to it
    assert "being measured by process" in capsys.readouterr().out
    assert json.loads(sweep._claims_path(args).read_text()) == {busy: parent}
    sweep._claims_path(args).unlink()
    sweep.main([*grid[:-5], "--strengths", "1", "--resume", "--out", str(out)])
    assert not sweep._claims_path(args).exists()  # a sweep leaves no claims file behind


def test_rows_of_an_online_decoder_fed_raw_features_are_a_setting_of_their_own():
    old = _row(0.3, 0, 0.98, 0.01, base="adversarial")  # written before the field existed
    new = _row(0.3, 0, 0.98, 0.01, base="adversarial", adversary_raw_features=False)
    assert sweep._setting(old).endswith("/raw-adv") and not sweep._setting(new).endswith("/raw-adv")
    assert not sweep._setting(_row(0.5, 0, 0.98, 0.01)).endswith("/raw-adv")  # noise has no online decoder


def test_shredder_rows_swept_over_lambda_are_a_setting_of_their_own():
    shredder = sweep.BASES["shredder"][2](1.0, (16, 8, 8), True)
    assert (shredder.init_scale, shredder.lam) == (1.0, 1.0)  # the sweep's Shredder strength is b0
    old = _row(1.0, 0, 0.98, 0.01, base="shredder")  # written when the strength was Shredder's λ
    new = _row(1.0, 0, 0.98, 0.01, base="shredder", param="b0")
    assert sweep._setting(old).endswith("/shredder-lam") and not sweep._setting(new).endswith("/shredder-lam")
    assert sweep._cell_key(old) != sweep._cell_key(new)
    assert sweep._setting(_row(0.5, 0, 0.98, 0.01)) == sweep._setting(_row(0.5, 0, 0.98, 0.01, param="sigma"))


def test_a_row_another_process_rewrote_meanwhile_is_not_overwritten(fake_sweep, tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    _main(out, "--strengths", "0.5", "--resume")
    fake_run_cell = sweep.run_cell

    def run_cell_while_another_process_saves(args, *rest):
        saved = json.loads(out.read_text())
        saved["rows"][0]["accuracy"] = 0.5  # another sweep (say, with newer code) measured that cell again
        out.write_text(json.dumps(saved))
        return fake_run_cell(args, *rest)

    monkeypatch.setattr(sweep, "run_cell", run_cell_while_another_process_saves)
    _main(out, "--strengths", "0.5", "1", "--resume")
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and {r["accuracy"] for r in rows if r["strength"] == 0.5} >= {0.5}


def test_a_corrupt_claims_file_is_a_one_line_error(fake_sweep, tmp_path):
    out = tmp_path / "sweep.json"
    (tmp_path / "sweep.json.claims").write_text("not json")
    with pytest.raises(SystemExit, match="is not a claims file .*delete it when no sweep is running"):
        _main(out, "--strengths", "0.5", "--resume")
    assert fake_sweep == []


def test_tail_only_epochs_leave_the_edge_head_and_its_defense_as_they_were():
    from splitshield import ImageSet, Trainer
    from splitshield.defenses import CEM, GaussianNoise, Shredder

    target, _ = sweep.build_target("lenet", 1, "none")
    defense = Shredder(target.feature_shape(), init_scale=0.1) + GaussianNoise(0.5) + CEM(16, k=2)
    g = torch.Generator().manual_seed(0)
    data = ImageSet((torch.rand(64, 1, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(64) % 4,
                    tuple("abcd"))
    trainer = Trainer(target, defense, epochs=1, batch_size=16, progress=False)
    trainer.fit(data)
    edge = {k: v.clone() for k, v in [*target.head.state_dict().items(), *defense.state_dict().items()]}
    tail = {k: v.clone() for k, v in target.tail.state_dict().items()}
    sweep._fit_tail_only(trainer, data, 2)
    assert trainer.epoch == 3
    assert all(torch.equal(v, {**target.head.state_dict(), **defense.state_dict()}[k]) for k, v in edge.items())
    assert any(not torch.equal(v, target.tail.state_dict()[k]) for k, v in tail.items())
    assert all(p.requires_grad for p in [*target.head.parameters(), *defense.parameters()])  # unfrozen after


def test_tail_only_epochs_are_a_protocol_of_their_own():
    assert sweep._setting(_row(0.5, 0, 0.98, 0.01, tail_epochs=1)).endswith("/e3+t1b128")
    assert sweep._setting(_row(0.5, 0, 0.98, 0.01, tail_epochs=0)) == sweep._setting(_row(0.5, 0, 0.98, 0.01))


def test_negative_tail_epochs_are_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--tail-epochs", "-1"])
    err = capsys.readouterr().err
    assert "--tail-epochs must be >= 0" in err and "Traceback" not in err
