"""Overhead of the store and the executors per cell, against the cell's own compute.

Runs one small spec (mnist-5k, LeNet, 2 splits x 2 defenses x 3 attacks = 12 cells, small budgets)
through the local sequential executor (with and without per-cell PNG grids), 2 local processes, and a
local Ray instance, each into a fresh store, and prints per cell:

- compute: the worker's wall time for the cell (training share + attack + metrics);
- store: the driver's time to write the cell's artifacts and rows (one transaction);
- executor: everything else in the run's wall time (planning, dispatch, result transfer, process or
  Ray start-up amortised over the cells);
- the ratio (store + executor) / compute.

Also checks that every executor stored identical numbers. Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/experiment_overhead.py [--skip-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from splitshield.config import parse_spec
from splitshield.experiment import run_experiment
from splitshield.store import ResultStore

SPEC = {
    "name": "overhead",
    "dataset": "mnist-5k",
    "splits": ["conv1", "ReLU2"],
    "defenses": [{"name": "none"}, {"name": "gaussian_noise", "sigma": 0.5}],
    "attacks": [{"name": "rmle", "iters": 100}, {"name": "inverse_network", "steps": 50, "batch_size": 32},
                {"name": "model_completion", "steps": 100}],
    "train": {"epochs": 1, "train_n": 1000},
    "evaluation": {"test_n": 500},
}


def measure(label: str, db: Path, **kwargs) -> list[tuple]:
    spec = parse_spec(SPEC)
    start = time.perf_counter()
    summary = run_experiment(spec, db, progress=False, **kwargs)
    wall = time.perf_counter() - start
    n = summary.cells_done
    compute, store = summary.compute_seconds / n, summary.overhead_seconds / n
    line = (f"{label:<30} cells {n:>3}  wall {wall:6.1f} s  compute {1000 * compute:8.1f} ms  "
            f"store {1000 * store:7.1f} ms  ")
    if kwargs.get("jobs", 1) > 1 or kwargs.get("executor") == "ray":
        # Cells overlap in time, so wall - compute says nothing per cell; store/compute is still exact.
        print(line + f"executor n/a (parallel)  store/compute {store / compute:.4f}")
    else:
        executor = max(wall - summary.compute_seconds - summary.overhead_seconds, 0.0) / n
        print(line + f"executor {1000 * executor:7.1f} ms  (store+executor)/compute {(store + executor) / compute:.4f}")
    with ResultStore(db) as s:
        return s.metric_rows()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = measure("local, sequential", root / "a" / "results.db")
        runs = {"local, sequential + PNG grids": measure("local, sequential + PNG grids", root / "b" / "results.db",
                                                         pngs=True),
                "local, 2 processes": measure("local, 2 processes", root / "c" / "results.db", jobs=2)}
        if not args.skip_ray:
            try:
                import ray
            except ImportError:
                print("ray not installed: skipped")
            else:
                start = time.perf_counter()
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                print(f"(ray.init: {time.perf_counter() - start:.1f} s, not counted)")
                runs["ray, 2 CPUs"] = measure("ray, 2 CPUs", root / "d" / "results.db", executor="ray")
                ray.shutdown()
        for label, rows in runs.items():
            print(f"{label}: numbers identical to local sequential: {rows == base}")


if __name__ == "__main__":
    main()
