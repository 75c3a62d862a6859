"""The demo: the packaged experiment ``_data/demo.yaml``, run by the experiment engine, then the report.

What a new user sees first: LeNet on the built-in MNIST digits, cut at ``conv1`` and at ``ReLU2``,
attacked three ways (white-box rMLE, black-box inverse network, query-free shadow head) on the first
test image of each digit (He et al.'s protocol), without a defense, with Gaussian noise, and with noise
+ CEM. It is ``splitshield run`` + ``splitshield report`` on that spec: the results store
(``results.db``), ``report.md``, ``report.html`` and ``figures/`` land in the output folder, and a rerun
in the same folder resumes instead of starting over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from .config import ExperimentSpec, parse_spec, quick_spec
from .experiment import RunSummary, run_experiment
from .report import ReportFiles, Section, build_report, output_folder


def demo_spec(seed: int = 0, device: str = "cpu", quick: bool = False) -> ExperimentSpec:
    """The demo experiment, for one ``seed`` on ``device``; ``quick``: at smoke-test budgets (:func:`quick_spec`)."""
    data = yaml.safe_load(files("splitshield").joinpath("_data/demo.yaml").read_text())
    data.update(seeds=[seed], device=device)
    spec = parse_spec(data)
    return quick_spec(spec) if quick else spec


@dataclass
class DemoResult:
    """What :func:`run_demo` ran and wrote."""

    summary: RunSummary
    report: ReportFiles

    @property
    def sections(self) -> list[Section]:
        """The report's sections: one per split point."""
        return self.report.sections


def run_demo(out_dir: str | Path = "splitshield-report", seed: int = 0, device: str = "cpu", quick: bool = False,
             jobs: int = 2, progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo experiment into ``out_dir/results.db`` (``results-quick.db`` when ``quick``, so smoke runs
    never mix with real ones) with ``jobs`` worker processes, and write the report beside it.

    The numbers do not depend on ``jobs``: every cell runs with one torch thread and its own seed."""
    out = output_folder(out_dir)
    db = out / ("results-quick.db" if quick else "results.db")
    summary = run_experiment(demo_spec(seed, device, quick), db, jobs=jobs, progress=progress, log=log)
    report = build_report(db, out, title="LeNet / MNIST digits: what the features sent to the cloud give away")
    return DemoResult(summary, report)
