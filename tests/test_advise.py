"""The split-point advisor: its costs, bytes and statistics against hand-computed truth, its recommendation on
hand-made tables, and ``advise`` end to end (API and CLI) on the built-in digits, npz and image-folder data."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import splitshield as ss
from splitshield.advisor import FastAttack, FastWhiteBox, PointAdvice, gpz_radius, pareto_front
from splitshield.advisor.costs import cpu_share, latency_ms, multiply_adds, parameter_count, weight_megabytes
from splitshield.advisor.leakage import ce_floor, fast_inversion, gpz_zone, held_out_index, relative_drops
from splitshield.advisor.pages import _plottable
from splitshield.advisor.recommend import best_cut, budget_reasons
from splitshield.advisor.wire import wire_cost
from splitshield.cli import app
from splitshield.errors import ConfigError, SplitError
from splitshield.runtime.codec import CodecOptions, WireFormat, encode, wire_roundtrip

#: A budget small enough for tests: numbers are not meaningful, only their plumbing.
TINY = FastAttack(aux_images=256, steps=15, batch_size=32)
TINY_WHITE_BOX = FastWhiteBox(iters=30)
SMALL = dict(fast=(TINY, TINY_WHITE_BOX), images=300, progress=False)


# --------------------------------------------------------------------------------------------------
# costs and bytes against hand-computed truth


def test_multiply_adds_of_a_linear_and_a_conv_by_hand():
    assert multiply_adds(nn.Linear(7, 5), torch.zeros(3, 7)) == 3 * 7 * 5  # bias adds are not multiply-adds
    conv = nn.Conv2d(2, 4, 3)  # 10×10 -> 8×8, each output a 2·3·3 dot product
    assert multiply_adds(conv, torch.zeros(1, 2, 10, 10)) == 4 * 8 * 8 * 2 * 3 * 3
    assert multiply_adds(nn.ReLU(), torch.zeros(1, 100)) == 0  # element-wise work is not counted


def test_parameters_and_megabytes_count_shared_weights_once():
    layer = nn.Linear(7, 5)  # 35 weights + 5 biases, float32
    twice = nn.Sequential(layer, nn.ReLU(), layer)
    assert parameter_count(layer) == parameter_count(twice) == 40
    assert weight_megabytes(twice) == pytest.approx(40 * 4 / 1e6)
    assert weight_megabytes(nn.BatchNorm1d(3)) == pytest.approx((3 + 3 + 3 + 3) * 4 / 1e6 + 8 / 1e6)  # int64 counter


class _Counted(nn.Module):
    """Counts its calls; each takes at least ``sleep_s`` seconds."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.calls, self.sleep_s = 0, sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.sleep_s)
        return x


def test_latency_runs_a_cheap_head_every_repeat_and_a_slow_one_twice():
    cheap, slow = _Counted(), _Counted(sleep_s=0.15)
    latency_ms(cheap, torch.zeros(4, 3), repeats=5, budget_s=60.0)
    assert cheap.calls == 1 + 5  # a warm-up, then every repeat within the budget
    assert latency_ms(slow, torch.zeros(2, 3), repeats=5, budget_s=0.25) >= 0.15 * 1000 / 2  # ms per image
    assert slow.calls == 1 + 2  # two runs already took 0.3 s > 0.25 s


def test_wire_bytes_of_known_tensors_and_accuracy_on_decoded_features():
    # Features that are the logits themselves: one-hot vectors [N, 4], one [1, 4] feature per frame.
    labels = torch.tensor([0, 1, 2, 3, 1])
    z = nn.functional.one_hot(labels, 4).float()
    header = 20 + 4 * 2  # magic..ndim, then two u32 dims
    cost = wire_cost((4,), z, nn.Identity(), labels, CodecOptions("uint8"))
    assert cost.bytes_float32 == header + 4 * 4 and cost.bytes_float16 == header + 2 * 4
    assert cost.bytes_8bit == header + 8 + 4  # + scale and offset, one byte per value
    assert cost.accuracy_8bit == 1.0  # 0 and 1 survive 8-bit coding exactly
    assert wire_cost((4,), z, nn.Identity(), (labels + 1) % 4).accuracy_8bit == 0.0
    assert wire_cost((4,), 1e5 * z).bytes_float16 is None  # 1e5 > float16's largest, 65504
    shapes_only = wire_cost((4,))
    assert (shapes_only.bytes_float32, shapes_only.bytes_8bit, shapes_only.accuracy_8bit) == (header + 16, None, None)


def test_accuracy_is_measured_on_what_the_codec_decodes(trained_lenet, mnist5k):
    # The shortcut wire_cost takes (quantise without encoding every frame) against the real wire, frame by frame.
    x, labels = mnist5k.test.take(40).tensors()
    target = ss.split(copy.deepcopy(trained_lenet), "pool2", input_shape=(1, 28, 28)).eval()
    with torch.no_grad():
        z = target.head(x)
        wire = wire_roundtrip(z, WireFormat("uint8", "zstd"), batch_size=1)
        expected = float((target.tail(wire).argmax(1) == labels).double().mean())
    cost = wire_cost((16, 4, 4), z, target.tail, labels)
    assert cost.accuracy_8bit == expected
    assert cost.bytes_8bit == sum(len(encode(z[i : i + 1], CodecOptions("uint8", "zstd"))) for i in range(40)) / 40


