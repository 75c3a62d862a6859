"""White-box rMLE tuned to the model (``search="auto"``): never worse than the best fixed setting chosen with
hindsight by more than 1 dB, on LeNet and two small custom CNNs at every cut; the private images never
enter the choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import splitshield as ss
from splitshield import metrics
from splitshield.attacks.whitebox import search_grid
from splitshield.data import ImageSet
from splitshield.errors import ConfigError


def cnn_a() -> nn.Module:
    """conv-relu-conv-relu-pool, 8/16 channels, padded."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(10))


def cnn_b() -> nn.Module:
    """Two conv-relu-pool blocks (8/16 channels, unpadded), two dense layers."""
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10))


def _resized(images: ImageSet, side: int) -> ImageSet:
    x = F.interpolate(images.images.float(), size=(side, side), mode="area")
    return ImageSet(x.round().clamp(0, 255).to(torch.uint8), images.labels, images.classes)


def _trained(build, train: ImageSet) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    model(torch.zeros(1, *train.image_shape))  # materialise the lazy layer
    last = ss.split_points(model, train.image_shape)[-2].name
    ss.Trainer(ss.split(model, last, input_shape=train.image_shape), epochs=1, seed=0, progress=False).fit(train)
    return model.eval()


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(metrics.psnr(x_hat, x, reduction="none").clamp(max=100).mean())


def _auto_vs_best_fixed(model: nn.Module, point: str, test: ImageSet, aux: ImageSet, iters: int,
                        defense: ss.defenses.Defense | None = None) -> tuple[float, float, tuple]:
    """(auto PSNR, best fixed PSNR, best fixed (λ_TV, λ_l2, lr)); the ground truth picks only the best fixed."""
    x, _ = test.tensors()
    target = ss.split(model, point, input_shape=test.image_shape)
    victim = ss.Victim(target, defense, threat="white_box", aux=aux)
    z = victim.observe(x)
    auto = _psnr(ss.WhiteBoxInversion(iters=iters, search="auto", progress=False).fit(victim).invert(z), x)
    priors, lrs = search_grid(point, None, None, None)
    fixed = {(t, w, r): _psnr(ss.WhiteBoxInversion(iters=iters, tv=t, l2=w, lr=r, search=None, progress=False)
                              .fit(victim).invert(z), x) for t, w in priors for r in lrs}
    best = max(fixed, key=fixed.get)
    return auto, fixed[best], best


@pytest.fixture(scope="module")
def small_digits(mnist5k):
    """The built-in digits at 16×16: (train, aux, test)."""
    return _resized(mnist5k.train, 16), _resized(mnist5k.holdout.take(64), 16), _resized(mnist5k.test.take(4), 16)


@pytest.fixture(scope="module")
def small_cnns(small_digits):
    torch.set_num_threads(1)
    return {"cnn_a": _trained(cnn_a, small_digits[0]), "cnn_b": _trained(cnn_b, small_digits[0])}


def _cuts(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    return [p.name for p in ss.split_points(model, shape)]


@pytest.mark.parametrize("name", ["cnn_a", "cnn_b"])
def test_auto_is_within_a_db_of_the_best_fixed_setting_on_custom_cnns(name, small_cnns, small_digits, one_thread):
    _, aux, test = small_digits
    model = small_cnns[name]
    for point in _cuts(model, test.image_shape):
        auto, best, setting = _auto_vs_best_fixed(model, point, test, aux, iters=60)
        assert auto >= best - 1.0, (name, point, auto, best, setting)


def test_auto_is_within_a_db_of_the_best_fixed_setting_on_lenet(trained_lenet, mnist5k, one_thread):
    test, aux = mnist5k.test.take(4), mnist5k.holdout.take(64)
    for point in ["conv1", "ReLU2", "fc3"]:
        auto, best, setting = _auto_vs_best_fixed(trained_lenet, point, test, aux, iters=60)
        assert auto >= best - 1.0, (point, auto, best, setting)


def test_auto_against_a_noisy_defense_is_within_a_db_of_the_best_fixed(trained_lenet, mnist5k, one_thread):
    test, aux = mnist5k.test.take(4), mnist5k.holdout.take(64)
    defense = ss.defenses.GaussianNoise(sigma=0.5)
    for point in ["conv1", "ReLU2"]:
        auto, best, setting = _auto_vs_best_fixed(trained_lenet, point, test, aux, iters=60, defense=defense)
        assert auto >= best - 1.0, (point, auto, best, setting)


def test_the_setting_is_chosen_at_fit_on_the_aux_images_and_kept_for_every_invert(trained_lenet, mnist5k,
                                                                                   one_thread):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, ss.defenses.GaussianNoise(sigma=0.5), threat="white_box", aux=mnist5k.holdout)
    x, _ = mnist5k.test.take(6).tensors()
    z = victim.observe(x)
    attack = ss.WhiteBoxInversion(iters=20, search="auto", progress=False).fit(victim)
    # fit chose the setting from the aux images alone: nothing of the private images was given to it.
    assert attack.calibration_ and (attack.tv_, attack.l2_, attack.lr_) in attack.calibration_
    best = max(attack.calibration_.values())
    assert attack.calibration_[(attack.tv_, attack.l2_, attack.lr_)] == best
    first = attack.invert(z)
    chosen, residual = attack.chosen_.clone(), attack.residual_.clone()
    assert chosen.shape == (6, 3) and residual.shape == (6,)
    assert torch.all(chosen == torch.tensor([attack.tv_, attack.l2_, attack.lr_], dtype=torch.float64))
    # invert(z) receives z only: the same z gives the same choice and the same images; other images, the same setting.
    assert torch.equal(attack.invert(z), first) and torch.equal(attack.chosen_, chosen)
    assert torch.all(residual >= 0) and torch.all(attack.residual_ == residual)
    attack.invert(victim.observe(mnist5k.test.subset(list(range(6, 9))).tensors()[0]))
    assert torch.equal(attack.chosen_[0], chosen[0])


