"""The conditional-entropy MSE floor: exact on a Gaussian case, below every measured attack on real data."""

from __future__ import annotations

import math

import pytest
import torch

from splitshield import Trainer, Victim, load_dataset, split
from splitshield.attacks import InverseNetwork, WhiteBoxInversion
from splitshield.defenses import FeatureBound, GaussianNoise
from splitshield.errors import ConfigError
from splitshield.metrics import conditional_entropy_floor, mse
from splitshield.models import build_model


def test_floor_is_the_mmse_for_gaussian_images_and_identity_features():
    # x ~ N(m, s²I), z = x + N(0, σ²I): the MMSE per pixel is s²σ²/(s²+σ²) and the bound is tight there.
    torch.manual_seed(0)
    s, sigma, n = 0.1, 0.05, 20000
    x = 0.5 + s * torch.randn(n, 1, 3, 3)
    result = conditional_entropy_floor(x, x, sigma, pixel_variance=1e-12)
    mmse = s**2 * sigma**2 / (s**2 + sigma**2)
    assert result["mse_floor"] == pytest.approx(mmse, rel=0.03)
    # The Wiener estimator is optimal here; its measured MSE sits at (not below) the floor.
    z = x + sigma * torch.randn_like(x)
    wiener = 0.5 + (s**2 / (s**2 + sigma**2)) * (z - 0.5)
    assert result["mse_floor"] <= mse(wiener, x).item() * 1.03
    assert result["h_x"] == pytest.approx(9 * 0.5 * math.log(2 * math.pi * math.e * s**2), rel=0.01)


def test_floor_grows_with_noise_and_vanishes_without():
    torch.manual_seed(0)
    x = torch.rand(300, 1, 4, 4)
    z = torch.randn(300, 8)
    labels = torch.arange(300) % 3
    floors = [conditional_entropy_floor(x, z, s, labels)["mse_floor"] for s in (0.1, 1.0, 10.0)]
    assert floors[0] < floors[1] < floors[2]
    assert floors[2] <= x.var().item()  # never above the variance a constant guess achieves
    assert conditional_entropy_floor(x, z, 0.0, labels)["mse_floor"] == 0.0


def test_floor_bad_input():
    with pytest.raises(ConfigError, match="sigma must be >= 0"):
        conditional_entropy_floor(torch.rand(4, 1, 2, 2), torch.rand(4, 3), -1.0)
    with pytest.raises(ConfigError, match="at least 2"):
        conditional_entropy_floor(torch.rand(4, 1, 2, 2), torch.rand(4, 3), 1.0, torch.tensor([0, 0, 0, 1]))


def test_floor_below_the_strongest_adaptive_attack_on_real_data(one_thread):
    """The protocol of examples/cem_lenet.yaml, scaled down: MNIST digits, LeNet at ReLU2, tanh bound + noise."""
    torch.manual_seed(0)
    data = load_dataset("mnist-5k")
    target = split(build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    bound = FeatureBound("tanh")
    defense = bound + GaussianNoise(0.3)
    Trainer(target, defense, epochs=1, progress=False).fit(data.train.take(1500))
    x_fit, y_fit = data.train.tensors()  # fitted, as the benchmark, on more images than the attacks are scored on
    with torch.no_grad():
        z_clean = bound.clean(target.head(x_fit))
    floor = conditional_entropy_floor(x_fit, z_clean, 0.3, y_fit)["mse_floor"]
    x, _ = data.test.take(200).tensors()
    victim = Victim(target, defense, threat="black_box", aux=data.holdout, adaptive=True)
    z_sent = victim.observe(x)
    black = InverseNetwork(steps=150, progress=False).fit(victim)
    white = WhiteBoxInversion(iters=60, progress=False).fit(
        Victim(target, defense, threat="white_box", aux=data.holdout, adaptive=True))
    strongest = min(mse(black.invert(z_sent), x).item(), mse(white.invert(z_sent[:10]), x[:10]).item())
    print(f"floor {floor:.3g} <= strongest attack MSE {strongest:.4f}")
    assert 0 < floor <= strongest