# --------------------------------------------------------------------------------------------------
# statistics against constructed cases


def test_gpz_radius_on_known_radii():
    # Class 0: two points at distance 1 from their centre (0, 0); class 1: two at distance 3 from (4, 0).
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [4.0, 3.0], [4.0, -3.0]])
    r2, variance = gpz_radius(z, torch.tensor([0, 0, 1, 1]))
    assert r2 == pytest.approx((1**2 + 3**2) / 2)
    # Around the overall mean (2, 0): squared distances 1, 9, 13, 13.
    assert variance == pytest.approx((1 + 9 + 13 + 13) / 4)
    assert gpz_radius(z.view(4, 1, 2), torch.tensor([0, 0, 1, 1]))[0] == pytest.approx(5.0)  # features are flattened


def test_gpz_radius_is_a_mean_over_classes_without_lone_members():
    # Class 0: radius² 1 (2 members); class 1: (10, 6) ± (0, 6) and ± (0, 2), radius² (36+4+4+36)/4 = 20 (4 members);
    # class 2: one member, radius 0 whatever the features. Mean over classes 0 and 1: 10.5 (size-weighted: 13.7;
    # with the lone member: 7).
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 4.0], [10.0, 8.0], [10.0, 12.0], [50.0, 50.0]])
    assert gpz_radius(z, torch.tensor([0, 0, 1, 1, 1, 1, 2]))[0] == pytest.approx(10.5)
    assert gpz_radius(z[:3], torch.tensor([0, 1, 2]))[0] is None  # no class with two members: no radius


def test_gpz_zone_spans_to_the_second_largest_drop_only_through_large_drops():
    # Largest drop at 2; the second largest (at 4) is reached through a drop of 0.3 > 0.2: the zone is 2..4.
    assert gpz_zone([None, 0.1, 0.7, 0.3, 0.5, 0.0]) == [2, 3, 4]
    # The same drops with 0.15 in between: the zone is the single point after the largest drop.
    assert gpz_zone([None, 0.1, 0.7, 0.15, 0.5, 0.0]) == [2]
    # The second largest drop comes first: the zone starts after the largest and does not reach back.
    assert gpz_zone([None, 0.5, 0.3, 0.7, 0.0]) == [3]
    # Right after the largest, a second largest drop of 0.01 is no zone: it must exceed 0.2 itself.
    assert gpz_zone([None, 0.9, 0.01, -0.5]) == [1] and gpz_zone([None, 0.9, 0.3, -0.5]) == [1, 2]
    assert gpz_zone([None, None]) == [] and gpz_zone([None, 0.4]) == [1]


def test_relative_drops():
    assert relative_drops([10.0, 5.0, 5.0, 0.0, 2.0, None, 1.0]) == [None, 0.5, 0.0, 1.0, None, None, None]


def test_ce_floor_is_relative_to_the_feature_scale(mnist5k):
    x, labels = mnist5k.train.take(200).tensors()
    z = nn.functional.avg_pool2d(x, 4).flatten(1)
    floor = ce_floor(x, z, labels, 0.5)
    assert floor is not None and floor > 0
    assert ce_floor(x, 100 * z, labels, 0.5) == pytest.approx(floor, rel=1e-4)  # the same signal-to-noise ratio
    assert ce_floor(x, z, labels, 2.0) > floor  # more noise, a higher floor
    with pytest.raises(ConfigError, match="constant"):  # no noise scale
        ce_floor(x, torch.ones_like(z), labels, 0.5)
    with pytest.raises(ConfigError, match="class 7 has 1 sample.*more test images"):
        ce_floor(x[:3], z[:3], torch.tensor([0, 0, 7]), 0.5)


def test_held_out_images_are_balanced_whatever_the_order():
    test = ss.ImageSet(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([1, 1, 1, 0, 0, 2]), ("a", "b", "c"))
    assert held_out_index(test, 5) == [3, 0, 5, 4, 1]


# --------------------------------------------------------------------------------------------------
# the recommendation on hand-made tables


def _row(point: str, macs: int, ms: float, nbytes: float, ssim: float | None, tail_macs: int = 100) -> PointAdvice:
    return PointAdvice(point, (1,), macs, tail_macs, 0, 0.0, ms, ms, 0, None, nbytes, ssim=ssim)


def test_pareto_front_on_a_hand_made_table():
    costs = [1, 2, 3, 4, 2, 0.5]
    leaks = [0.9, 0.5, 0.6, 0.1, 0.5, None]
    # 2 is beaten by 1 (cheaper, leaks less); 1 and 4 are equal, neither dominates; 5 has no leakage value.
    assert pareto_front(costs, leaks) == [0, 1, 3, 4]


