"""InfoScissors' U-shaped table beside the cells the engine measured, from a results store.

Every completion cell on a U-shaped split (``a..b``: the device runs the head and the classifier, the cloud the
middle) is one row: the target's clean accuracy, the curious cloud's model-completion accuracy with its labelled
images, and the same labels' worth without the device (the architecture trained from scratch on them). Above
them, InfoScissors' own row (ALGORITHMS §C and §G.2: ResNet-18 on CIFAR-10, 40 labels). Grouped by dataset,
model and split; on CIFAR-10 ours are measured on a JPEG (quality 75) copy of the images.

    PYTHONPATH=src python benchmarks/infoscissors_table.py [--db benchmarks/results/results.db] [--out FILE.md]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from splitshield.models.split import U_SEPARATOR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tables_main  # noqa: E402

#: InfoScissors' Table (ResNet-18, CIFAR-10, no defense): clean accuracy, Fu et al.'s model completion with 40
#: labels, training from scratch with the same 40 labels, in %.
PAPER = {"dataset": "cifar10", "clean": 77.20, "completion": 69.31, "scratch": 15.34}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def tables(cells: list[dict[str, Any]]) -> str:
    """Markdown: per dataset, model and U-shaped split, the paper's row and one row per completion cell."""
    mine = [c for c in cells if U_SEPARATOR in c["split"] and "completion_accuracy" in c["metrics"]]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in mine:
        groups.setdefault((c["dataset"], c["model"], c["split"]), []).append(c)
    out = []
    for (dataset, model, split), group in sorted(groups.items()):
        group.sort(key=lambda c: (c["defense_label"] != "none", c["defense_label"], c["attack_label"]))
        out += [f"### {dataset} · {model} · {split}", "",
                "| defense | clean accuracy | attack | completion accuracy | its labels, from scratch |",
                "|---|---:|---|---:|---:|"]
        if dataset == PAPER["dataset"]:
            out.append(f"| InfoScissors' ResNet-18 (paper), none | {PAPER['clean']:.2f} % | Fu et al.'s model "
                       f"completion, 40 labels | {PAPER['completion']:.2f} % | {PAPER['scratch']:.2f} % |")
        for c in group:
            m = c["metrics"]
            out.append(f"| {c['defense_label']} | {_pct(m.get('accuracy'))} | {c['attack_label']} "
                       f"| {_pct(m['completion_accuracy'])} | {_pct(m.get('scratch_accuracy'))} |")
        out.append("")
    return "\n".join(out) if out else "No completion cell on a U-shaped split is in the store.\n"


def main(argv: list[str] | None = None) -> None:
    tables_main(__doc__, "InfoScissors' U-shaped table beside ours", "infoscissors_table.py", tables, argv)


if __name__ == "__main__":
    main()
