"""benchmarks/faces_table.py: one row per split and attack, one column per kind of auxiliary faces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faces_table.py"
spec = importlib.util.spec_from_file_location("faces_table", SCRIPT)
faces_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(faces_table)


def _cell(split: str, attack: str, aux: str, psnr: float, reid: float | None, *, order: str | None = "classes_in_turn",
          defense: str = "none", seed: int = 0, accuracy: float = 0.85) -> dict:
    config = {"test_order": order} if order else {}
    setting = {"name": attack, "aux": aux, "params": {}}
    if aux == "other_distribution":
        setting["aux_data"] = "att-faces-last20"
    metrics = {"accuracy": accuracy, "psnr": psnr, "ssim": psnr / 100, "reid_ceiling": 0.95}
    if reid is not None:
        metrics["reid_accuracy"] = reid
    return {"dataset": "att-faces-first20", "model": "lenet", "split": split, "defense_label": defense,
            "attack": setting, "config": config, "metrics": metrics, "seed": seed}


def test_rows_are_split_and_attack_columns_the_attackers_faces():
    cells = [_cell("conv1", "shadow_head", "same_distribution", 18.64, 0.95),
             _cell("ReLU2", "shadow_head", "other_distribution", 10.03, 0.0, accuracy=0.8),
             _cell("conv1", "shadow_head", "other_distribution", 12.16, 0.55),  # joins its split's row
             _cell("ReLU2", "shadow_head", "same_distribution", 12.87, 0.85, defense="gaussian_noise(sigma=1)"),
             _cell("ReLU2", "mnist_like", "same_distribution", 30.0, None)]  # no re-identification: not a face cell
    lines = faces_table.tables(cells).splitlines()
    assert lines[0] == "### att-faces-first20 · lenet"  # one test order, one seed: neither named
    assert "chance 5 %" in lines[2] and "names 95 %" in lines[2]
    assert lines[4] == ("| split | target accuracy | attack | same people, other photos "
                        "| other people (KA): att-faces-last20 |")
    rows = lines[6:]
    assert rows[0] == "| conv1 | 85 % | shadow_head | 18.64 / 0.186 / 95 % | 12.16 / 0.122 / 55 % |"
    # a defended cell is not in the undefended table, so ReLU2 has only the other people's entry
    assert rows[1] == "| ReLU2 | 80 % | shadow_head | – | 10.03 / 0.100 / 0 % |"
    assert len(rows) == 2


def test_rows_of_one_split_stay_together_in_the_order_the_splits_came():
    cells = [_cell("conv1", "rmle", "same_distribution", 120.0, 0.95),
             _cell("ReLU2", "rmle", "same_distribution", 27.0, 0.95),
             _cell("conv1", "inverse_network", "same_distribution", 32.0, 0.95)]
    rows = [line.split(" | ")[0:3] for line in faces_table.tables(cells).splitlines()[6:]]
    assert rows == [["| conv1", "85 %", "rmle"], ["| conv1", "85 %", "inverse_network"], ["| ReLU2", "85 %", "rmle"]]


def test_seeds_are_tables_of_their_own_not_one_row_overwriting_another():
    cells = [_cell("conv1", "rmle", "same_distribution", 121.0, 0.95),
             _cell("conv1", "rmle", "same_distribution", 60.0, 0.9, seed=1)]
    text = faces_table.tables(cells)
    titles = [line for line in text.splitlines() if line.startswith("###")]
    assert titles == ["### att-faces-first20 · lenet · seed 0", "### att-faces-first20 · lenet · seed 1"]
    assert "121.00 / 1.210" in text and "60.00 / 0.600" in text


def test_cells_of_two_test_orders_are_two_tables_named_by_their_order():
    cells = [_cell("conv1", "rmle", "same_distribution", 121.0, 0.95, order=None),
             _cell("conv1", "rmle", "same_distribution", 120.0, 0.95)]
    titles = [line for line in faces_table.tables(cells).splitlines() if line.startswith("###")]
    assert titles == ["### att-faces-first20 · lenet · test order file order",
                      "### att-faces-first20 · lenet · test order classes_in_turn"]


def test_a_store_without_face_cells_says_so():
    assert faces_table.tables([]).startswith("No undefended cell with re-identification")