def test_best_cut_prefers_less_leakage_then_the_tiebreak():
    assert best_cut([0.5, 0.2, 0.2, None], [True, True, True, True], [(3,), (2,), (1,), (0,)]) == 2
    assert best_cut([0.5, 0.2, 0.2], [True, False, False], [(0,), (0,), (0,)]) == 0
    assert best_cut([None, 0.1], [True, False], [(0,), (0,)]) is None


def test_advice_recommends_within_budgets_and_says_why_cuts_are_ruled_out():
    rows = [_row("a", 0, 0.1, 3000, 0.9), _row("b", 10, 0.5, 1000, 0.6), _row("c", 20, 2.0, 100, 0.2)]
    advice = ss.Advice(rows, "ssim", max_edge_ms=1.0, meta={"device": "cpu", "wire_8bit": "8-bit + zstd"})
    assert advice.recommended == "b" and advice.ruled_out == {"c": "head 2 ms > 1 ms"}
    assert advice.pareto_latency == ["a", "b", "c"] and advice.pareto_bytes == ["c"]  # c: fewest bytes, least leakage
    sentence = advice.sentence()
    assert sentence.startswith("Cut at b: 0.5 ms per image on this CPU, 1 kB per image after 8-bit + zstd")
    assert sentence.endswith(", fast-attack SSIM 0.6; every cheaper cut within the budgets (fewer head multiply-adds) "
                             "has fast-attack SSIM ≥ 0.9; c would leak less but breaks the budgets.")
    strict = ss.Advice(rows, "ssim", max_edge_ms=0.05, max_kbytes=0.5)
    assert not strict.budgets_met and strict.recommended is None
    assert strict.ruled_out == {"a": "head 0.1 ms > 0.05 ms and 3 kB > 0.5 kB",
                                "b": "head 0.5 ms > 0.05 ms and 1 kB > 0.5 kB", "c": "head 2 ms > 0.05 ms"}
    assert strict.sentence().startswith("No cut meets the budgets (head ≤ 0.05 ms per image, ≤ 0.5 kB per image)")
    floor = ss.Advice([dataclasses.replace(r, ce_floor=f) for r, f in zip(rows, (1e-3, 2e-3, 5e-3), strict=True)],
                      "ce_floor")
    assert floor.recommended == "c"  # a higher floor leaks less


def test_sentence_never_hides_a_cheaper_cut_that_leaks_less():
    # a is cheaper and leaks far less than the recommended b, but is ruled out on bytes: the sentence must not claim
    # that every cheaper cut leaks more, and must name a.
    rows = [_row("a", 0, 0.1, 50_000, 0.05), _row("b", 10, 0.5, 1000, 0.6), _row("c", 20, 2.0, 900, 0.7)]
    sentence = ss.Advice(rows, "ssim", max_kbytes=2).sentence()
    assert sentence.startswith("Cut at b:") and "every cheaper cut" not in sentence
    assert sentence.endswith("fast-attack SSIM 0.6; a would leak less but breaks the budgets.")
    # Without budgets every cheaper cut counts, and the last cut says that the device then runs the whole model.
    rows = [_row("a", 0, 0.1, 50_000, 0.8), _row("b", 10, 0.5, 1000, 0.6), _row("c", 20, 2.0, 900, 0.1, tail_macs=0)]
    assert ss.Advice(rows, "ssim").sentence().endswith(
        "fast-attack SSIM 0.1 (there the device runs the whole model: the tail has no multiply-adds); every cheaper "
        "cut (fewer head multiply-adds) has fast-attack SSIM ≥ 0.6.")


def test_a_diverged_attack_is_never_recommended():
    rows = [_row("a", 0, 0.1, 1000, math.nan), _row("b", 10, 0.5, 1000, 0.6)]
    advice = ss.Advice(rows, "ssim")
    assert advice.leaks() == [None, 0.6] and advice.recommended == "b" and advice.pareto_latency == ["b"]
    # A cheaper cut without a value is named, not silently left out of the bound.
    rows.append(_row("c", 20, 0.9, 1000, 0.5))
    assert ss.Advice(rows, "ssim").sentence().endswith(
        "every cheaper cut but a (no value) (fewer head multiply-adds) has fast-attack SSIM ≥ 0.6.")
    # An infinite PSNR is an exact reconstruction: the most leakage, not a missing value.
    exact = [dataclasses.replace(_row("a", 0, 0.1, 1000, 0.9), psnr=math.inf), _row("b", 10, 0.5, 1000, 0.6)]
    assert ss.Advice(exact, "psnr").leaks()[0] == math.inf


