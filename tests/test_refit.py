"""The inverse network's closed-form refit of its decoder's last layer: exact on known linear maps, chosen by
held-out error, and invisible in the config (and so in stored cells' hashes) unless it is on."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitshield as ss
from splitshield import metrics
from splitshield.attacks._refit import last_linear_layer, refit_last_layer


def _known(layer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(features)


@pytest.mark.parametrize("truth, shape", [
    (nn.ConvTranspose2d(6, 3, 3, padding=1), (6, 10, 10)),
    (nn.ConvTranspose2d(4, 1, 5), (4, 8, 8)),
    (nn.Conv2d(5, 2, 3, padding=1), (5, 9, 9)),
    (nn.Conv2d(5, 2, 3, padding=1, bias=False), (5, 9, 9)),
])
def test_refit_recovers_the_weights_of_a_known_linear_layer(truth, shape):
    torch.manual_seed(0)
    features = torch.randn(64, *shape)
    images = _known(truth, features)
    decoder = nn.Sequential(type(truth)(**_like(truth)))  # the same layer, freshly initialised
    layer = last_linear_layer(decoder)
    held = (features[:8], images[:8])

    def error() -> float:
        return _known(decoder, held[0]).sub(held[1]).pow(2).mean().item()

    ridge = refit_last_layer(decoder, layer, (features[8:], images[8:]), held, error)
    assert ridge is not None
    assert torch.allclose(layer.weight, truth.weight, atol=1e-4)
    if truth.bias is not None:
        assert torch.allclose(layer.bias, truth.bias, atol=1e-4)


def _like(layer: nn.Module) -> dict:
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                padding=layer.padding, bias=layer.bias is not None)


def test_refit_solves_a_dense_layer_behind_a_reshape():
    torch.manual_seed(0)
    truth = nn.Linear(30, 2 * 4 * 4)
    features = torch.randn(200, 30)
    images = _known(truth, features).reshape(200, 2, 4, 4)
    decoder = nn.Sequential(nn.Linear(30, 32), nn.Unflatten(1, (2, 4, 4)))
    layer = last_linear_layer(decoder)
    assert layer is decoder[0]
    refit_last_layer(decoder, layer, (features[20:], images[20:]), (features[:20], images[:20]),
                     lambda: _known(decoder, features[:20]).sub(images[:20]).pow(2).mean().item())
    assert torch.allclose(layer.weight, truth.weight, atol=1e-4)


def test_refit_keeps_the_layer_when_no_refit_is_better_on_the_held_out_images():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1))
    before = decoder[0].weight.clone()
    features, images = torch.randn(16, 2, 6, 6), torch.rand(16, 1, 6, 6)
    # A criterion no refit can beat: the original layer must come back unchanged.
    assert refit_last_layer(decoder, decoder[0], (features, images), (features, images), lambda: 0.0) is None
    assert torch.equal(decoder[0].weight, before)


def test_only_a_last_layer_linear_in_its_weights_is_refitted():
    assert last_linear_layer(nn.Sequential(nn.Conv2d(2, 1, 3), nn.Sigmoid())) is None
    assert last_linear_layer(nn.Sequential(nn.ConvTranspose2d(2, 1, 4, stride=2))) is None  # stride 2
    assert last_linear_layer(nn.Conv2d(2, 1, 3)) is None  # not a Sequential: its forward is unknown
    assert isinstance(last_linear_layer(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 8),
                                                      nn.Unflatten(1, (2, 2, 2)))), nn.Linear)


@pytest.fixture(scope="module")
def linear_head_target():
    """A model whose head is a 1×1 convolution to two channels: a 1×1 linear decoder inverts it exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 2, 1), flatten=nn.Flatten(), fc=nn.Linear(2 * 28 * 28, 10)))
    return ss.split(model, "conv", input_shape=(1, 28, 28))


def test_refit_makes_the_inverse_network_exact_where_its_decoder_can_be(linear_head_target, mnist5k):
    x, _ = mnist5k.test.first_per_class()
    victim = ss.Victim(linear_head_target, threat="black_box", aux=mnist5k.holdout.take(300))
    decoder = nn.Sequential(nn.ConvTranspose2d(2, 1, 3, padding=1))

    def psnr(refit: bool) -> tuple[float, ss.InverseNetwork]:
        attack = ss.InverseNetwork(decoder, steps=5, refit=refit, seed=0, progress=False).fit(victim)
        return float(metrics.psnr(attack.invert(victim.observe(x)), x).mean()), attack

    trained, _ = psnr(False)
    refitted, attack = psnr(True)
    assert trained < 30 < 60 < refitted
    assert attack.refit_ is not None


def test_refit_is_named_in_the_config_only_when_on():
    # Cells stored before the option existed keep their hashes.
    assert "refit" not in ss.InverseNetwork().config()
    assert ss.InverseNetwork(refit=True).config()["refit"] is True
    with pytest.raises(ss.ConfigError, match="refit must be true or false"):
        ss.InverseNetwork(refit="yes")


def test_normal_equations_unfold_large_images_a_few_at_a_time():
    # A 3×3 conv of 2 channels to 3 over 64×64 maps, reshaped into 3×64×64 images: 4,096 design rows of 2·9 + 1 = 19
    # values each per image, so at most BATCH_VALUES // (4096 · 19) = 53 of the 70 images are unfolded at a time; the
    # sums equal XᵀX and XᵀY built from all the rows at once.
    from splitshield.attacks._refit import BATCH_VALUES, _rows, normal_equations

    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1)
    decoder = nn.Sequential(layer, nn.Flatten(), nn.Unflatten(1, (3, 64, 64)))
    features, images = torch.randn(70, 2, 64, 64), torch.rand(70, 3, 64, 64)
    batches = []
    layer.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    gram, rhs = normal_equations(decoder, layer, features, images)
    assert max(batches) == BATCH_VALUES // (64 * 64 * 19) and sum(batches) == 70
    x, y = _rows(layer, features, images)
    assert torch.allclose(gram, x.double().T @ x.double()) and torch.allclose(rhs, x.double().T @ y.double())


def test_a_linear_layer_over_positions_is_solved_per_position():
    # A Linear applied to each of 16 positions of a [16, 5] input: 16 rows per image, not one of 80 values; the refit
    # recovers the shared 5 -> 4 weights exactly from noiseless targets.
    torch.manual_seed(0)
    truth = nn.Linear(5, 4)
    layer = nn.Linear(5, 4)
    decoder = nn.Sequential(nn.Unflatten(1, (16, 5)), layer, nn.Flatten(), nn.Unflatten(1, (4, 4, 4)))
    features = torch.randn(200, 80)
    with torch.no_grad():
        images = truth(features.reshape(200, 16, 5)).reshape(200, 4, 4, 4)
    held = (features[:20], images[:20])

    def error() -> float:
        with torch.no_grad():
            return (decoder(held[0]) - held[1]).pow(2).mean().item()

    assert refit_last_layer(decoder, layer, (features[20:], images[20:]), held, error) is not None
    assert torch.allclose(layer.weight, truth.weight, atol=1e-4) and torch.allclose(layer.bias, truth.bias, atol=1e-4)
