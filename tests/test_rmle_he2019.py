"""rMLE with ``search="he2019"`` is He et al.'s attack as their code runs it, in their normalised image space."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield.attacks.whitebox import HE2019_SETTINGS
from splitshield.errors import ConfigError
from splitshield.models import Normalize

MEAN, STD = 0.45, 0.3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        normalize=Normalize((MEAN,) * 3, (STD,) * 3), conv11=nn.Conv2d(3, 4, 3, padding=1), ReLU22=nn.ReLU(),
        flatten=nn.Flatten(), fc2=nn.Linear(4 * 8 * 8, 10))).eval()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()


def _their_rmle(f: nn.Module, z: torch.Tensor, iters: int, lr: float, tv: float, l2: float) -> torch.Tensor:
    """He et al.'s loop, one image at a time in their normalised space x' = (x − m)/s: start at x' = 0, Adam
    (amsgrad, eps 1e-3) on the mean feature error + λ_TV·TV(x') + λ_l2·mean(x'²); kept inside the box that
    maps to [0, 1] (the projection our pixel-space attack applies)."""
    out = []
    for zi in z:
        xn = torch.zeros(1, 3, 8, 8, requires_grad=True)
        opt = torch.optim.Adam([xn], lr=lr, eps=1e-3, amsgrad=True)
        for _ in range(iters):
            loss = (f(xn * STD + MEAN) - zi[None]).pow(2).mean() + tv * _tv(xn) + l2 * xn.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                xn.clamp_(-MEAN / STD, (1 - MEAN) / STD)
        out.append(xn.detach() * STD + MEAN)
    return torch.cat(out)


@pytest.mark.parametrize("point", ["ReLU22", "fc2"])
def test_he2019_in_pixels_is_their_loop_in_normalised_space(point):
    model = _model()
    target = ss.split(model, point, input_shape=(3, 8, 8))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    victim = ss.Victim(target, threat="white_box")
    z = victim.observe(x)
    attack = ss.WhiteBoxInversion(iters=40, search="he2019", progress=False).fit(victim)
    _, lr, tv, l2 = HE2019_SETTINGS[point]
    assert (attack.lr_, attack.tv_, attack.l2_, attack.init_) == pytest.approx((lr * STD, tv / STD**2, l2 / STD**2,
                                                                                MEAN))
    ours = attack.invert(z)
    theirs = _their_rmle(target.head, z, 40, lr, tv, l2)
    assert (ours - x).abs().max() > 0.05  # 40 steps do not invert: the runs are compared mid-way
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_on_lenet_their_mnist_setting_is_four_times_the_tv_at_half_the_step():
    lenet = ss.build_model("lenet", input_shape=(1, 28, 28))
    victim = ss.Victim(ss.split(lenet, "ReLU2", input_shape=(1, 28, 28)), threat="white_box")
    attack = ss.WhiteBoxInversion(search="he2019", progress=False).fit(victim)
    assert (attack.iters_, attack.lr_, attack.tv_, attack.eps_, attack.init_) == pytest.approx((5000, 5e-3, 4.0,
                                                                                                2e-3, 0.5))
    given = ss.WhiteBoxInversion(search="he2019", tv=1.0, progress=False).fit(victim)
    assert (given.lr_, given.tv_) == pytest.approx((5e-3, 1.0))  # a given value is used as given


def test_he2019_at_a_point_they_did_not_attack_names_theirs():
    victim = ss.Victim(ss.split(_model(), "flatten", input_shape=(3, 8, 8)), threat="white_box")
    with pytest.raises(ConfigError, match="search='he2019'.*ReLU22.*not 'flatten'"):
        ss.WhiteBoxInversion(search="he2019", progress=False).fit(victim)
