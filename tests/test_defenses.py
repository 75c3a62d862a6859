"""Defenses: noise statistics, DP calibration, distance correlation, VIB's KL, filters, Shredder, adversaries,
shapes/dtypes/devices, config round trips, and clear errors on bad parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitshield import Trainer, split
from splitshield.data import ImageSet
from splitshield.defenses import (
    CEM,
    VIB,
    AdversarialReconstruction,
    DPNoise,
    Dropout,
    FeatureBound,
    GaussianNoise,
    InfoScissors,
    LaplaceNoise,
    NoPeek,
    Quantize,
    Shredder,
    TopKPrune,
    build_defense,
    distance_correlation,
    noise_std,
)
from splitshield.defenses.dp import clip_norm, gaussian_sigma, laplace_scale
from splitshield.defenses.vib import gaussian_kl
from splitshield.errors import ConfigError
from splitshield.models import build_model

FEATURE = (16, 8, 8)


def all_defenses():
    return [
        FeatureBound("sigmoid"), FeatureBound("tanh"), FeatureBound("standardize"), GaussianNoise(0.3),
        LaplaceNoise(0.2), DPNoise(0.5, 2.0), DPNoise(0.5, 2.0, mechanism="gaussian"), Dropout(0.3),
        Dropout(0.3, rescale=True), TopKPrune(0.5), Quantize(3), Shredder(FEATURE, lam=0.1), NoPeek(0.5),
        VIB(16, 0.1), AdversarialReconstruction(0.3), AdversarialReconstruction(0.3, metric="mse"),
        InfoScissors(1.0), CEM(8, sigma=0.1), GaussianNoise(0.1) + CEM(16), GaussianNoise(0.2, on="input"),
        LaplaceNoise(0.2, on="input"),
    ]


# The defenses with a training penalty from the first batch on; CEM's needs a clustering first (none here).
PENALISED = {"shredder", "nopeek", "vib", "adversarial", "infoscissors"}


@pytest.mark.parametrize("defense", all_defenses(), ids=lambda d: d.config()["name"])
def test_output_shape_dtype_device_and_config_round_trip(defense):
    z = torch.rand(6, *FEATURE)
    out = defense.obfuscate(z, training=True)
    assert out.shape == z.shape and out.dtype == z.dtype and out.device == z.device
    out = defense.obfuscate(z, training=False)
    assert out.shape == z.shape and out.dtype == z.dtype and out.device == z.device
    x = torch.rand(6, 1, 28, 28)
    loss = defense.regularizer(x, torch.arange(6) % 2, z, out, torch.randn(6, 10))
    name = defense.config()["name"]
    if name in PENALISED:
        assert loss is not None and loss.dim() == 0 and torch.isfinite(loss)
    else:
        assert loss is None, name
    rebuilt = build_defense(defense.config())
    assert type(rebuilt) is type(defense) and rebuilt.config() == defense.config()


def test_gaussian_noise_std_matches_sigma():
    torch.manual_seed(0)
    z = torch.zeros(400, 16, 8, 8)
    noise = GaussianNoise(0.7).obfuscate(z, training=False)
    assert noise.mean().abs() < 0.005
    assert noise.std().item() == pytest.approx(0.7, rel=0.01)


def test_laplace_std_is_sqrt2_times_scale():
    torch.manual_seed(0)
    z = torch.zeros(400, 16, 8, 8)
    noise = LaplaceNoise(0.5).obfuscate(z, training=True)
    assert noise.std().item() == pytest.approx(math.sqrt(2) * 0.5, rel=0.01)
    assert noise.abs().mean().item() == pytest.approx(0.5, rel=0.01)  # E|X| = b for Laplace(0, b)
    assert LaplaceNoise(0.5).std == pytest.approx(math.sqrt(2) * 0.5)


@pytest.mark.parametrize("noise", [GaussianNoise(0.4, on="input"), LaplaceNoise(0.4 / math.sqrt(2), on="input")],
                         ids=["gaussian", "laplace"])
def test_input_noise_perturbs_the_images_only(noise):
    torch.manual_seed(0)
    x = torch.full((200, 1, 28, 28), 0.5)
    moved = noise.perturb(x, training=False) - x
    assert moved.mean().abs() < 0.005 and moved.std().item() == pytest.approx(0.4, rel=0.01)
    z = torch.rand(6, *FEATURE)
    assert torch.equal(noise.obfuscate(z, training=True), z)  # nothing added on the feature side
    assert torch.equal(GaussianNoise(0.4).perturb(x, training=True), x)  # and feature noise leaves x alone
    assert noise_std(noise, FEATURE) == 0.0  # not feature noise: no CE floor, no CEM threshold from it
    head = nn.Flatten()
    torch.manual_seed(1)
    sent = noise.send(head, x)
    torch.manual_seed(1)
    assert torch.equal(sent, head(noise.perturb(x, training=False)))


def test_input_noise_reaches_trainer_victim_and_attacks():
    from splitshield.attacks import Victim, WhiteBoxInversion

    target = lenet_split()
    inputs: list[torch.Tensor] = []
    # Training steps only (the head in train mode): validation runs a probe batch through the head in eval mode.
    target.head.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach()) if module.training else None)
    data = tiny_set()
    trainer = Trainer(target, GaussianNoise(0.3, on="input"), epochs=1, batch_size=32, progress=False)
    trainer.fit(data)
    x, _ = data.tensors()
    assert inputs and all((seen.std() - x.std()).abs() > 0.05 for seen in inputs)  # noisy images in training
    defense = GaussianNoise(0.3, on="input")
    victim = Victim(target, defense, threat="white_box", aux=data, seed=3)
    z = victim.observe(x[:4])
    z_clean = target.head(x[:4]).detach()
    assert not torch.allclose(z, z_clean)
    view = victim.view()  # the adaptive white-box attacker optimises through the input noise, resampled
    assert not torch.equal(view.send(x[:4]), view.send(x[:4]))
    blind = Victim(target, defense, threat="white_box", aux=data, adaptive=False).view()
    assert torch.equal(blind.send(x[:4]), z_clean)
    x_hat = WhiteBoxInversion(iters=3, progress=False).fit(victim).invert(z)
    assert x_hat.shape == (4, 1, 28, 28)


def test_noise_std_of_a_composition_adds_variances():
    d = FeatureBound() + GaussianNoise(0.3) + LaplaceNoise(0.4 / math.sqrt(2))
    assert noise_std(d, FEATURE) == pytest.approx(0.5)
    assert noise_std(Dropout(0.5), FEATURE) == 0.0


def test_dp_calibration_formulas():
    # Dwork & Roth: Gaussian sigma = Δ2 sqrt(2 ln(1.25/δ)) / ε ; Laplace b = Δ1 / ε.
    assert gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(19.3800, rel=1e-4)
    assert laplace_scale(0.25, 3.0) == pytest.approx(12.0)
    d = FEATURE[0] * FEATURE[1] * FEATURE[2]
    assert DPNoise(0.5, clip=1.5).sensitivity(d) == 3.0  # L1 clip C: Δ1 = 2C
    assert DPNoise(0.5, clip=1.5, norm="l2").sensitivity(d) == pytest.approx(3.0 * math.sqrt(d))  # Δ1 <= 2C√d
    assert DPNoise(0.5, clip=1.5, mechanism="gaussian").sensitivity(d) == 3.0


def test_dp_noise_clips_then_adds_noise_of_the_stated_std():
    torch.manual_seed(0)
    z = 10 * torch.randn(300, 4, 4)
    for norm in ("l1", "l2"):
        clipped = clip_norm(z, 2.0, norm)
        size = clipped.flatten(1).abs().sum(1) if norm == "l1" else clipped.flatten(1).norm(dim=1)
        assert size.max().item() <= 2.0 + 1e-5
    small = torch.full((3, 4, 4), 1e-3)
    assert torch.equal(clip_norm(small, 2.0, "l2"), small)  # inside the ball: unchanged
    defense = DPNoise(0.8, clip=0.5, mechanism="gaussian", delta=1e-5)
    out = defense.obfuscate(z, training=False)
    assert (out - clip_norm(z, 0.5, "l2")).std().item() == pytest.approx(defense.std_for(16), rel=0.03)


def test_distance_correlation_known_values():
    torch.manual_seed(0)
    a = torch.randn(500, 7)
    assert distance_correlation(a, a).item() == pytest.approx(1.0, abs=1e-4)
    q, _ = torch.linalg.qr(torch.randn(7, 7))
    assert distance_correlation(a, 3.0 * a @ q + 1.0).item() == pytest.approx(1.0, abs=1e-4)
    # Independent samples: the sample (V-statistic) dCor is biased up by O(1/sqrt(n)) and tends to 0.
    small = distance_correlation(torch.randn(400, 5), torch.randn(400, 9)).item()
    large = distance_correlation(torch.randn(1600, 5), torch.randn(1600, 9)).item()
    assert large < 0.15 and small / large == pytest.approx(2.0, rel=0.2)
    b = torch.randn(1600, 5)
    assert distance_correlation(b, b.pow(2)).item() > 3 * large  # a nonlinear dependence is detected


def test_vib_kl_matches_closed_form_of_torch_distributions():
    torch.manual_seed(0)
    mu, sigma = torch.randn(4, 3, 2, 2), torch.rand(4, 3, 2, 2) + 0.1
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    assert torch.allclose(gaussian_kl(mu, sigma), reference, atol=1e-5)
    vib = VIB(3, beta=0.5)
    z = torch.randn(4, 3, 2, 2)
    m, s = vib.statistics(z)
    assert torch.allclose(m, z)  # starts as the identity for the mean
    assert torch.allclose(s, torch.full_like(s, math.log1p(math.exp(-5.0))))
    assert vib.regularizer(None, None, z, None, None).item() == pytest.approx(0.5 * gaussian_kl(m, s).mean().item())


def test_dropout_no_rescale_and_standard():
    torch.manual_seed(0)
    z = torch.rand(200, 16, 8, 8) + 0.5
    out = Dropout(0.4).obfuscate(z, training=False)
    zero = out == 0
    assert zero.float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.equal(out[~zero], z[~zero])  # He et al.: kept values are not rescaled
    std = Dropout(0.4, rescale=True).obfuscate(z, training=True)
    dropped = std == 0  # z >= 0.5 everywhere: a zero is a dropped element
    assert dropped.float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.allclose(std[~dropped], z[~dropped] / 0.6)  # standard dropout: kept values scaled by 1/(1 - r)
    assert std.mean().item() == pytest.approx(z.mean().item(), rel=0.01)  # hence the mean is kept


def test_topk_keeps_exactly_the_largest_magnitudes():
    torch.manual_seed(0)
    z = torch.randn(5, 16, 8, 8)
    out = TopKPrune(0.75).obfuscate(z, training=False).flatten(1)
    keep = math.ceil(0.25 * 1024)
    assert ((out != 0).sum(1) == keep).all()
    smallest_kept = out.abs().masked_fill(out == 0, float("inf")).min(1).values
    largest_dropped = z.flatten(1).abs().masked_fill(out != 0, 0).max(1).values
    assert (smallest_kept > largest_dropped).all()


def test_quantize_levels_and_straight_through_gradient():
    z = torch.randn(3, 200, requires_grad=True)
    out = Quantize(3).obfuscate(z, training=True)
    for row in out.detach():
        assert len(torch.unique(row)) <= 8
    assert (out - z).abs().max() <= (z.max(1).values - z.min(1).values).max() / 14 + 1e-6
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_feature_bound_ranges():
    z = 50 * torch.randn(4, 16, 8, 8)
    assert torch.equal(FeatureBound("sigmoid").obfuscate(z, True), torch.sigmoid(z))  # (0, 1)
    assert torch.equal(FeatureBound("tanh").obfuscate(z, True), torch.tanh(z))  # (-1, 1)
    s = FeatureBound("standardize").obfuscate(z, True).flatten(1)
    assert torch.allclose(s.mean(1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(s.std(1, unbiased=False), torch.ones(4), atol=1e-3)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: GaussianNoise(-1), "sigma must be >= 0"),
        (lambda: LaplaceNoise(-0.1), "scale must be >= 0"),
        (lambda: DPNoise(0.0), "epsilon must be > 0"),
        (lambda: DPNoise(-1.0), "epsilon must be > 0"),
        (lambda: DPNoise(0.5, clip=0), "clip must be > 0"),
        (lambda: DPNoise(2.0, mechanism="gaussian"), "epsilon must be < 1"),
        (lambda: DPNoise(0.5, mechanism="gaussian", delta=0), "delta must be in"),
        (lambda: DPNoise(0.5, mechanism="exponential"), "mechanism must be one of"),
        (lambda: Dropout(1.0), "rate must be in"),
        (lambda: TopKPrune(-0.2), "ratio must be in"),
        (lambda: Quantize(0), "bits must be a positive integer"),
        (lambda: Quantize(32), "bits must be <= 16"),
        (lambda: NoPeek(-1), "alpha must be >= 0"),
        (lambda: VIB(0), "channels must be a positive integer"),
        (lambda: Shredder(FEATURE, init_scale=0), "init_scale must be > 0"),
        (lambda: AdversarialReconstruction(metric="psnr"), "metric must be one of"),
        (lambda: InfoScissors(lam=-1), "lam must be >= 0"),
        (lambda: CEM(lam=-8), "lam must be >= 0"),
        (lambda: CEM(k=0), "k must be a positive integer"),
        (lambda: FeatureBound("relu"), "kind must be one of"),
        (lambda: GaussianNoise(0.1, on="output"), "on must be one of feature, input"),
        (lambda: build_defense({"name": "gaussian_noise", "sigma": -2}), "sigma must be >= 0"),
        (lambda: build_defense({"name": "gaussian_noise", "simga": 1}), "gaussian_noise"),
    ],
)
def test_bad_parameters_give_a_clear_error(factory, field):
    with pytest.raises(ConfigError, match=field):
        factory()


# ---- integration with the trainer --------------------------------------------------------------------------------


def tiny_set(n: int = 64, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = (torch.rand(n, 1, 28, 28, generator=g) * 60).to(torch.uint8)
    for c in range(4):  # a class-dependent bright square makes the task learnable
        images[labels == c, :, 7 * c : 7 * c + 7, 7 * c : 7 * c + 7] = 250
    return ImageSet(images, labels, tuple(str(c) for c in range(4)))


def lenet_split():
    return split(build_model("lenet", num_classes=4), "ReLU2", input_shape=(1, 28, 28))


def test_tail_sees_the_obfuscated_feature_in_training_and_inference():
    target = lenet_split()
    seen: list[torch.Tensor] = []
    target.tail.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    trainer = Trainer(target, GaussianNoise(100.0), epochs=1, batch_size=32, progress=False)
    trainer.fit(tiny_set())
    assert seen and all(s.std() > 50 for s in seen)  # clean ReLU2 features are O(1): the tail saw the noise
    seen.clear()
    trainer.evaluate(tiny_set(16, seed=1))
    assert seen and all(s.std() > 50 for s in seen)


def test_shredder_noise_is_trained_by_the_trainer():
    target = lenet_split()
    shredder = Shredder(FEATURE, lam=1.0, init_scale=0.1)
    before = shredder.log_scale.detach().clone(), shredder.loc.detach().clone()
    trainer = Trainer(target, shredder, epochs=1, batch_size=16, progress=False)
    assert any(p is shredder.log_scale for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.fit(tiny_set())
    assert shredder.log_scale.mean() > before[0].mean()  # the magnitude reward grew the noise
    assert not torch.equal(shredder.loc, before[1])


def test_shredder_learned_std_is_the_std_of_its_random_part():
    shredder = Shredder(FEATURE, init_scale=0.5)
    assert shredder.learned_std() == pytest.approx(0.5 * math.sqrt(2))  # Laplace(b): std = √2·b
    with torch.no_grad():
        shredder.log_scale[0] = math.log(2.0)  # one channel louder: the RMS over elements follows
        noise = shredder.obfuscate(torch.zeros(4000, *FEATURE), training=True) - shredder.loc
    expected = math.sqrt(2 * (0.25 * 15 + 4.0) / 16)
    assert shredder.learned_std() == pytest.approx(expected)
    assert noise.pow(2).mean().sqrt().item() == pytest.approx(expected, rel=0.01)


# Settings whose penalty cannot be zero, so that the gradient checks below have a gradient to check: SSIM >= -1
# puts relu(SSIM + 1) above 0; MSE < 1 between a sigmoid decoder's output and images in [0, 1] puts
# relu(1 - MSE) above 0; CLUB's difference of two MSEs is 0 only by accident (asserted below).
@pytest.mark.parametrize("make", [lambda: AdversarialReconstruction(1.0, threshold=-1.0),
                                  lambda: AdversarialReconstruction(1.0, metric="mse", threshold=1.0),
                                  lambda: InfoScissors(1.0)], ids=["adversarial-ssim", "adversarial-mse", "club"])
def test_online_adversary_is_updated_but_outside_the_trainer_optimiser(make):
    torch.manual_seed(0)  # InfoScissors' negative pairs
    defense = make()
    target = lenet_split()
    trainer = Trainer(target, defense, epochs=1, batch_size=32, progress=False)
    adversary = getattr(defense, "adversary", None) or defense.inversion
    assert list(defense.parameters()) == []  # nothing for the trainer's optimiser, nothing in checkpoints
    x, y = tiny_set(8).tensors()
    z = target.head(x)
    defense.regularizer(x, y, z, z, None)
    first = [p.detach().clone() for p in adversary.module.parameters()]
    loss = defense.regularizer(x, y, z, z, None)
    assert any(not torch.equal(a, b) for a, b in zip(first, adversary.module.parameters(), strict=True))
    assert loss.dim() == 0 and loss.item() != 0  # the setup's promise: a penalty, hence a gradient, to check
    assert all(p.grad is None for p in target.head.parameters())  # the regularizer's decoder updates left none
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in adversary.module.parameters())  # frozen in the penalty
    for name, p in target.head.named_parameters():  # the penalty reaches every weight of the head
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainer.fit(tiny_set(32))


def test_adversarial_penalty_is_zero_below_its_threshold():
    """SSIM <= 1, so with threshold 1 the hinge relu(SSIM - 1) is 0 and the head gets no gradient from it."""
    target = lenet_split()
    defense = AdversarialReconstruction(1.0, threshold=1.0)
    x, y = tiny_set(8).tensors()
    loss = defense.regularizer(x, y, target.head(x), target.head(x), None)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in target.head.parameters())


@pytest.mark.parametrize("make", [lambda std: AdversarialReconstruction(1.0, metric="mse", standardize=std),
                                  lambda std: InfoScissors(1.0, standardize=std)], ids=["adversarial", "club"])
def test_online_adversary_cannot_be_defeated_by_the_feature_scale(make):
    """Standardised, the decoder's input (hence the penalty) is the same for z and c·z: d penalty / dc = 0 at
    c = 1, so a head gains nothing by growing or shrinking its feature. Raw-fed, the scale moves the penalty."""
    x, y = tiny_set(16).tensors()
    z = lenet_split().head(x).detach()

    def scale_gradient(standardize: bool) -> float:
        defense = make(standardize)
        defense.regularizer(x, y, z, z, None)  # build and train the decoder once
        c = torch.tensor(1.0, requires_grad=True)
        torch.manual_seed(0)  # InfoScissors' negative pairs
        defense.regularizer(x, y, c * z, c * z, None).backward()
        return c.grad.abs().item()

    raw, standardised = scale_gradient(False), scale_gradient(True)
    assert raw > 1e-5  # 2e-3 (adversarial) and 7e-5 (CLUB) in this setting
    assert standardised < 1e-4 * raw  # float rounding: about 3e-10


def test_regularizers_in_a_composition_see_the_bounded_feature():
    seen = {}

    class Spy(NoPeek):
        def regularizer(self, x, y, z, z_sent, logits):
            seen["z"] = z
            return None

    d = FeatureBound("sigmoid") + GaussianNoise(0.1) + Spy(0.0)
    z = 10 * torch.randn(4, 3)
    d.regularizer(None, None, z, None, None)
    assert torch.allclose(seen["z"], torch.sigmoid(z))


def test_module_on_a_device_keeps_it():
    # Not the CPU, where every tensor is anyway: without CUDA, the meta device (shapes only, no data) stands in.
    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    vib = VIB(16).to(device)
    z = torch.rand(2, *FEATURE, device=device)
    assert vib.obfuscate(z, False).device == z.device
    assert vib.regularizer(None, None, z, None, None).device == z.device
    assert isinstance(vib.stats, nn.Linear)


def test_checkpoint_round_trip_of_a_composed_defense(tmp_path):
    from splitshield.train import load_checkpoint, save_checkpoint

    target = lenet_split()
    defense = FeatureBound("tanh") + VIB(16, 0.01) + Shredder(FEATURE, lam=0.1) + CEM(8, sigma=0.1, k=2)
    Trainer(target, defense, epochs=1, batch_size=32, progress=False).fit(tiny_set(32))
    save_checkpoint(tmp_path / "ckpt", target, defense)
    _, loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config() == defense.config() == meta["defense"]
    z = torch.rand(3, *FEATURE)
    untrained = build_defense(defense.config())  # what loading would give without the learned state
    assert not torch.allclose(untrained.clean(z), defense.clean(z))
    assert not torch.equal(untrained.parts[2].log_scale, defense.parts[2].log_scale)
    assert torch.allclose(loaded.clean(z), defense.clean(z))  # VIB's learned mean map came back
    assert torch.equal(loaded.parts[2].log_scale, defense.parts[2].log_scale)  # and Shredder's learned noise