def test_large_numbers_and_budget_breaks_read_without_exponents():
    # 5.004 ms against a 5 ms budget must not read "5 ms > 5 ms"; 3.2 MB must not read "3.21e+03 kB".
    assert budget_reasons(5.004, 16.0004, 5, 16) == ["head 5.004 ms > 5 ms", "16.0004 kB > 16 kB"]
    assert budget_reasons(123.4, 3214.6, 1, 16) == ["head 123 ms > 1 ms", "3,215 kB > 16 kB"]
    advice = ss.Advice([_row("a", 4_321_000_000, 123.4, 3_214_600, 0.5)], "ssim")
    header, body = advice.table(["edge", "wire"])
    cells = dict(zip(header, body[0], strict=True))
    assert cells["head MMAC"] == "4,321" and cells["head ms (b=1)"] == "123" and cells["kB 8-bit"] == "3,215"
    assert "123 ms per image" in advice.sentence() and "3,215 kB per image" in advice.sentence()
    assert budget_reasons(0, 2.5e6, None, 1e6) == ["2,500,000 kB > 1,000,000 kB"]
    assert budget_reasons(0, 1300, None, 1234.5678) == ["1,300 kB > 1234.57 kB"]


def test_advice_is_dataframe_like():
    advice = ss.Advice([_row("a", 0, 0.1, 3000, 0.9), _row("b", 10, 0.5, 1000, 0.6)], "ssim")
    assert len(advice) == 2 and [r.point for r in advice] == ["a", "b"] and advice["ssim"] == [0.9, 0.6]
    assert advice.records()[1]["recommended"] and advice.records()[1]["wire_kbytes"] == 1.0
    with pytest.raises(KeyError, match="no column 'nope'"):
        advice["nope"]


# --------------------------------------------------------------------------------------------------
# advise end to end


def test_unknown_points_are_named_with_the_legal_ones():
    with pytest.raises(SplitError, match=r"unknown split point\(s\) 'nope', 'fc9' of lenet; legal points: normalize, "
                                         r"conv1, ReLU1"):
        ss.advise(ss.build_model("lenet"), points=["conv1", "nope", "fc9"], trained=False, progress=False)


@pytest.fixture(scope="module")
def lenet_advice(trained_lenet, mnist5k):
    modes = [m.training for m in trained_lenet.modules()]
    advice = ss.advise(trained_lenet, mnist5k, points=["fc3", "conv1", "pool2"], max_kbytes=1.0, **SMALL)
    assert [m.training for m in trained_lenet.modules()] == modes  # the model's modes are left as they were
    return advice


def test_advise_on_a_trained_lenet(lenet_advice):
    advice = lenet_advice
    assert advice.points == ["conv1", "pool2", "fc3"]  # the model's order, whatever the order asked
    conv1, pool2, fc3 = advice.rows
    assert conv1.head_macs == 8 * 24 * 24 * 5 * 5  # LeNet's first convolution, counted by hand
    conv2, fcs = 16 * 8 * 8 * 8 * 5 * 5, 256 * 120 + 120 * 84 + 84 * 10
    assert fc3.tail_macs == 0 and fc3.head_macs == conv1.head_macs + conv2 + fcs
    assert conv1.head_params == 8 * 25 + 8 and conv1.bytes_float32 == 20 + 4 * 4 + 4 * 8 * 24 * 24
    assert conv1.ssim > fc3.ssim and conv1.psnr > fc3.psnr  # the first convolution leaks more than the logits
    for r in advice:  # the strongest of the two fast attacks, and which one it was
        assert r.ssim == max(r.black_box_ssim, r.white_box_ssim)
        assert (r.psnr, r.ssim) == (getattr(r, f"{r.strongest_threat}_psnr"), getattr(r, f"{r.strongest_threat}_ssim"))
    assert conv1.white_box_ssim > 0.9  # LeNet's conv1 is invertible: 30 gradient steps through it recover the image
    assert fc3.strongest_threat == "black_box"  # 10 logits: without a prior, gradient steps find no digit
    assert conv1.gpz_r2_norm > fc3.gpz_r2_norm and conv1.gpz_drop is None and pool2.gpz_drop is not None
    assert abs(fc3.accuracy_8bit - advice.meta["accuracy"]) < 0.02  # 8-bit logits classify as the float ones
    assert advice.ranking == "ssim" and advice.ruled_out == {"conv1": budget_reasons(0, conv1.wire_kbytes, None, 1)[0]}
    assert advice.recommended == min(["pool2", "fc3"], key=lambda p: advice.row(p).ssim)
    assert advice.originals.shape == (8, 1, 28, 28) and advice.reconstructions["pool2"].shape == (8, 1, 28, 28)
    assert set(advice.timings) == {"trace", "inputs", "split", "compute", "features", "wire", "statistics",
                                   "attack (black_box)", "attack (white_box)"}
    assert {"SSIM", "SSIM black box", "SSIM white box"} <= set(advice.table()[0])


def test_strips_are_the_strongest_fast_attacks_reconstructions(lenet_advice, trained_lenet, mnist5k):
    # Each strip against the same attack run on its own: the strongest at that cut, on the first 8 of its images.
    for point in lenet_advice.points:
        row = lenet_advice.row(point)
        budget = {"black_box": TINY, "white_box": TINY_WHITE_BOX}[row.strongest_threat]
        alone = fast_inversion(ss.split(copy.deepcopy(trained_lenet), point, (1, 28, 28)).eval(), mnist5k, budget, 0)
        assert alone.ssim == pytest.approx(row.ssim, abs=1e-6)
        assert torch.allclose(lenet_advice.reconstructions[point], alone.reconstructions[:8], atol=1e-5)
        assert torch.equal(lenet_advice.originals, alone.originals[:8])


