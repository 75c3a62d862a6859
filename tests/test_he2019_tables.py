"""benchmarks/he2019_tables.py: each cell beside the row of He et al.'s tables its attack measures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "he2019_tables.py"
spec = importlib.util.spec_from_file_location("he2019_tables", SCRIPT)
he2019_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(he2019_tables)


def _cell(split: str, attack: dict, psnr: float, images="first_per_class", defense=None) -> dict:
    return {"dataset": "cifar10", "model": "cifar-cnn", "split": split, "attack_label": attack["name"],
            "metrics": {"psnr": psnr, "ssim": 0.5},
            "config": {"defense": defense or {"name": "none"}, "attack": {"params": {}, **attack},
                       "evaluation": {"images": images}}}


def test_attacks_map_to_he_et_als_rows():
    row = he2019_tables.paper_row
    assert row({"name": "rmle", "aux": "same_distribution"}) == "white-box (rMLE)"
    assert row({"name": "inverse_network", "aux": "noise"}) == "black-box, random set"
    assert row({"name": "inverse_network", "aux": "random_fields"}) == "black-box, random set"  # also data-free
    assert row({"name": "shadow_head", "aux": "same_distribution", "params": {"shadow": "different"}}) == \
        "query-free, other set, other net"
    assert row({"name": "shadow_head", "aux": "same_set"}) == "query-free, same set, same net"  # default: same net
    assert row({"name": "model_reconstruction", "aux": "same_set"}) == "black-box, model reconstruction"  # Table 8
    assert row({"name": "model_reconstruction", "aux": "noise"}) is None  # Table 8 has the training set only
    assert row({"name": "unsplit", "aux": "same_distribution"}) is None


def test_each_cell_is_beside_its_row_with_the_difference_and_the_rows_still_missing():
    cells = [_cell("ReLU22", {"name": "rmle", "aux": "same_distribution"}, 21.47),
             _cell("ReLU22", {"name": "inverse_network", "aux": "same_set"}, 18.81),
             _cell("ReLU22", {"name": "rmle", "aux": "same_distribution"}, 30.0, defense={"name": "dropout"}),
             _cell("conv11", {"name": "unsplit", "aux": "same_distribution"}, 9.0, images=1000)]
    text = he2019_tables.tables(cells)
    lines = text.splitlines()
    # Paper (Table 3, ReLU22) 19.47 dB: +2.00 meets the margin; Table 4 same set 19.81 dB: -1.00 does not.
    assert any("| ReLU22 | white-box (rMLE) |" in line and "| +2.00 | yes |" in line for line in lines)
    assert any("| ReLU22 | black-box, same set |" in line and "| -1.00 | no |" in line for line in lines)
    assert "30.00" not in text  # a defended cell is not He et al.'s undefended row
    assert "### cifar10 · cifar-cnn · 1000 images" in text and "| conv11 | — | unsplit |" in text
    ten = text[text.index("He et al.'s 10 images"):]  # the group after the 1000-image one
    missing = next(line for line in ten.splitlines() if line.startswith("Not measured yet"))
    assert "white-box (rMLE) at conv11" in missing and "black-box, random set at ReLU22" in missing
    assert "white-box (rMLE) at ReLU22" not in missing and "black-box, same set at ReLU22" not in missing


def test_an_attack_reads_with_every_setting_it_ran_with():
    label = he2019_tables.attack_label
    assert label({"name": "inverse_network", "aux": "same_set", "params": {"refit": True}}) == \
        "inverse_network(aux=same_set, refit=True)"
    assert label({"name": "inverse_network", "aux": "same_set", "params": {}}) == "inverse_network(aux=same_set)"
    assert label({"name": "rmle", "aux": "same_distribution", "params": {}}) == "rmle"


def test_a_cell_of_another_seed_says_so_beside_seed_0():
    cells = [_cell("conv11", {"name": "rmle", "aux": "same_distribution"}, 108.0)]
    cells.append({**cells[0], "metrics": {"psnr": 100.0, "ssim": 0.5}, "config": {**cells[0]["config"], "seed": 2}})
    rows = [line for line in he2019_tables.tables(cells).splitlines() if line.startswith("| conv11")]
    assert [r.split(" | ")[2] for r in rows] == ["rmle", "rmle, seed 2"]