def test_explicit_settings_run_once_as_before(trained_lenet, mnist5k, one_thread):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="white_box", aux=mnist5k.holdout.take(16))
    z = victim.observe(mnist5k.test.take(3).tensors()[0])
    given = ss.WhiteBoxInversion(iters=10, lr=0.05, tv=0.5, l2=0.0, search="auto", progress=False).fit(victim)
    table = ss.WhiteBoxInversion(iters=10, lr=0.05, tv=0.5, l2=0.0, search=None, progress=False).fit(victim)
    assert torch.equal(given.invert(z), table.invert(z)) and given.calibration_ == {}
    assert torch.equal(table.chosen_, torch.tensor([[0.5, 0.0, 0.05]] * 3, dtype=torch.float64))
    no_aux = ss.WhiteBoxInversion(iters=10, search="auto", progress=False).fit(ss.Victim(target, threat="white_box"))
    assert no_aux.calibration_ == {} and (no_aux.tv_, no_aux.l2_) == (1.0, 0.0)  # the table's priors for ReLU2
    no_aux.invert(z)  # without aux data, the lr is chosen per image among the searched ones
    assert set(no_aux.chosen_[:, 2].tolist()) <= set(no_aux.lr_) and len(no_aux.lr_) == 3
    with pytest.raises(ConfigError, match=r"^search must be one of 'auto', 'he2019', None, got 'grid'$"):
        ss.WhiteBoxInversion(search="grid")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet", "cnn_a", "cnn_b"])
def test_auto_is_within_a_db_of_the_best_fixed_setting_at_full_size(name, trained_lenet, mnist5k, one_thread):
    build = {"cnn_a": cnn_a, "cnn_b": cnn_b}
    model = trained_lenet if name == "lenet" else _trained(build[name], mnist5k.train)
    test, aux = mnist5k.test.take(16), mnist5k.holdout
    for point in _cuts(model, test.image_shape):
        auto, best, setting = _auto_vs_best_fixed(model, point, test, aux, iters=300)
        assert auto >= best - 1.0, (name, point, auto, best, setting)


def test_query_free_auto_tunes_rmle_on_the_shadow_with_the_attackers_images(trained_lenet, mnist5k, one_thread):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="query_free", aux=mnist5k.holdout.take(64))
    z = victim.observe(mnist5k.test.take(3).tensors()[0])
    runs = [ss.QueryFreeInversion(steps=20, iters=10, search="auto", progress=False).fit(victim) for _ in range(2)]
    attack = runs[0]
    setting = (attack.tv_, attack.l2_, attack.rmle_lr_)
    assert attack.calibration_[setting] == max(attack.calibration_.values())
    priors, lrs = search_grid("ReLU2", None, None, None)
    assert set(attack.calibration_) == {(t, w, r) for t, w in priors for r in lrs}
    assert torch.equal(attack.invert(z), runs[1].invert(z))  # the same seed, the same choice and images
    table = ss.QueryFreeInversion(steps=20, iters=10, progress=False).fit(victim)  # the default: the table
    assert table.calibration_ == {} and (table.tv_, table.l2_, table.rmle_lr_) == (1.0, 0.0, 1e-2)
