"""The validation pass: each check fires on a bad setting and stays silent on a good one; all are collected."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield.defenses import (
    CEM,
    VIB,
    DPNoise,
    FeatureBound,
    GaussianNoise,
    LaplaceNoise,
    NoPeek,
    Quantize,
    Shredder,
)
from splitshield.defenses.base import Defense
from splitshield.errors import ConfigError
from splitshield.validate import Problem, check, validate


@pytest.fixture(scope="module")
def lenet():
    """LeNet cut at ReLU2: an unbounded 16×8×8 ReLU feature, in eval mode."""
    return ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28)).eval()


def small(*layers: tuple[str, nn.Module], at: str) -> ss.SplitModel:
    """A small 1×8×8-input model made of ``layers`` then a linear classifier, cut after ``at``, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), *layers,
                                       ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 8 * 8, 10))]))
    return ss.split(model, at, input_shape=(1, 8, 8)).eval()


def problems_of(target, defense=None, **kwargs) -> list[tuple[str, str]]:
    return [(p.severity, p.field) for p in validate(target, defense, **kwargs)]


# ---- 1. CEM without a noise level -------------------------------------------------------------------


def test_cem_without_noise_before_it_is_an_error(lenet):
    for defense in (CEM(), FeatureBound() + CEM(), CEM() + GaussianNoise(0.1), GaussianNoise(0.1, on="input") + CEM()):
        found = [p for p in validate(lenet, defense) if "cem" in p.field]
        assert [p.severity for p in found] == ["error"], defense
        assert "gaussian_noise + cem" in found[0].message and "cem(sigma=...)" in found[0].message
    assert problems_of(lenet, CEM())[0][1] == "defense (cem)"


def test_cem_with_noise_before_it_or_sigma_or_off_is_fine(lenet):
    for defense in (FeatureBound() + GaussianNoise(0.1) + CEM(), LaplaceNoise(0.1) + NoPeek(0.1) + CEM(),
                    DPNoise(0.5) + CEM(), CEM(sigma=0.5), NoPeek(0.1) + CEM(lam=0)):
        assert not [p for p in validate(lenet, defense) if "cem" in p.field], defense


# ---- 2. noise on an unbounded feature -------------------------------------------------------------


def test_noise_on_an_unbounded_feature_is_a_warning(lenet):
    found = validate(lenet, GaussianNoise(0.5) + FeatureBound())
    assert [(p.severity, p.field) for p in found] == [("warning", "defense.parts[0] (gaussian_noise)")]
    assert "ReLU" in found[0].message and "bound + gaussian_noise" in found[0].message
    assert problems_of(lenet, LaplaceNoise(0.5)) == [("warning", "defense (laplace_noise)")]


def test_noise_on_a_bounded_feature_is_fine(lenet):
    assert validate(lenet, FeatureBound("tanh") + GaussianNoise(0.5)) == []
    assert validate(lenet, DPNoise(0.5)) == []  # DP noise clips the feature to a fixed norm first
    assert validate(lenet, GaussianNoise(0.5, on="input")) == []
    assert validate(lenet, GaussianNoise(0.0)) == []
    sigmoid_head = small(("sigmoid", nn.Sigmoid()), ("pool", nn.MaxPool2d(1)), at="pool")  # looked through the pool
    assert validate(sigmoid_head, GaussianNoise(0.5)) == []
    assert problems_of(small(("relu", nn.ReLU()), at="relu"), GaussianNoise(0.5)) == [
        ("warning", "defense (gaussian_noise)")]


# ---- 3. outputs that depend on the batch ----------------------------------------------------------


def test_batch_norm_in_train_mode_is_an_error_at_inference_only():
    target = small(("bn", nn.BatchNorm2d(4)), ("relu", nn.ReLU()), at="relu")
    assert validate(target) == []
    target.train()
    found = validate(target)
    assert [(p.severity, p.field) for p in found] == [("error", "target.head.bn (BatchNorm2d)")]
    assert "target.eval()" in found[0].message
    assert validate(target, for_training=True) == []
    assert target.head.bn.training  # the modes are left as they were


def test_batch_norm_without_running_statistics_is_an_error_in_eval_mode():
    target = small(("bn", nn.BatchNorm2d(4, track_running_stats=False)), ("relu", nn.ReLU()), at="relu")
    assert problems_of(target) == [("error", "target.head.bn (BatchNorm2d)"), ("error", "target.head")]


