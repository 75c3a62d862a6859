"""The learned-prior inversion (``prior_inversion``): runs under white-box and query-free threats only, checks its
parameters, draws from its seed alone, adapts to a noisy defense, keeps per image the restart of lowest
residual, and at a deep cut of a trained LeNet reconstructs from the generator's range far better than a blank
image."""

from __future__ import annotations

import re

import pytest
import torch

import splitshield as ss
from splitshield import metrics
from splitshield.attacks import ATTACKS, PriorInversion
from splitshield.attacks.prior_inversion import ConvVAE
from splitshield.errors import ConfigError, ThreatModelError


def tiny(**params) -> PriorInversion:
    """A small, fast attack: a narrow VAE trained briefly, a short latent search, no refinement."""
    base = dict(latent=8, width=16, steps=150, batch_size=32, latent_iters=60, refine_iters=0, shadow_steps=60,
                progress=False)
    return PriorInversion(**{**base, **params})


@pytest.fixture(scope="module")
def digits(mnist5k) -> torch.Tensor:
    return mnist5k.test.first_per_class()[0]


@pytest.fixture(scope="module")
def aux(mnist5k):
    return mnist5k.holdout.take(400)


def _victim(model, point: str, aux, threat: str = "white_box", defense=None) -> ss.Victim:
    return ss.Victim(ss.split(model, point, input_shape=(1, 28, 28)), defense, threat=threat, aux=aux)


BAD_PARAMETERS = [("latent", 0), ("width", 2.5), ("steps", -1), ("batch_size", True), ("lr", 0.0),
                  ("beta", -1.0), ("restarts", 0), ("latent_iters", 0), ("latent_lr", float("nan")),
                  ("latent_l2", float("inf")), ("refine_iters", -1), ("refine_tv", -0.1), ("refine_lr", 0),
                  ("keep_refined", "never"), ("holdout", 1.5), ("shadow_steps", 0), ("seed", -1), ("progress", 1)]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMETERS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMETERS])
def test_a_bad_parameter_is_one_line_naming_it(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} must .*, got {re.escape(repr(value))}$"):
        PriorInversion(**{field: value})


def test_registered_and_its_config_rebuilds_it():
    assert ATTACKS["prior_inversion"] is PriorInversion is ss.PriorInversion
    attack = PriorInversion(latent=16, refine_tv=0.1, keep_refined="always", seed=3)
    config = attack.config()
    assert config["name"] == "prior_inversion" and config["latent"] == 16 and config["refine_lr"] is None
    assert PriorInversion(**{k: v for k, v in config.items() if k != "name"}).config() == config


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 30, 26), (3, 64, 48), (2, 5, 9)])
def test_the_generator_makes_images_of_any_shape_in_the_unit_range(shape):
    vae = ConvVAE(shape, latent=4, width=16)
    with torch.no_grad():
        x = vae(torch.randn(3, 4) * 5)
    assert x.shape == (3, *shape) and float(x.min()) >= 0 and float(x.max()) <= 1
    mu, logvar = vae.encode(torch.rand(3, *shape))
    assert mu.shape == logvar.shape == (3, 4)
    assert vae.loss(torch.rand(3, *shape), torch.randn(3, 4), beta=1.0).shape == (3,)


def test_runs_under_white_box_and_query_free_only(trained_lenet, aux, digits, one_thread):
    for threat in ("black_box", "architecture_only"):
        with pytest.raises(ThreatModelError, match=f"PriorInversion needs white_box or query_free access; "
                                                    f"the victim gives {threat}"):
            tiny().fit(_victim(trained_lenet, "ReLU2", aux, threat))
    with pytest.raises(ConfigError, match="PriorInversion needs auxiliary data"):
        tiny().fit(_victim(trained_lenet, "ReLU2", None))
    for threat in ("white_box", "query_free"):
        victim = _victim(trained_lenet, "ReLU2", aux, threat)
        attack = tiny(refine_iters=10).fit(victim)
        x_hat = attack.invert(victim.observe(digits))
        assert x_hat.shape == digits.shape and float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
        assert (attack.shadow_ is None) == (threat == "white_box")
        # White-box: the choice to refine is made on held-out aux images (latent + 3 × 2 refinements tried).
        assert len(attack.calibration_) == (7 if threat == "white_box" else 0)
    # Under query_free the attack inverts through the shadow head of a QueryFreeInversion, not the head, and the
    # held-out images' features, the shadow's own, cannot judge a refinement: "auto" keeps the latent images.
    assert isinstance(attack.shadow_, ss.QueryFreeInversion) and attack.shadow_.steps == 60
    assert not attack.keep_refined_ and torch.equal(x_hat, attack.latent_images_)


