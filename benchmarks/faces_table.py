"""The faces table: every inversion cell that measured re-identification, from a results store.

One table per dataset and model (and per test order and seed, when the store holds several): a row per split
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
    """Markdown: per dataset, model, test order and seed, PSNR / SSIM / re-identified per split, attack and aux kind."""
    from splitshield.data import get_dataset_info

    mine = [c for c in cells if c["defense_label"] == "none" and "reid_accuracy" in c["metrics"]]
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for c in mine:
        order = c["config"].get("test_order", "file order")
        groups.setdefault((c["dataset"], c["model"], order, c["seed"]), []).append(c)
    out = []
    for (dataset, model, order, seed), group in groups.items():
        columns = list(dict.fromkeys(_aux(c["attack"]) for c in group))
        splits = list(dict.fromkeys(c["split"] for c in group))
        rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for c in sorted(group, key=lambda c: splits.index(c["split"])):
            rows.setdefault((c["split"], _attack(c["attack"])), {})[_aux(c["attack"])] = c["metrics"]
        ceilings = [_pct(v) for v in sorted({c["metrics"].get("reid_ceiling") or 0.0 for c in group})]
        others = [k for k in groups if k[:2] == (dataset, model) and k != (dataset, model, order, seed)]
        title = f"### {dataset} · {model}"
        title += f" · test order {order}" if any(k[2] != order for k in others) else ""
        title += f" · seed {seed}" if any(k[3] != seed for k in others) else ""
        out += [title, "",
                f"The evaluator names {' / '.join(ceilings)} of the true victim images; chance "
                f"{_pct(1 / get_dataset_info(dataset).num_classes)}. Entries: PSNR (dB) / SSIM / re-identified.",
                "", "| split | target accuracy | attack | " + " | ".join(columns) + " |",
                "|---|---:|---|" + "---:|" * len(columns)]
        for (split, attack), by_aux in rows.items():
            entries = []
            for column in columns:
                v = by_aux.get(column)
                entries.append("–" if v is None else
                               f"{v['psnr']:.2f} / {v['ssim']:.3f} / {_pct(v.get('reid_accuracy'))}")
            accuracy = _pct(next(iter(by_aux.values())).get("accuracy"))
            out.append(f"| {split} | {accuracy} | {attack} | " + " | ".join(entries) + " |")
        out.append("")
    return "\n".join(out) if out else "No undefended cell with re-identification is in the store.\n"


def main(argv: list[str] | None = None) -> None:
    tables_main(__doc__, "Faces: reconstruction and re-identification", "faces_table.py", tables, argv)


if __name__ == "__main__":
    main()