def test_the_fast_black_box_solves_its_decoders_last_layer(trained_lenet, mnist5k):
    # 15 steps leave the decoder's last layer far from its least-squares fit; the refit solves it, so the same
    # budget reconstructs the held-out test images several dB better (the refit is chosen on auxiliary images).
    target = ss.split(copy.deepcopy(trained_lenet), "conv1", (1, 28, 28)).eval()
    plain, solved = (fast_inversion(target, mnist5k, dataclasses.replace(TINY, refit=refit), 0)
                     for refit in (False, True))
    assert solved.psnr > plain.psnr + 3 and solved.ssim > plain.ssim
    assert TINY.setting()["params"]["refit"] is True and "least squares" in TINY.describe()
    assert "least squares" not in dataclasses.replace(TINY, refit=False).describe()
    with pytest.raises(ss.ConfigError, match="FastAttack.refit must be True or False, got 1"):
        FastAttack(refit=1)


def test_the_strongest_attack_is_chosen_by_the_ranking_measure(trained_lenet, mnist5k, monkeypatch, tmp_path):
    # Where the black box reconstructs structure (higher SSIM) and the white box pixel values (higher PSNR), a PSNR
    # ranking takes the white box's PSNR: the leakage it ranks by is the highest PSNR an attack reached.
    scores = {"black_box": (12.0, 0.6), "white_box": (20.0, 0.4)}

    def fake(target, data, attack, seed, images, device):
        psnr, ssim = scores[attack.threat]
        x = mnist5k.test.images[:images].float() / 255
        return ss.advisor.leakage.Inversion(psnr, ssim, x, x * 0)

    monkeypatch.setattr(ss.advisor.run, "fast_inversion", fake)
    advice = {by: ss.advise(trained_lenet, mnist5k, points=["pool2"], rank_by=by, images=20, progress=False)
              for by in ("ssim", "psnr")}
    ssim_row, psnr_row = advice["ssim"].rows[0], advice["psnr"].rows[0]
    assert (ssim_row.strongest_threat, ssim_row.psnr, ssim_row.ssim) == ("black_box", 12.0, 0.6)
    assert (psnr_row.strongest_threat, psnr_row.psnr, psnr_row.ssim) == ("white_box", 20.0, 0.4)
    assert "PSNR black box" in advice["psnr"].table()[0] and "SSIM black box" in advice["ssim"].table()[0]
    for by, word in (("ssim", "SSIM"), ("psnr", "PSNR")):  # the page says which measure chose the strongest
        page = advice[by].write_report(tmp_path / by)[0].read_text()
        assert f"PSNR and SSIM are the strongest attack's (the highest {word}), beside each attack's {word}" in page
    # A diverged attack (NaN) never wins; an exact one (PSNR +inf) always does, and its cut is plotted.
    scores.update(black_box=(math.nan, 0.6), white_box=(math.inf, 0.4))
    exact = ss.advise(trained_lenet, mnist5k, points=["pool2"], rank_by="psnr", images=20, progress=False)
    assert (exact.rows[0].strongest_threat, exact.rows[0].psnr) == ("white_box", math.inf)
    assert len(exact.write_report(tmp_path / "exact")) == 5  # pages, two Pareto plots, the strips
    assert _plottable([1.0, math.inf, 3.0, -math.inf]) == pytest.approx([1.0, 3.2, 3.0, 0.8])


def test_one_fast_attack_and_bad_budgets(trained_lenet, mnist5k):
    advice = ss.advise(trained_lenet, mnist5k, points=["conv1", "fc3"], fast=TINY_WHITE_BOX, attack_images=3,
                       images=50, progress=False)
    row = advice.rows[0]
    assert row.black_box_ssim is None and row.ssim == row.white_box_ssim and row.strongest_threat == "white_box"
    assert list(advice.meta["fast_attacks"]) == ["white_box"] and advice.meta["fast_images"] == 3
    assert advice.originals.shape[0] == 3 and all(len(x) == 3 for x in advice.reconstructions.values())
    header = advice.table()[0]
    assert "SSIM" in header and "SSIM white box" not in header  # one attack: its column would repeat the best's
    with pytest.raises(ss.ConfigError, match="one budget per threat"):
        ss.advise(trained_lenet, mnist5k, points=["conv1"], fast=[TINY, TINY], progress=False)
    for wrong in (["inverse_network"], "white_box", FastWhiteBox):
        with pytest.raises(ss.ConfigError, match="fast must be a FastAttack, a FastWhiteBox or a sequence of them"):
            ss.advise(trained_lenet, mnist5k, points=["conv1"], fast=wrong, progress=False)
    for lr in (0, float("inf")):
        with pytest.raises(ss.ConfigError, match="FastWhiteBox.lr must be a positive finite number"):
            FastWhiteBox(lr=lr)
    with pytest.raises(ss.ConfigError, match="FastWhiteBox.iters must be a positive integer"):
        FastWhiteBox(iters=2.5)