def test_keeps_per_image_the_restart_of_lowest_residual(trained_lenet, aux, digits, one_thread):
    victim = _victim(trained_lenet, "fc1act", aux)
    view = victim.view()
    z = victim.observe(digits)
    attack = tiny(restarts=4, latent_iters=30).fit(victim)
    x_hat = attack.invert(z)
    codes = attack.restart_codes_  # [R, B, latent]
    assert codes.shape == (4, len(digits), 8)
    # The residuals recomputed here, from the codes alone, through the head (no noise: send is deterministic).
    with torch.no_grad():
        residuals = torch.stack([(view.send(attack.generator_(c)) - z).pow(2).flatten(1).sum(1)
                                 / z.pow(2).flatten(1).sum(1) for c in codes])
    assert torch.allclose(residuals, attack.restart_residuals_, rtol=1e-4)
    assert torch.equal(attack.chosen_, residuals.argmin(0))
    assert len(set(attack.chosen_.tolist())) > 1  # the choice is really made per image (not always one restart)
    rows = torch.arange(len(digits))
    assert torch.allclose(attack.residual_, residuals[attack.chosen_, rows], rtol=1e-4)
    # Without refinement the output is the chosen restart's image: on the generator's range.
    with torch.no_grad():
        assert torch.allclose(x_hat, attack.generator_(codes[attack.chosen_, rows]), atol=1e-6)


def test_each_image_is_inverted_as_if_alone(trained_lenet, aux, digits, one_thread):
    # Per-image losses are summed and every image starts from the same codes: a batch changes nothing.
    victim = _victim(trained_lenet, "ReLU2", aux)
    z = victim.observe(digits[:3])
    attack = tiny(latent_iters=20, refine_iters=10, keep_refined="always").fit(victim)
    batched = attack.invert(z)
    for i in range(3):
        assert torch.allclose(attack.invert(z[i : i + 1]), batched[i : i + 1], atol=1e-4)


def test_at_a_deep_cut_it_reconstructs_from_the_generators_range(trained_lenet, mnist5k, digits, one_thread):
    victim = _victim(trained_lenet, "ReLU2", mnist5k.holdout)
    attack = tiny(latent=16, steps=400, lr=6e-3, latent_iters=150).fit(victim)
    x_hat = attack.invert(victim.observe(digits))
    # The output is the generator's image of the codes kept: on its range.
    with torch.no_grad():
        assert torch.allclose(x_hat, attack.generator_(attack.codes_), atol=1e-6)
    grey = torch.full_like(digits, 0.5)
    mean_image = mnist5k.holdout.tensors()[0].mean(0, keepdim=True).expand_as(digits)
    psnr = float(metrics.psnr(x_hat, digits))
    # Measured (seeds 0-2): 13.8-14.7 dB, SSIM 0.47-0.61; the grey image 6.4 dB, the mean aux image 11.9 dB and
    # SSIM 0.16.
    assert psnr > float(metrics.psnr(grey, digits)) + 6 and psnr > float(metrics.psnr(mean_image, digits)) + 1.5
    assert float(metrics.ssim(x_hat, digits)) > float(metrics.ssim(mean_image, digits)) + 0.2


def test_refinement_is_kept_where_it_helps_on_the_attackers_own_images(trained_lenet, aux, digits, one_thread):
    # conv1 is nearly invertible: pixel-space refinement beats the blurry latent image, and the attacker sees it
    # on its held-out aux images; the private images confirm it.
    victim = _victim(trained_lenet, "conv1", aux)
    attack = tiny(refine_iters=100, refine_lr=0.03).fit(victim)
    assert set(attack.calibration_) == {None, (0.01, 0.03), (0.1, 0.03), (1.0, 0.03)}
    assert attack.keep_refined_ and attack.calibration_[(attack.refine_tv_, 0.03)] > attack.calibration_[None]
    x_hat = attack.invert(victim.observe(digits))
    # Measured (seeds 0-2): 45.5-46.0 dB refined, 12.2 dB the latent images (held-out: 44.9-46.1 vs 12.2).
    assert float(metrics.psnr(x_hat, digits)) > float(metrics.psnr(attack.latent_images_, digits)) + 3
