"""Import the rows of the retired ``defense_sweep.py`` (``benchmarks/results/*.json``) into a results store, once.

Each JSON row (one trained and attacked model) becomes two cells of the store, one per attack (the inverse
network and white-box rMLE), with its defense written as the spec config that describes it (so that
``splitshield report`` pairs them with and without CEM like any other cells). The cells are labelled as
imported: their config says ``"revision": "imported"`` and names the file and the sweep's protocol, the report
shows them in sections of their own ("imported from ..."), and ``splitshield run`` never mistakes them for
cells of its own (their hashes differ from any spec cell's).

    PYTHONPATH=src python benchmarks/import_sweep_json.py benchmarks/results/*.json --db benchmarks/results/results.db
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from splitshield.experiment import attack_labels, defense_label
from splitshield.measure import config_hash
from splitshield.store import CellRecord, ResultStore

#: The sweep's base name -> (defense name, strength parameter, fixed parameters).
BASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "noise": ("gaussian_noise", "sigma", {}),
    "dropout": ("dropout", "rate", {}),
    "topk": ("topk", "ratio", {}),
    "nopeek": ("nopeek", "alpha", {}),
    "adversarial": ("adversarial", "alpha", {"width": 16}),
    "vib": ("vib", "beta", {}),
    "shredder": ("shredder", "init_scale", {"lam": 1.0}),
    "infoscissors": ("infoscissors", "lam", {"width": 16}),
}
ONLINE_ADVERSARY = ("adversarial", "infoscissors")
CEM_DEFAULTS = {"k": 5, "tau": 0.125, "variance": "mean"}


def defense_config(row: dict[str, Any]) -> dict[str, Any]:
    """The spec config of a row's defense: [feature bound] + base at its strength [+ CEM]."""
    name, param, fixed = BASES[row["base"]]
    if row["base"] == "shredder" and row.get("param", "lam") == "lam":  # rows from before b0 was the strength
        param, fixed = "lam", {}
    base = {"name": name, param: row["strength"], **fixed}
    # Rows without the flag were written before the online decoder standardised its input.
    if row["base"] in ONLINE_ADVERSARY and row.get("adversary_raw_features", True):
        base["standardize"] = False
    parts = [base]
    if row["model"] == "lenet" and row["bound"] != "none":
        parts.insert(0, {"name": "feature_bound", "kind": row["bound"]})
    if row["lam"]:
        cem = {"name": "cem", "lam": row["lam"]}
        cem.update({k: row[f"cem_{k}"] for k, v in CEM_DEFAULTS.items() if row.get(f"cem_{k}", v) != v})
        if row.get("cem_sigma") is not None:
            cem["sigma"] = row["cem_sigma"]
        parts.append(cem)
    return parts[0] if len(parts) == 1 else {"name": "compose", "parts": parts}


def attack_settings(row: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's two attacks as spec attack settings."""
    common = {"aux": "same_distribution", "aux_n": settings["aux_size"], "adaptive": row["adaptive"]}
    inverse = {"steps": settings["bb_steps"], "batch_size": settings["bb_batch"]}
    if row.get("bb_raw_features", True):
        inverse["standardize"] = False
    return [{"name": "inverse_network", "threat": "black_box", **common, "images": settings["eval_size"],
             "params": inverse},
            {"name": "rmle", "threat": "white_box", **common, "params": {"iters": settings["wb_iters"]}}]


def cells_of(path: Path) -> list[tuple[dict[str, Any], CellRecord]]:
    """Every (cell row, record) of one sweep JSON file."""
    saved = json.loads(path.read_text())
    settings, out = saved["settings"], []
    for row in saved["rows"]:
        row = {"model": settings["model"], "bound": settings.get("bound", "tanh"), **row}
        split = "ReLU2" if row["model"] == "lenet" else "sigmoid"
        defense = defense_config(row)
        train = {"epochs": row["epochs"], "batch_size": row.get("batch_size", 64), "lr": 1e-3,
                 "lr_halve_every": None, "tail_epochs": row.get("tail_epochs") or 0,
                 "train_n": settings["train_size"] or None}
        target = {"dataset": row["dataset"], "model": row["model"], "split": split, "defense": defense,
                  "seed": row["seed"], "train": train, "revision": "imported",
                  "imported": {"file": path.name, "by": "benchmarks/defense_sweep.py"}}
        target_hash = config_hash(target)
        attacks = attack_settings(row, settings)
        noise = row.get("noise_std") or row.get("learned_noise_std") or 0.0
        shared = [("accuracy", -1, row["accuracy"]), ("feature_std", -1, row["feature_std"]),
                  ("noise_std", -1, noise), ("train_seconds", -1, row["train_time"])]
        if row.get("train_cpu") is not None:
            shared.append(("train_cpu_seconds", -1, row["train_cpu"]))
        if row.get("noise_std"):
            shared.append(("ce_floor", -1, row["floor"]))
        for attack, label, result in zip(attacks, attack_labels(attacks), (row["bb"], row["wb"]), strict=True):
            config = {**target, "attack": attack,
                      "evaluation": {"images": "first_per_class", "metrics": [], "test_n": row["test_size"]}}
            cell_hash = config_hash(config)
            metrics = shared + [(m, -1, result[m]) for m in ("mse", "psnr", "ssim")]
            out.append(({"hash": cell_hash, "target_hash": target_hash, "dataset": row["dataset"],
                         "model": row["model"], "split": split, "defense": defense,
                         "defense_label": defense_label(defense), "attack": attack, "attack_label": label,
                         "seed": row["seed"], "config": config},
                        CellRecord(cell_hash, metrics, {"train_seconds": row["train_time"]})))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="defense_sweep.py result files (JSON)")
    parser.add_argument("--db", type=Path, required=True, help="results store to import into")
    args = parser.parse_args(argv)
    with ResultStore(args.db) as store:
        for path in args.files:
            cells = cells_of(path)
            run_id = store.start_run(f"imported: {path.name}", {"imported": path.name}, "import", len(cells))
            store.register_cells(run_id, [cell for cell, _ in cells])
            for _, record in cells:
                store.record(record)
            store.finish_run(run_id, len(cells))
            print(f"{path.name}: {len(cells)} cells ({len(cells) // 2} trained models)")


if __name__ == "__main__":
    main()