def test_advise_is_deterministic_with_the_seed(lenet_advice, trained_lenet, mnist5k):
    again = ss.advise(trained_lenet, mnist5k, points=["conv1", "pool2", "fc3"], max_kbytes=1.0, **SMALL)
    timed = {"head_ms", "head_ms_b32", "pareto_ms"}
    strip = [{k: v for k, v in r.items() if k not in timed} for r in lenet_advice.records()]
    assert strip == [{k: v for k, v in r.items() if k not in timed} for r in again.records()]
    assert torch.equal(again.reconstructions["fc3"], lenet_advice.reconstructions["fc3"])


def test_report_is_self_contained(lenet_advice, tmp_path):
    written = lenet_advice.write_report(tmp_path / "advice")
    names = sorted(p.name for p in written)
    assert names == ["advice.html", "advice.md", "pareto-bytes.png", "pareto-latency.png", "reconstructions.png"]
    page = (tmp_path / "advice" / "advice.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3 and not re.search(r"src='(?!data:)", page)
    markdown = (tmp_path / "advice" / "advice.md").read_text()
    assert lenet_advice.sentence() in markdown and "| conv1 |" in markdown
    assert f"Ruled out by the budgets: conv1 ({lenet_advice.ruled_out['conv1']})." in markdown


def test_untrained_model_gives_costs_only(mnist5k):
    advice = ss.advise(ss.build_model("lenet"), mnist5k, points=["conv1", "fc3"], trained=False, progress=False,
                       images=50)
    assert advice.ranking is None and advice.recommended is None and advice.pareto_bytes == []
    assert all(r.ssim is None and r.ce_floor is None and r.accuracy_8bit is None for r in advice)
    assert all(r.bytes_8bit is not None for r in advice)  # bytes are still measured on real features
    assert "Untrained model" in advice.notes[0] and advice.sentence().startswith("Costs only")
    assert "PSNR" not in advice.table()[0] and "kB 8-bit + zstd" in advice.table()[0]


def test_heads_timed_on_a_busy_machine_are_named_in_the_notes(monkeypatch, one_thread):
    # cpu_share is probed before and after each cut's timing, the lower counts; below 85 % the cut is named.
    shares = iter([1.0, 1.0, 0.4, 0.9, 0.95, 0.7, 0.9, 0.95])  # per cut: 1.0, 0.4, 0.7, 0.9
    monkeypatch.setattr(ss.advisor.run, "cpu_share", lambda: next(shares))
    advice = ss.advise(ss.build_model("lenet"), points=["conv1", "pool1", "conv2", "fc3"], trained=False,
                       progress=False)
    busy = [n for n in advice.notes if "cuts were timed while this process got less than" in n]
    assert len(busy) == 1 and busy[0].startswith("2 of 4 cuts were timed while this process got less than 85% of "
                                                 "the cores its 1 thread needs (least: 40% at pool1)"), busy
    monkeypatch.setattr(ss.advisor.run, "cpu_share", lambda: 0.95)
    advice = ss.advise(ss.build_model("lenet"), points=["conv1", "fc3"], trained=False, progress=False)
    assert not any("were timed while" in n for n in advice.notes)


def test_cpu_share_is_a_fraction_of_the_threads_cores(one_thread):
    # Process CPU seconds over wall seconds on one thread: at most about 1 (a unit slip would give 1000), above 0.
    assert 0 < cpu_share(0.02) <= 1.5


class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_a_model_that_only_splits_as_sequential():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), _Gate(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    advice = ss.advise(net, input_shape=(1, 28, 28), trained=False, progress=False)
    assert advice.points == ["0", "1", "2", "3"]
    conv = 4 * 26 * 26 * 9
    assert advice["head_macs"] == [conv, conv, conv, conv + 4 * 26 * 26 * 10]
    assert advice["tail_macs"] == [4 * 26 * 26 * 10] * 3 + [0]
    assert advice["bytes_8bit"] == [None] * 4


def test_npz_data_with_statistics_only(trained_lenet, mnist5k, tmp_path):
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=mnist5k.train.images[:400, 0].numpy(), y_train=mnist5k.train.labels[:400].numpy(),
             x_test=mnist5k.test.images[:100, 0].numpy(), y_test=mnist5k.test.labels[:100].numpy())
    advice = ss.advise(trained_lenet, f"npz:{path}", points=["ReLU2", "fc3"], attack=False, **SMALL)
    assert advice.ranking == "gpz" and advice.meta["data"] == f"npz:{path}"
    assert all(r.ce_floor is not None and r.gpz_r2 is not None and r.ssim is None for r in advice)
    assert advice.recommended == min(advice.points, key=lambda p: advice.row(p).gpz_r2_norm)
    assert "SSIM" not in advice.table()[0] and {"R̄² drop", "R̄²/V drop"} <= set(advice.table()[0])
    assert any("Ranked by R̄²/V, a statistic of the features, not an attack" in n for n in advice.notes)
    assert any("R̄² drops are between neighbouring rows of this table" in n for n in advice.notes)


