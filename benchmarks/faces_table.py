"""The faces table: every inversion cell that measured re-identification, from a results store.

One table per dataset and model (and per test order, when cells of both orders are stored): a row per split
point and attack, a column per kind of auxiliary faces the attacker holds (the victims' own other photos, or
other people's: Yang et al.'s background knowledge, KA). Each entry is PSNR (dB) / SSIM / re-identified, the
share of reconstructions an evaluator face classifier, trained by the auditor on the true images, names the
right person in (ALGORITHMS §G.7; no published split-layer numbers on AT&T faces exist to set beside them).

    PYTHONPATH=src python benchmarks/faces_table.py [--db benchmarks/results/results.db] [--out FILE.md]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tables_main  # noqa: E402

#: How a column names the attacker's auxiliary images.
AUX_NAMES = {"same_distribution": "same people, other photos", "other_distribution": "other people (KA)"}


def _aux(attack: dict[str, Any]) -> str:
    name = AUX_NAMES.get(attack.get("aux"), str(attack.get("aux")))
    return f"{name}: {attack['aux_data']}" if attack.get("aux_data") else name


def _attack(attack: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(attack.get("params", {}).items()))
    return f"{attack['name']}({params})" if params else attack["name"]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def tables(cells: list[dict[str, Any]]) -> str:
    """Markdown: per dataset, model and test order, PSNR / SSIM / re-identified per split, attack and aux kind."""
    from splitshield.data import get_dataset_info

    mine = [c for c in cells if c["defense_label"] == "none" and "reid_accuracy" in c["metrics"]]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in mine:
        order = c["config"].get("test_order", "file order")
        groups.setdefault((c["dataset"], c["model"], order), []).append(c)
    out = []
    for (dataset, model, order), group in groups.items():
        columns = list(dict.fromkeys(_aux(c["attack"]) for c in group))
        rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for c in group:
            rows.setdefault((c["split"], _attack(c["attack"])), {})[_aux(c["attack"])] = c["metrics"]
        m = group[0]["metrics"]
        classes = get_dataset_info(dataset).num_classes
        several = sum(1 for d, mm, _ in groups if (d, mm) == (dataset, model)) > 1
        title = f"### {dataset} · {model}" + (f" · test order {order}" if several else "")
        out += [title, "",
                f"Target accuracy {_pct(m.get('accuracy'))}; the evaluator names {_pct(m.get('reid_ceiling'))} of "
                f"the true victim images; chance {_pct(1 / classes)}. Entries: PSNR (dB) / SSIM / re-identified.",
                "", "| split | attack | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
        for (split, attack), by_aux in rows.items():
            entries = []
            for column in columns:
                v = by_aux.get(column)
                entries.append("–" if v is None else
                               f"{v['psnr']:.2f} / {v['ssim']:.3f} / {_pct(v.get('reid_accuracy'))}")
            out.append(f"| {split} | {attack} | " + " | ".join(entries) + " |")
        out.append("")
    return "\n".join(out) if out else "No undefended cell with re-identification is in the store.\n"


def main(argv: list[str] | None = None) -> None:
    tables_main(__doc__, "Faces: reconstruction and re-identification", "faces_table.py", tables, argv)


if __name__ == "__main__":
    main()
