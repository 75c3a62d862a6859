"""benchmarks/infoscissors_table.py: InfoScissors' row above each U-shaped completion cell."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "infoscissors_table.py"
spec = importlib.util.spec_from_file_location("infoscissors_table", SCRIPT)
infoscissors_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infoscissors_table)


def _cell(split: str, defense: str, attack: str, completion: float, dataset: str = "cifar10") -> dict:
    return {"dataset": dataset, "model": "resnet20", "split": split, "defense_label": defense, "attack_label": attack,
            "metrics": {"accuracy": 0.752, "completion_accuracy": completion, "scratch_accuracy": 0.214}}


def test_each_u_shaped_completion_cell_is_a_row_under_the_papers():
    cells = [_cell("relu..layer3.1", "infoscissors(label_lam=0.1)", "model_completion", 0.308),
             _cell("relu..layer3.1", "none", "model_completion", 0.439),
             _cell("layer3.1", "none", "model_completion", 0.9),  # two-part: not InfoScissors' setting
             _cell("ReLU2..fc1act", "none", "model_completion", 0.7, dataset="mnist")]
    lines = infoscissors_table.tables(cells).splitlines()
    assert "### cifar10 · resnet20 · relu..layer3.1" in lines and "### mnist · resnet20 · ReLU2..fc1act" in lines
    rows = [line for line in lines if line.startswith("| ") and "---" not in line and "defense |" not in line]
    assert rows[0] == ("| InfoScissors' ResNet-18 (paper), none | 77.20 % | Fu et al.'s model completion, 40 labels "
                       "| 69.31 % | 15.34 % |")
    # the undefended row first, percentages of the stored fractions; no paper row for another dataset
    assert rows[1] == "| none | 75.2 % | model_completion | 43.9 % | 21.4 % |"
    assert rows[2].startswith("| infoscissors(label_lam=0.1) |") and "| 30.8 % |" in rows[2]
    assert rows[3].startswith("| none |") and "70.0 %" in rows[3] and len(rows) == 4  # 90.0 % (two-part) left out