def test_the_fast_attacks_warnings_reach_the_notes(mnist5k, monkeypatch):
    # An inverse network on 100 auxiliary images warns that it under-reports leakage, at each of the two cuts: the
    # report says so once. A warning from outside splitshield still reaches the user as a warning.
    compute_cost = ss.advisor.run.compute_cost

    def noisy(*args, **kwargs):
        warnings.warn_explicit("outside", UserWarning, "/elsewhere/lib.py", 1)
        return compute_cost(*args, **kwargs)

    monkeypatch.setattr(ss.advisor.run, "compute_cost", noisy)
    with pytest.warns(UserWarning, match="outside"):
        advice = ss.advise(ss.build_model("lenet"), mnist5k, points=["pool2", "fc3"],
                           fast=FastAttack(aux_images=100, steps=2), images=20, progress=False)
    assert sum("auxiliary set has only 100 images" in n for n in advice.notes) == 1, advice.notes
    assert not any("outside" in n for n in advice.notes)


def test_too_many_images_for_the_memory_are_refused_before_work(trained_lenet, mnist5k, monkeypatch):
    monkeypatch.setattr(ss.advisor.run, "free_memory", lambda: 20_000_000)  # 20 MB free
    # Two peaks at conv1 (784 pixels, 8×24×24 = 4,608 values). First the test images with every copy of their
    # features: 300 × (12 B × 784 + 24 B × 4,608 = 120,000 B) = 36 MB. Then, while the inverse network trains, the
    # test images and features that stay, 300 × (4 B × 784 + 4 B × 4,608 = 21,568 B) = 6.5 MB, and its 256
    # auxiliary images with the refit's copy of them, 256 × (9 B × 784 + 8 B × 4,608 = 43,920 B) = 11.2 MB. 80 % of
    # 20 MB = 16 MB: the first peak is too much and fits 133 images; the second fits (16 MB − 11.2 MB) / 21,568 B
    # = 220.
    with pytest.raises(ConfigError, match=r"images: 300 test images and 256 auxiliary images would take about 36 MB at "
                                          r"conv1 \(8×24×24 per image\) and 20 MB are free; pass images=133 or fewer "
                                          r"\(--images\)"):
        ss.advise(trained_lenet, mnist5k, points=["conv1", "fc3"], **SMALL)
    # 350 auxiliary images (15.37 MB) leave room for (16 MB − 15.37 MB) / 21,568 B = 29 test images beside them;
    # without the refit (5 B per pixel, 14.27 MB) for 80.
    for refit, fit in ((True, 29), (False, 80)):
        with pytest.raises(ConfigError, match=r"300 test images and 350 auxiliary images would take about 36 MB .* "
                                              rf"pass images={fit} or fewer"):
            ss.advise(trained_lenet, mnist5k, points=["conv1", "fc3"],
                      **{**SMALL, "fast": FastAttack(aux_images=350, refit=refit)})
    # Without the inverse network (white box only, or no attack) no auxiliary images are counted.
    for no_aux in ({"fast": TINY_WHITE_BOX}, {"attack": False}):
        with pytest.raises(ConfigError, match=r"300 test images would take about 36 MB .* pass images=133 or fewer"):
            ss.advise(trained_lenet, mnist5k, points=["conv1", "fc3"], **{**SMALL, **no_aux})
    # 5,000 asked, the 1,000 of the holdout used: 43.9 MB alone overfill the 16 MB; (16 MB − 2 × 21,568 B) / 43,920 B
    # = 363 fit beside two test images, and the second peak, 6.5 + 43.9 MB, is the larger one.
    with pytest.raises(ConfigError, match=r"and 1000 auxiliary images would take about 50 MB .* the inverse network's "
                                          r"auxiliary images fill it: pass fast=FastAttack\(aux_images=363\) or fewer, "
                                          r"or run the white-box attack alone \(--threats white_box\)"):
        ss.advise(trained_lenet, mnist5k, points=["conv1"], **{**SMALL, "fast": FastAttack(aux_images=5000)})
    # Costs only (untrained): no float64 copies, 4 B per pixel and 16 per value; 300 images take 23 MB, still too
    # much. The images the test split holds count, not the ones asked for: its 20 images fit.
    with pytest.raises(ConfigError, match=r"300 test images would take about 23 MB .* pass images=208 or fewer"):
        ss.advise(trained_lenet, mnist5k, points=["conv1"], trained=False, images=300, progress=False)
    small = ss.Dataset("few", mnist5k.train, mnist5k.holdout, mnist5k.test.take(20))
    assert len(ss.advise(trained_lenet, small, points=["conv1"], trained=False, images=300, progress=False)) == 1
    monkeypatch.setattr(ss.advisor.run, "free_memory", lambda: None)  # unknown (not Linux): no check
    assert len(ss.advise(trained_lenet, mnist5k, points=["conv1"], trained=False, progress=False)) == 1


