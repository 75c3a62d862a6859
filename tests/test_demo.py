"""The demo: the packaged spec through the experiment engine, the terminal table and the report."""

from __future__ import annotations

from typer.testing import CliRunner

from splitshield.cli import app
from splitshield.demo import demo_spec, run_demo
from splitshield.experiment import defense_family


def test_packaged_spec_is_the_design_demo():
    spec = demo_spec()
    assert spec.dataset == ["mnist-5k"] and spec.model == ["lenet"] and spec.splits == ["conv1", "ReLU2"]
    assert [a.name for a in spec.attacks] == ["rmle", "inverse_network", "shadow_head"]
    assert [defense_family(d) for d in spec.defense_settings()] == ["none", "gaussian_noise", "gaussian_noise+cem"]
    quick = demo_spec(seed=3, quick=True)
    assert quick.seeds == [3] and quick.train.epochs == 1
    assert all(s["params"]["iters" if s["name"] == "rmle" else "steps"] == 20 for s in quick.attack_settings())


def test_quick_demo_runs_end_to_end_and_resumes(tmp_path, one_thread):
    result = run_demo(tmp_path, quick=True, progress=False)
    assert result.summary.cells_total == 18 and result.summary.cells_done == 18 and not result.summary.failures
    assert [s.split for s in result.sections] == ["conv1", "ReLU2"]
    for section in result.sections:
        assert len(section.rows) == 3 and len(section.inversion_attacks) == 3
        for row in section.rows:
            assert 0 <= row.accuracy <= 1
            assert all(-1 <= row.attacks[a]["ssim"] <= 1 for a in section.inversion_attacks)
    assert result.report.html.is_file() and result.report.markdown.is_file() and len(result.report.figures) == 6
    assert not (tmp_path / "results.db").exists()  # smoke runs keep their own store

    out = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "split conv1" in out.output and "split ReLU2" in out.output and "rmle" in out.output
    assert "report.html" in out.output
    again = run_demo(tmp_path, quick=True, progress=False)
    assert again.summary.cells_done == 0 and again.summary.cells_skipped == 18


def test_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    out = CliRunner().invoke(app, ["demo", "--quick", "--out", str(target)])
    assert out.exit_code == 2 and "is a file; pass the path of a folder (--out)" in out.output
    assert "Traceback" not in out.output and target.read_text() == "not a folder"
