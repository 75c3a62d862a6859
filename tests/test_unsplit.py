"""UnSplit under the architecture-only threat: the view lacks weights, queries and data; the attack recovers a
conv head's images, is seeded and repeatable, adapts to a noisy defense, checks its parameters and is
registered for specs, the CLI and the engine."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import splitshield as ss
from splitshield import metrics
from splitshield._random import seeded
from splitshield.attacks import ATTACKS, THREATS, ArchitectureOnlyView, UnSplit
from splitshield.cli import app
from splitshield.config import parse_spec
from splitshield.errors import ConfigError, ThreatModelError
from splitshield.measure import measure_attack


@pytest.fixture(scope="module")
def digits(mnist5k) -> torch.Tensor:
    return mnist5k.test.first_per_class()[0]


def one_conv(scale: float = 1.0) -> ss.SplitModel:
    """A one-conv network (untrained: the attacker knows no weights either way) cut after its conv, the conv's
    weights multiplied by ``scale``."""
    with seeded(1):
        net = nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 24 * 24, 10))
    with torch.no_grad():
        net[0].weight.mul_(scale)
    return ss.split(net, "0", input_shape=(1, 28, 28))


@pytest.fixture(scope="module")
def conv_head() -> ss.SplitModel:
    return one_conv()


def test_the_view_holds_the_architecture_and_nothing_else(mnist5k):
    net = ss.build_model("lenet")
    with torch.no_grad():  # weights no fresh initialisation can give, whatever state the global RNG is in
        for p in net.parameters():
            p.add_(1.0)
    target = ss.split(net, "ReLU2", input_shape=(1, 28, 28))
    view = ss.Victim(target, threat="architecture_only", aux=mnist5k.holdout, traffic=mnist5k.test).view()
    assert isinstance(view, ArchitectureOnlyView) and view.aux is None
    for forbidden in ("head", "tail", "query", "send", "traffic"):
        with pytest.raises(AttributeError):
            getattr(view, forbidden)
    with pytest.raises(ConfigError, match="needs auxiliary data"):
        view.require_aux("UnSplit")
    clone, trained = view.head_architecture(), target.head
    assert [p.shape for p in clone.parameters()] == [p.shape for p in trained.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(clone.parameters(), trained.parameters(), strict=True))
    with pytest.raises(ThreatModelError, match="UnSplit needs architecture_only access; the victim gives white_box"):
        UnSplit().fit(ss.Victim(target, threat="white_box"))
    with pytest.raises(ThreatModelError, match="needs white_box access; the victim gives architecture_only"):
        ss.WhiteBoxInversion().fit(ss.Victim(target, threat="architecture_only"))


def test_recovers_a_conv_heads_images_well_above_the_mean_image(conv_head, mnist5k, digits, one_thread):
    victim = ss.Victim(conv_head, threat="architecture_only")
    attack = UnSplit(rounds=25, restarts=2, progress=False).fit(victim)
    x_hat = attack.invert(victim.observe(digits))
    assert x_hat.shape == digits.shape and float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
    assert attack.chosen_.shape == attack.residual_.shape == (len(digits),) and len(attack.heads_) == 2
    mean_image = mnist5k.holdout.tensors()[0].mean(0, keepdim=True).expand_as(digits)
    # Measured: 19.5-21.4 dB and SSIM 0.63-0.87 over seeds 0-2, the mean image 11.9 dB and 0.16.
    assert float(metrics.psnr(x_hat, digits)) > float(metrics.psnr(mean_image, digits)) + 5
    assert float(metrics.ssim(x_hat, digits)) > 0.5


def test_adaptive_attack_runs_through_a_noisy_defense_and_beats_the_non_adaptive(digits, one_thread):
    # A bounded feature with noise on it (ALGORITHMS §F.6): the adaptive attacker optimises through both, the
    # non-adaptive one asks a conv for a squashed, noisy feature (larger weights make the sigmoid bite).
    head = one_conv(scale=10.0)
    psnr = {}
    for adaptive in (True, False):
        victim = ss.Victim(head, ss.defenses.FeatureBound("sigmoid") + ss.defenses.GaussianNoise(sigma=0.1),
                           threat="architecture_only", adaptive=adaptive)
        x_hat = UnSplit(rounds=15, restarts=2, progress=False).fit(victim).invert(victim.observe(digits))
        psnr[adaptive] = float(metrics.psnr(x_hat, digits))
    # Measured: 15.5-16.1 dB adaptive, 8.8-9.7 dB non-adaptive over seeds 0-2.
    assert psnr[True] > psnr[False] + 3, psnr


BAD_PARAMETERS = [("rounds", 0), ("rounds", 2.5), ("input_iters", -1), ("model_iters", True), ("input_lr", 0.0),
                  ("model_lr", float("nan")), ("tv", -0.1), ("l2", float("inf")), ("restarts", 0),
                  ("stretch", "yes"), ("seed", -1), ("progress", 1)]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMETERS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMETERS])
def test_a_bad_parameter_is_one_line_naming_it(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} must .*, got {re.escape(repr(value))}$"):
        UnSplit(**{field: value})


def test_registered_for_specs_the_cli_and_the_engine(conv_head, mnist5k, one_thread):
    assert ATTACKS["unsplit"] is UnSplit and "architecture_only" in THREATS
    base = {"dataset": "mnist-5k", "splits": ["conv1"]}
    spec = parse_spec({**base, "attacks": [{"name": "unsplit", "rounds": [10, 20]}]})
    assert [(s["threat"], s["params"]) for s in spec.attack_settings()] == [
        ("architecture_only", {"rounds": 10}), ("architecture_only", {"rounds": 20})]
    for entry, words in (({"name": "unsplit", "threat": "white_box"}, "runs under threat architecture_only"),
                         ({"name": "rmle", "threat": "architecture_only"}, "runs under threat white_box"),
                         ({"name": "unsplit", "rounds": 0}, "rounds must be a positive integer, got 0")):
        with pytest.raises(ConfigError, match=words) as info:
            parse_spec({**base, "attacks": [entry]})
        assert "\n" not in str(info.value)
    help_text = CliRunner().invoke(app, ["attack", "--help"], terminal_width=200).output
    assert "unsplit" in help_text and "architecture_only" in help_text
    setting = {"name": "unsplit", "threat": "architecture_only", "aux": "same_distribution", "aux_n": None,
               "adaptive": True, "params": {"rounds": 1, "input_iters": 2, "model_iters": 2, "restarts": 1}}
    result = measure_attack(conv_head, None, mnist5k, setting, images=4, seed=0, metrics=("psnr",))
    assert [name for name, _, _ in result.metrics] == ["psnr"] * 5 and result.reconstruction.shape == (4, 1, 28, 28)