def test_a_missing_ce_floor_is_explained(trained_lenet, mnist5k):
    # 15 balanced test images leave 5 of the 10 classes with one image: no mixture component for them.
    advice = ss.advise(trained_lenet, mnist5k, points=["ReLU2", "fc3"], attack=False, rank_by="ce_floor",
                       **{**SMALL, "images": 15})
    assert advice["ce_floor"] == [None, None] and advice.recommended is None
    assert any(n.startswith("CE floor not computed at ReLU2, fc3: class ") and "more test images" in n
               for n in advice.notes), advice.notes
    assert advice.sentence() == "No cut has a CE floor (MSE) value (see the notes), so no cut is recommended."


def test_imagefolder_data(mnist5k, tmp_path):
    for part, images in (("train", mnist5k.train), ("test", mnist5k.test)):
        for i in range(12):
            folder = tmp_path / part / str(int(images.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[i, 0].numpy()).save(folder / f"{i}.png")
    data = ss.load_dataset(f"imagefolder:{tmp_path}")
    advice = ss.advise(ss.build_model("lenet", num_classes=data.num_classes), data, points=["pool2"], trained=False,
                       progress=False)
    assert advice.rows[0].bytes_8bit is not None and advice.meta["data"] == f"imagefolder:{tmp_path}"


# --------------------------------------------------------------------------------------------------
# the command line


def run(*args: str | Path):
    return CliRunner().invoke(app, ["advise", *map(str, args)])


def one_line_error(result, *names: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: ") and all(name in lines[0] for name in names), lines[0]
    return lines[0]


def test_cli_bad_input_is_one_line(tmp_path):
    one_line_error(run("lenet", "--points", "conv1,nope"), "'nope'", "legal points: normalize")
    one_line_error(run("lenet", "--max-edge-ms", "-1"), "--max-edge-ms")
    one_line_error(run("lenet", "--rank-by", "vibes"), "--rank-by", "ssim")
    one_line_error(run("lenet", "--threats", "black_box,grey_box"), "--threats", "'grey_box' unknown", "white_box")
    one_line_error(run("lenet", "--threats", "white_box", "--no-attack"), "--threats", "--no-attack")
    one_line_error(run("lenet", "--rank-by", "ssim", "--no-attack"), "--rank-by", "--no-attack", "gpz")
    one_line_error(run("lenet", "--images", "1"), "--images", "at least 2")
    one_line_error(run("lenet", "--threads", "0"), "--threads", "at least 1")
    one_line_error(run("lenet", "--max-kbytes", "inf"), "--max-kbytes", "inf")
    one_line_error(run("lenet", "--input-shape", "1,8,8"), "--image-shape")  # the hint names a flag advise takes
    one_line_error(run("lenet", "--device", "bogus"), "--device")
    one_line_error(run("resnet99"), "unknown model 'resnet99'")
    checkpoint = ss.save_checkpoint(tmp_path / "lenet", ss.split(ss.build_model("lenet"), "ReLU2", (1, 28, 28)))
    one_line_error(run("cifar-cnn", "--checkpoint", checkpoint), "holds a lenet, not a cifar-cnn")


def test_cli_budgets_no_cut_meets(tmp_path):
    result = run("lenet", "--max-kbytes", "0.01", "--points", "conv1,fc3")
    assert result.exit_code == 1, result.output
    assert "No cut meets the budgets (≤ 0.01 kB per image)" in result.output
    assert "conv1: 18.5 kB > 0.01 kB" in result.output and "fc3: 0.068 kB > 0.01 kB" in result.output


def test_cli_with_a_checkpoint_writes_the_report(trained_lenet, tmp_path):
    checkpoint = ss.save_checkpoint(tmp_path / "lenet", ss.split(trained_lenet, "ReLU2", (1, 28, 28)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run("lenet", "--checkpoint", checkpoint, "--data", "mnist-5k", "--points", "pool1,fc3",
                     "--no-attack", "--threads", "1", "-o", tmp_path / "out")
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert "device cpu (1 thread)" in (tmp_path / "out" / "advice.md").read_text()  # the heads were timed on one
    assert "Cut at " in result.output and "GPZ R̄²/V" in result.output and "CE floor" in result.output
    assert "…" not in result.output  # not a terminal: one table at its full width, no number cut short
    assert (tmp_path / "out" / "advice.html").is_file()
    assert (tmp_path / "out" / "figures" / "pareto-bytes.png").is_file()


def test_cli_threats_picks_the_fast_attacks(trained_lenet, tmp_path):
    checkpoint = ss.save_checkpoint(tmp_path / "lenet", ss.split(trained_lenet, "ReLU2", (1, 28, 28)))
    result = run("lenet", "--checkpoint", checkpoint, "--data", "mnist-5k", "--points", "conv1", "--images", "50",
                 "--threats", "white_box")
    assert result.exit_code == 0, result.output
    assert "attack (white_box)" in result.output and "attack (black_box)" not in result.output