class BatchCentre(nn.Module):
    """Subtracts the batch's mean: a batch-wide operation that is no batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_a_head_whose_output_depends_on_the_batch_is_found_by_running_it():
    target = small(("centre", BatchCentre()), at="centre")
    found = validate(target)
    assert [(p.severity, p.field) for p in found] == [("error", "target.head")]
    assert "depends on the other inputs of the batch" in found[0].message
    assert validate(target, x=torch.rand(1, 1, 8, 8)) == []  # one input cannot show it
    assert validate(target, for_training=True) == []


class BatchQuantize(Defense):
    """4-bit quantisation with one range for the whole batch (a frame), not per sample."""

    name = "batch_quantize"

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        lo, step = z.min(), (z.max() - z.min()) / 15
        return torch.round((z - lo) / step) * step + lo


def test_a_defense_whose_output_depends_on_the_batch_is_an_error(lenet):
    bound = FeatureBound()
    assert problems_of(lenet, bound + BatchQuantize() + GaussianNoise(0.1)) == [
        ("error", "defense.parts[1] (batch_quantize)")]
    assert validate(lenet, bound + Quantize(4) + GaussianNoise(0.1) + VIB(16)) == []  # per sample, or random
    assert validate(lenet, bound + BatchQuantize(), for_training=True) == []


def test_validation_keeps_the_random_state_and_modes(lenet):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    validate(lenet, FeatureBound() + GaussianNoise(0.1) + Quantize(4))
    assert torch.equal(torch.rand(3), expected)
    assert not lenet.head.training


def test_a_head_that_fails_on_the_probe_is_a_problem_not_a_crash(lenet):
    found = validate(lenet, x=torch.rand(2, 3, 28, 28))
    assert [(p.severity, p.field) for p in found] == [("error", "target.head")]
    assert "[2, 3, 28, 28]" in found[0].message


# ---- 4. resuming ----------------------------------------------------------------------------------


class Forgetful(Defense):
    """A defense whose training state checkpoints do not hold."""

    name = "forgetful"
    resumable = False


def test_a_defense_that_cannot_resume_is_an_error_only_when_resuming(lenet):
    defense = FeatureBound() + Forgetful()
    found = validate(lenet, defense, resume=True)
    assert [(p.severity, p.field) for p in found] == [("error", "defense.parts[1] (forgetful)")]
    assert "resume=False" in found[0].message
    assert problems_of(lenet, Forgetful(), resume=True) == [("error", "defense (forgetful)")]
    assert validate(lenet, defense) == []
    assert validate(lenet, FeatureBound() + GaussianNoise(0.1), resume=True) == []


# ---- 5. defense parameters against the target -----------------------------------------------------


def test_defense_shapes_that_do_not_fit_the_feature_are_errors(lenet):
    found = validate(lenet, Shredder((8, 8, 8)) + VIB(3))
    assert [(p.severity, p.field) for p in found] == [("error", "defense.parts[0] (shredder)"),
                                                       ("error", "defense.parts[1] (vib)")]
    assert "shredder(feature_shape=[16, 8, 8])" in found[0].message and "vib(channels=16)" in found[1].message
    assert validate(lenet, Shredder((16, 8, 8)) + VIB(16)) == []


# ---- collecting and reporting ---------------------------------------------------------------------


def test_every_problem_is_reported_at_once(lenet):
    target = small(("bn", nn.BatchNorm2d(4)), ("relu", nn.ReLU()), at="relu").train()
    found = validate(target, CEM() + GaussianNoise(0.5) + Forgetful() + Shredder((1, 2, 3)), resume=True)
    assert [(p.severity, p.field) for p in found] == [
        ("error", "defense.parts[0] (cem)"),
        ("warning", "defense.parts[1] (gaussian_noise)"),
        ("error", "target.head.bn (BatchNorm2d)"),
        ("error", "defense.parts[2] (forgetful)"),
        ("error", "defense.parts[3] (shredder)"),
    ]


def test_the_defense_alone_is_checked_without_a_target():
    assert problems_of(None, Forgetful() + CEM() + GaussianNoise(0.5), resume=True) == [
        ("error", "defense.parts[1] (cem)"), ("error", "defense.parts[0] (forgetful)")]


def test_check_raises_one_line_per_error_and_warns_once():
    problems = [Problem("warning", "a", "w"), Problem("error", "b", "first; fix it"), Problem("warning", "a", "w"),
                Problem("error", "c", "second; fix that")]
    with pytest.warns(UserWarning, match="^a: w$") as caught, pytest.raises(ConfigError) as error:
        check(problems)
    assert len(caught) == 1
    assert str(error.value).splitlines() == ["b: first; fix it", "c: second; fix that"]


def test_check_passes_warnings_without_raising(lenet):
    with pytest.warns(UserWarning, match=r"defense \(gaussian_noise\): adds noise to an unbounded feature"):
        check(validate(lenet, GaussianNoise(0.5)))
    check([])
