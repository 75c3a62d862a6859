"""rMLE with ``search="he2019"`` optimises the normalised image as He et al.'s code does, so their settings mean what
they meant to them; it refuses a head that is not their network cut at one of their points."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield.attacks._rmle import rmle
from splitshield.errors import ConfigError
from splitshield.models.zoo import IMAGENET_MEAN, IMAGENET_STD, Normalize

SHAPE = (3, 32, 32)


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()


def _their_rmle(f: nn.Module, z: torch.Tensor, iters: int, lr: float, tv: float, l2: float) -> torch.Tensor:
    """He et al.'s loop (ALGORITHMS §A.2) in their space x' = (x − m)/s, per-channel ImageNet statistics: start at
    x' = 0, Adam (amsgrad, eps 1e-3) on the mean feature error + λ_TV·TV(x') + λ_l2·mean(x'²) of each image. One
    change, ours: x' is kept in the box that maps to [0, 1] after every step (their code clips the result).

    Their code runs one image at a time; here the images' losses are summed, which Adam (element-wise) turns into
    the same steps, so that the head's arithmetic is the batch's: a max-pool window whose inputs tie to the last
    bit (clipped pixels do) sends its gradient where rounding decides, and one image alone rounds otherwise."""
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xn = torch.zeros(z.shape[0], *SHAPE, requires_grad=True)
    opt = torch.optim.Adam([xn], lr=lr, eps=1e-3, amsgrad=True)
    for _ in range(iters):
        errors = (f(xn * s + m) - z).pow(2)
        loss = sum(errors[i].mean() + tv * _tv(xn[i : i + 1]) + l2 * xn[i].pow(2).mean() for i in range(len(z)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            xn.copy_(torch.maximum(torch.minimum(xn, (1 - m) / s), -m / s))
    return (xn.detach() * s + m).clamp(0, 1)


@pytest.fixture(scope="module")
def cifar_cnn() -> nn.Module:
    """Their CIFAR-10 network, weights doubled: untrained, its input gradients are far below Adam's eps."""
    model = ss.build_model("cifar-cnn", input_shape=SHAPE, seed=0).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.mul_(2.0)
    return model


@pytest.mark.parametrize("point, lr, tv, l2", [("ReLU22", 0.3, 10.0, 0.0), ("fc2", 3.0, 0.0, 1e-3)])
def test_he2019_is_their_loop_in_their_normalised_space(cifar_cnn, point, lr, tv, l2):
    target = ss.split(cifar_cnn, point, input_shape=SHAPE)
    x = (torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    victim = ss.Victim(target, threat="white_box")
    z = victim.observe(x)
    attack = ss.WhiteBoxInversion(iters=25, lr=lr, tv=tv, l2=l2, search="he2019", progress=False).fit(victim)
    ours = attack.invert(z)
    theirs = _their_rmle(target.head, z, 25, lr, tv, l2)
    start = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert (ours - start).abs().amax() > 0.1  # the runs moved from their start
    assert ((ours == 0) | (ours == 1)).float().mean() > 0.05  # the walls are hit: their mapping is tested too
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(attack.normalised_[1], torch.tensor(IMAGENET_STD))


def test_in_one_channel_their_setting_is_four_times_the_tv_at_half_the_step_on_pixels():
    """The README's reading of their MNIST setting: λ_TV 1, lr ℓ (eps 1e-3) on (x − ½)/½ are λ_TV 4, lr ℓ/2
    (eps 2e-3) on x."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        z = head(x)
    theirs = rmle(head, z, (1, 12, 12), iters=60, lr=1e-1, tv=1.0, l2=0.0,
                  normalised=(torch.tensor([0.5]), torch.tensor([0.5])))
    pixels = rmle(head, z, (1, 12, 12), iters=60, lr=5e-2, tv=4.0, l2=0.0, eps=2e-3, init=0.5)
    assert (theirs - 0.5).abs().max() > 0.05  # the runs moved
    torch.testing.assert_close(theirs, pixels, atol=1e-5, rtol=0)


def test_a_dead_start_restarts_anywhere_in_the_box_of_valid_pixels():
    """A head whose ReLUs are all off at x = m has no gradient there: the start is redrawn uniformly in the box of u
    that maps to [0, 1] (not in [0, 1] of u, which maps to [m, m + s])."""
    head = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    with torch.no_grad():
        head[0].bias.fill_(-100.0)  # off for every image: no gradient anywhere, the start is what comes back
    z = torch.zeros(2, 2, 8, 8)
    x = rmle(head, z, (3, 8, 8), iters=3, lr=0.1, tv=0.0, l2=0.0,
             normalised=(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)))
    assert x.amin() < 0.05 and x.amax() > 0.95 and x.std() > 0.2


def test_the_settings_are_the_tables_as_their_code_states_them():
    lenet = ss.build_model("lenet", input_shape=(1, 28, 28))
    victim = ss.Victim(ss.split(lenet, "ReLU2", input_shape=(1, 28, 28)), threat="white_box")
    attack = ss.WhiteBoxInversion(search="he2019", progress=False).fit(victim)
    assert (attack.iters_, attack.lr_, attack.tv_, attack.l2_) == (5000, 1e-2, 1.0, 0.0)
    assert [t.tolist() for t in attack.normalised_] == [[0.5], [0.5]]
    assert ss.WhiteBoxInversion(search=None, progress=False).fit(victim).normalised_ is None


def test_he2019_refuses_heads_that_are_not_theirs(cifar_cnn):
    def fit(model: nn.Module, point: str, shape: tuple[int, ...] = SHAPE) -> None:
        victim = ss.Victim(ss.split(model, point, input_shape=shape), threat="white_box")
        ss.WhiteBoxInversion(search="he2019", progress=False).fit(victim)

    with pytest.raises(ConfigError, match=r"^search='he2019' at 'pool1': .*cifar-cnn: conv11, ReLU22.*"
                                          r"'auto' or None \(null in a spec\)$"):
        fit(cifar_cnn, "pool1")
    mine = nn.Sequential(OrderedDict(conv11=nn.Conv2d(3, 4, 3), ReLU22=nn.ReLU()))
    with pytest.raises(ConfigError, match=r"at 'ReLU22': this head is not their cifar-cnn \(no input normalisation\)"):
        fit(mine, "ReLU22")
    grey = nn.Sequential(OrderedDict(normalize=Normalize((0.5,), (0.5,)), conv1=nn.Conv2d(1, 4, 3)))
    with pytest.raises(ConfigError, match=r"at 'conv1': this head is not their lenet \(.*12.*\); He et al"):
        fit(grey, "conv1", (1, 12, 12))  # their LeNet cannot take 12x12 images: still a he2019 error
    vgg = ss.build_model("vgg11-bottleneck", input_shape=SHAPE)
    conv1 = next(p.name for p in ss.split_points(vgg, SHAPE) if p.name == "conv1")
    with pytest.raises(ConfigError, match=r"at 'conv1': this head is not their lenet \(features \["):
        fit(vgg, conv1)


def test_the_query_free_shadow_has_no_he2019_search():
    with pytest.raises(ConfigError, match="search must be one of 'auto', None, got 'he2019'"):
        ss.QueryFreeInversion(search="he2019")
