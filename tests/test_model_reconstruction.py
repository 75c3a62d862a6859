"""Model reconstruction (He et al.'s Table 8): a stand-in head fitted to query pairs, then rMLE on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield import metrics
from splitshield.attacks import BlackBoxView
from splitshield.attacks.stand_in import he2019_different_head
from splitshield.errors import ConfigError, ThreatModelError


@pytest.fixture(scope="module")
def conv1(trained_lenet, mnist5k):
    """The black-box victim at LeNet's conv1 (normalisation, then one 5×5 convolution: an affine map)."""
    target = ss.split(trained_lenet, "conv1", input_shape=(1, 28, 28))
    return target, ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(512))


def test_an_affine_head_is_recovered_from_its_answers_alone(mnist5k, one_thread):
    # Independent truth: least squares on rich inputs has one solution for an affine map, its own parameters. The
    # attacker gets an oracle and nothing else of the map (a hand-built view around a closure).
    with torch.random.fork_rng():
        torch.manual_seed(7)
        truth = nn.Conv2d(1, 6, 5)

    def query(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return truth(x)

    view = BlackBoxView(threat="black_box", input_shape=(1, 28, 28), feature_shape=(6, 24, 24),
                        aux=mnist5k.holdout.take(512), adaptive=True, point="conv1", cloud=None, query=query)
    attack = ss.ModelReconstruction(nn.Conv2d(1, 6, 5), steps=1500, lr=1e-2, iters=10, progress=False).fit(view)
    stand_in = attack.shadow_head_
    assert stand_in is not truth and attack.fit_error_ < 1e-3  # untrained: about 1
    assert float((stand_in.weight - truth.weight).norm() / truth.weight.norm()) < 0.05
    assert float((stand_in.bias - truth.bias).norm() / truth.bias.norm()) < 0.05


def test_through_the_recovered_head_rmle_does_what_white_box_rmle_does(conv1, trained_lenet, mnist5k, one_thread):
    target, victim = conv1
    x, _ = mnist5k.test.first_per_class()
    z = victim.observe(x)
    out = target.head(torch.zeros(1, 1, 28, 28)).shape[1]
    black = ss.ModelReconstruction(nn.Conv2d(1, out, 5), steps=1500, lr=1e-2, iters=600, progress=False)
    white = ss.WhiteBoxInversion(iters=600, search=None, progress=False)
    x_black = black.fit(victim).invert(z)
    x_white = white.fit(ss.Victim(target, threat="white_box")).invert(z)
    assert x_black.shape == x.shape and float(x_black.min()) >= 0 and float(x_black.max()) <= 1
    assert float(metrics.psnr(x_black, x)) > 30  # conv1 is over-complete: nearly invertible
    assert abs(float(metrics.psnr(x_black, x)) - float(metrics.psnr(x_white, x))) < 3
    assert black.residual_.shape == (10,) and float(black.residual_.max()) < 1e-2


def test_the_stand_in_built_from_shapes_ends_in_a_relu_only_where_the_features_never_go_negative(
        trained_lenet, mnist5k, one_thread):
    aux = mnist5k.holdout.take(64)
    for point, relu in (("conv1", False), ("ReLU2", True)):
        victim = ss.Victim(ss.split(trained_lenet, point, input_shape=(1, 28, 28)), threat="black_box", aux=aux)
        attack = ss.ModelReconstruction(steps=2, iters=2, progress=False).fit(victim)
        assert isinstance(list(attack.shadow_head_.modules())[-1], nn.ReLU) is relu, point
        assert tuple(attack.shadow_head_(aux.take(2).tensors()[0]).shape[1:]) == tuple(victim.target.feature_shape())


def test_he2019s_diff_net_stands_in_at_their_points_and_only_there(trained_lenet, mnist5k, one_thread):
    aux = mnist5k.holdout.take(64)
    victim = ss.Victim(ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28)), threat="black_box", aux=aux)
    attack = ss.ModelReconstruction(shadow="he2019", steps=2, iters=2, progress=False).fit(victim)
    theirs = he2019_different_head("ReLU2", (1, 28, 28), victim.target.feature_shape())
    assert [repr(m) for m in attack.shadow_head_] == [repr(m) for m in theirs]
    elsewhere = ss.Victim(ss.split(trained_lenet, "pool2", input_shape=(1, 28, 28)), threat="black_box", aux=aux)
    with pytest.raises(ConfigError, match="not for split point 'pool2'; use shadow 'different'"):
        ss.ModelReconstruction(shadow="he2019", steps=10**6, progress=False).fit(elsewhere)


def test_only_a_black_box_attacker_reconstructs_the_head_and_a_given_module_is_trained_as_a_copy(conv1, mnist5k):
    target, victim = conv1
    with pytest.raises(ThreatModelError, match="ModelReconstruction needs black_box access; the victim gives white"):
        ss.ModelReconstruction().fit(ss.Victim(target, threat="white_box", aux=mnist5k.holdout))
    with pytest.raises(ConfigError, match="ModelReconstruction needs auxiliary data"):
        ss.ModelReconstruction().fit(ss.Victim(target, threat="black_box"))
    with pytest.raises(ConfigError, match="^shadow must be an nn.Module or one of 'different', 'he2019', got 'same'$"):
        ss.ModelReconstruction(shadow="same")
    module = nn.Conv2d(1, target.head(torch.zeros(1, 1, 28, 28)).shape[1], 5)
    before = [p.detach().clone() for p in module.parameters()]
    attack = ss.ModelReconstruction(module, steps=3, iters=2, progress=False).fit(victim)
    assert attack.shadow is module and attack.shadow_head_ is not module
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
