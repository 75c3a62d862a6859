"""Attacks: threat models enforced, each attack recovers something real, batching is exact; parameters checked,
fits repeatable and independent of the global RNG."""

from __future__ import annotations

import re

import pytest
import torch

import splitshield as ss
from splitshield import metrics
from splitshield.attacks._rmle import rmle, total_variation
from splitshield.attacks.query_free import TRAFFIC_WEIGHTS as QF_TRAFFIC_WEIGHTS
from splitshield.attacks.query_free import _moment_distance
from splitshield.attacks.stand_in import HE2019_DIFFERENT_HEADS, he2019_different_head
from splitshield.errors import ConfigError, ThreatModelError


@pytest.fixture(scope="module")
def digits(mnist5k):
    return mnist5k.test.first_per_class()


def test_views_lack_what_the_threat_model_forbids(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    black = ss.Victim(target, threat="black_box", aux=mnist5k.holdout).view()
    assert not hasattr(black, "head") and not hasattr(black, "tail")
    free = ss.Victim(target, threat="query_free", aux=mnist5k.holdout).view()
    assert not hasattr(free, "head") and not hasattr(free, "query")
    # The shadow architecture is the head's, but none of its weights.
    fresh = free.head_architecture()
    assert not torch.equal(fresh.conv1.weight, target.head.conv1.weight)
    with pytest.raises(ThreatModelError, match="WhiteBoxInversion needs white_box access; the victim gives black_box"):
        ss.WhiteBoxInversion().fit(ss.Victim(target, threat="black_box"))
    with pytest.raises(ThreatModelError, match="InverseNetwork needs black_box or white_box"):
        ss.InverseNetwork().fit(ss.Victim(target, threat="query_free", aux=mnist5k.holdout))


def test_frozen_copies_do_not_touch_the_victim(trained_lenet):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    view = ss.Victim(target, threat="white_box").view()
    with torch.no_grad():
        view.head.conv1.weight.zero_()
    assert target.head.conv1.weight.abs().sum() > 0


def test_whitebox_recovers_conv1_almost_exactly(trained_lenet, digits):
    x, _ = digits
    target = ss.split(trained_lenet, "conv1", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="white_box")
    x_hat = ss.WhiteBoxInversion(iters=600, progress=False).fit(victim).invert(victim.observe(x))
    assert x_hat.shape == x.shape and float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1
    assert float(metrics.psnr(x_hat, x)) > 30  # conv1 is linear and over-complete: nearly invertible


def test_batched_rmle_equals_per_image(trained_lenet, digits):
    # Summing per-image losses keeps each image's optimisation independent of the batch (ALGORITHMS §F.4).
    x, _ = digits
    head = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28)).head.eval()
    with torch.no_grad():
        z = head(x[:3])
    batched = rmle(head, z, (1, 28, 28), iters=50, lr=1e-2, tv=1.0, l2=0.0)
    for i in range(3):
        single = rmle(head, z[i : i + 1], (1, 28, 28), iters=50, lr=1e-2, tv=1.0, l2=0.0)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-5)


def test_total_variation_known_case():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    assert torch.allclose(total_variation(x), torch.tensor([4 / 12]))


def test_inverse_network_beats_the_mean_image(trained_lenet, mnist5k, digits):
    x, _ = digits
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout)
    attack = ss.InverseNetwork(steps=150, progress=False).fit(victim)
    x_hat = attack.invert(victim.observe(x))
    mean_image = mnist5k.holdout.tensors()[0].mean(0, keepdim=True).expand_as(x)
    assert float(metrics.mse(x_hat, x)) < 0.7 * float(metrics.mse(mean_image, x))
    assert attack.losses_[-1] < attack.losses_[0]


class _Scale(ss.defenses.Defense):
    """Multiplies the feature by a constant: no privacy at all, only a different scale."""

    name = "scale"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def obfuscate(self, z, training):
        return z * self.factor


def test_standardised_inverse_network_is_blind_to_the_feature_scale(trained_lenet, mnist5k, digits):
    x, _ = digits
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    aux = mnist5k.holdout.take(500)

    def attack_mse(factor: float, standardize: bool) -> float:
        victim = ss.Victim(target, _Scale(factor), threat="black_box", aux=aux)
        attack = ss.InverseNetwork(steps=60, standardize=standardize, seed=0, progress=False).fit(victim)
        return float(metrics.mse(attack.invert(victim.observe(x)), x))

    # (c·z − c·mean) / (c·std) is the standardised z itself: the same decoder is trained, up to rounding.
    assert attack_mse(1000.0, True) == pytest.approx(attack_mse(1.0, True), rel=1e-2)
    # Raw, the 1000-fold feature stalls the decoder.
    assert attack_mse(1000.0, False) > 1.5 * attack_mse(1.0, True)


def test_standardisation_follows_the_decoder_actually_used():
    from splitshield.attacks.decoders import build_decoder, he2019_decoder, standardize_dims

    assert standardize_dims((128, 8, 8), he2019_decoder("ReLU32", (128, 8, 8))) == (0, 2, 3)
    assert standardize_dims((16, 4, 4), build_decoder((16, 4, 4), (1, 28, 28))) == (0,)  # dense: per value
    assert standardize_dims((64,), build_decoder((64,), (1, 28, 28))) == (0,)


@pytest.mark.filterwarnings("ignore:InverseNetwork. the auxiliary set has only")  # one step: size is irrelevant
def test_inverse_network_standardises_a_map_for_a_conv_decoder_per_channel(trained_lenet, mnist5k):
    for point, scale_shape in (("conv1", (8, 1, 1)), ("ReLU2", (16, 8, 8))):
        target = ss.split(trained_lenet, point, input_shape=(1, 28, 28))
        victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(64))
        attack = ss.InverseNetwork(steps=1, progress=False).fit(victim)
        assert tuple(attack.scaler_.std.shape) == scale_shape, point


def test_query_free_trains_a_shadow_that_fools_the_tail(trained_lenet, mnist5k, digits):
    x, _ = digits
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="query_free", aux=mnist5k.holdout)
    for shadow in ("same", "different"):
        attack = ss.QueryFreeInversion(shadow=shadow, steps=150, iters=100, progress=False).fit(victim)
        assert attack.shadow_accuracy_[0] > 0.5  # the frozen tail classifies the shadow's features
        assert attack.invert(victim.observe(x)).shape == x.shape


def test_model_completion_beats_chance(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout)
    attack = ss.ModelCompletion(n_labels=100, steps=200, progress=False).fit(victim)
    x, y = mnist5k.test.take(300).tensors()
    assert metrics.accuracy(attack.predict(victim.observe(x)), y) > 0.5


def test_features_teach_the_task_beyond_what_the_labels_teach_from_scratch(trained_lenet, mnist5k):
    # The last cut: the features are the logits, the task's answer itself.
    target = ss.split(trained_lenet, "fc3", input_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout)
    attack = ss.ModelCompletion(n_labels=40, steps=300, progress=False).fit(victim)
    scratch = attack.train_from_scratch(target)
    labelled_x, labelled_y = attack.labelled_
    assert labelled_x.shape == (40, 1, 28, 28) and torch.bincount(labelled_y).tolist() == [4] * 10
    with torch.no_grad():
        assert metrics.accuracy(scratch(labelled_x), labelled_y) == 1.0  # it fits its 40 images
        x, y = mnist5k.test.take(1000).tensors()
        from_scratch = metrics.accuracy(scratch(x), y)
        completion = metrics.accuracy(attack.predict(victim.observe(x)), y)
    # The logits carry the task: 40 labels on them beat 40 labels on pixels (5 points is about twice the
    # standard error of a difference of accuracies on 1,000 images).
    assert completion > from_scratch + 0.05, (completion, from_scratch)
    # The baseline is a new model: the target's weights are untouched and not shared.
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert not {p.data_ptr() for p in scratch.parameters()} & {p.data_ptr() for p in target.parameters()}


def test_wrong_image_shape_names_expected_and_got(trained_lenet):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box")
    with pytest.raises(ConfigError, match=r"expected shape \[N, 1, 28, 28\].*got \(2, 3, 32, 32\)"):
        victim.observe(torch.rand(2, 3, 32, 32))


def test_observe_is_seeded(trained_lenet, digits):
    x, _ = digits
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    noise = ss.defenses.GaussianNoise(sigma=0.5)
    state = torch.get_rng_state()
    a = ss.Victim(target, noise, threat="black_box", seed=0).observe(x)
    b = ss.Victim(target, noise, threat="black_box", seed=0).observe(x)
    c = ss.Victim(target, noise, threat="black_box", seed=1).observe(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("feature", "image", "dense"),
    [
        ((16, 8, 8), (1, 28, 28), True),  # LeNet ReLU2: a coarse map mixing a large receptive field
        ((8, 12, 12), (1, 28, 28), False),  # LeNet pool1: only half the resolution
        ((8, 24, 24), (1, 28, 28), False),  # LeNet conv1: nearly full resolution, local
        ((120,), (1, 28, 28), True),  # flat
        ((3072,), (3, 32, 32), True),  # flat, whatever the image
        ((8, 8, 8), (3, 32, 32), False),  # CEM's VGG bottleneck: coarse, but a colour image
        ((64, 16, 16), (3, 32, 32), False),  # ResNet-18's conv1 at 32×32
        ((128, 16, 16), (3, 32, 32), False),  # too many values for a dense first layer
    ],
)
def test_build_decoder_picks_dense_for_coarse_features_and_maps_to_the_image(feature, image, dense):
    decoder = ss.attacks.build_decoder(feature, image)
    is_dense = not any(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in decoder.modules())
    assert is_dense == dense
    assert decoder(torch.randn(2, *feature)).shape == (2, *image)
    forced = ss.attacks.build_decoder(feature, image, kind="conv" if dense else "dense")
    assert forced(torch.randn(2, *feature)).shape == (2, *image)
    with pytest.raises(ConfigError, match="decoder kind"):
        ss.attacks.build_decoder(feature, image, kind="mlp")


def test_rmle_restarts_images_whose_grey_start_has_no_gradient():
    # f(x) = ReLU(x - 0.6): every unit is off at the grey start 0.5, so its gradient there is zero.
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1.0
    z = torch.relu(target - 0.6)
    x_hat = rmle(lambda x: torch.relu(x - 0.6), z, (1, 8, 8), iters=300, lr=0.05, tv=0.0, l2=0.0)
    # Pixels restarted above 0.6 have a gradient and climb to 1; a stuck start would leave all of them at 0.5.
    assert (x_hat[target == 1] > 0.95).float().mean() > 0.2
    again = rmle(lambda x: torch.relu(x - 0.6), z, (1, 8, 8), iters=300, lr=0.05, tv=0.0, l2=0.0)
    assert torch.equal(x_hat, again)  # the restart is seeded


@pytest.mark.parametrize(("images", "width"), [(1, 64), (40, 64), (100, 128), (500, 512), (724, 512), (725, 1024),
                                               (50000, 1024)])
def test_dense_decoder_width_follows_the_auxiliary_set(images, width):
    assert ss.attacks.decoders.dense_width(images) == width


def test_inverse_network_on_a_tiny_auxiliary_set_warns_and_sizes_its_decoder(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victim = ss.Victim(target, threat="black_box", aux=mnist5k.holdout.take(40))
    with pytest.warns(UserWarning, match="only 40 images.*under-reports leakage"):
        attack = ss.InverseNetwork(steps=2, progress=False).fit(victim)
    assert attack.decoder_[1].out_features == 64  # Flatten, then the first dense layer


def test_query_free_view_holds_only_the_moments_of_the_traffic(trained_lenet, mnist5k):
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    traffic = mnist5k.test.take(600)  # more than one batch of the moment pass
    view = ss.Victim(target, threat="query_free", aux=mnist5k.holdout, traffic=traffic).view()
    with torch.no_grad():
        z = target.head(traffic.tensors()[0]).double()  # no defense: the features as sent
    moments = view.traffic
    assert moments.count == 600 and moments.dims == (0, 2, 3)
    torch.testing.assert_close(moments.mean, z.mean((0, 2, 3)).float())
    torch.testing.assert_close(moments.std, z.std((0, 2, 3), correction=0).float())
    assert not hasattr(ss.Victim(target, threat="black_box", traffic=traffic).view(), "traffic")
    assert ss.Victim(target, threat="query_free", aux=mnist5k.holdout).view().traffic is None


def test_traffic_never_holds_an_evaluated_image(mnist5k):
    for images in ("first_per_class", 25):
        evaluated, traffic = ss.data.evaluation_split(mnist5k.test, images, 2000)
        assert len(evaluated) in (10, 25) and len(traffic) == len(mnist5k.test) - len(evaluated)
        seen = {bytes(im.numpy()) for im in traffic.images}
        assert not any(bytes(im.numpy()) in seen for im in evaluated.images)


def test_query_free_shadow_matches_the_moments_of_the_traffic(trained_lenet, mnist5k, one_thread):
    # The mechanism, not a reconstruction gain: at this size (200 steps) whether matching helps rMLE depends on
    # the seed (+1.3 dB at seed 0, -2 to -4 dB at seeds 1-3 with 400 steps and 300 iterations).
    target = ss.split(trained_lenet, "conv1", input_shape=(1, 28, 28))
    _, traffic = ss.data.evaluation_split(mnist5k.test, "first_per_class", 1000)
    view = ss.Victim(target, threat="query_free", aux=mnist5k.holdout, traffic=traffic).view()
    x = traffic.tensors()[0]
    for seed in (0, 1):
        distance = {}
        for weight in (0.0, 3.0):
            attack = ss.QueryFreeInversion(steps=200, match_traffic=weight, search=None, seed=seed,
                                           progress=False).fit(view)
            with torch.no_grad():
                distance[weight] = _moment_distance(attack.shadow_heads_[0](x), view.traffic).item()
        assert distance[3.0] < 0.5 * distance[0.0], (seed, distance)


def test_query_free_auto_keeps_per_image_the_shadow_that_fits_the_observed_feature(trained_lenet, mnist5k, digits,
                                                                                   one_thread):
    x, _ = digits
    target = ss.split(trained_lenet, "conv1", input_shape=(1, 28, 28))
    _, traffic = ss.data.evaluation_split(mnist5k.test, "first_per_class", 1000)
    victim = ss.Victim(target, threat="query_free", aux=mnist5k.holdout, traffic=traffic)
    z = victim.observe(x)
    common = dict(steps=100, iters=60, search=None, seed=2, progress=False)
    auto = ss.QueryFreeInversion(match_traffic="auto", **common).fit(victim)
    assert auto.match_traffic_ == QF_TRAFFIC_WEIGHTS == (0.0, 3.0)
    chosen = auto.invert(z)
    # Each shadow is the one a single-weight attack trains, and each image is that attack's reconstruction
    # whose shadow features are closest to the observed feature (no defense: no noise in the residual).
    singles = [ss.QueryFreeInversion(match_traffic=w, **common).fit(victim) for w in QF_TRAFFIC_WEIGHTS]
    runs = [single.invert(z) for single in singles]
    with torch.no_grad():
        residual = torch.stack([(single.shadow_heads_[0](run) - z).pow(2).flatten(1).sum(1)
                                / z.pow(2).flatten(1).sum(1) for single, run in zip(singles, runs, strict=True)])
    for head, single in zip(auto.shadow_heads_, singles, strict=True):
        pairs = zip(head.parameters(), single.shadow_heads_[0].parameters(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    best = residual.argmin(0)
    assert torch.equal(auto.chosen_, best)
    torch.testing.assert_close(chosen, torch.stack(runs)[best, torch.arange(len(x))])
    torch.testing.assert_close(auto.residual_, residual.min(0).values)
    # The engine stores which shadow each image kept (measure's kept: rows) from kept().
    assert auto.kept()[0] == ("match_traffic=0", "match_traffic=3") and torch.equal(auto.kept()[1], best)
    assert singles[0].kept() is None
    # Without traffic there is nothing to match: He et al.'s shadow alone.
    alone = ss.QueryFreeInversion(match_traffic="auto", **common).fit(
        ss.Victim(target, threat="query_free", aux=mnist5k.holdout))
    assert alone.match_traffic_ == (0.0,) and len(alone.shadow_heads_) == 1 and alone.kept() is None


@pytest.mark.parametrize(("model", "shape"), [("lenet", (1, 28, 28)), ("cifar-cnn", (3, 32, 32))])
def test_he2019_diff_nets_send_what_the_head_sends_at_their_points(model, shape):
    net = ss.build_model(model, num_classes=10, input_shape=shape, seed=0)
    points = [p.name for p in ss.split_points(net, shape) if p.name in HE2019_DIFFERENT_HEADS]
    assert points == (["conv1", "ReLU2"] if model == "lenet" else ["conv11", "ReLU22", "ReLU32"])
    x = torch.rand(2, *shape)
    for point in points:
        target = ss.split(net, point, input_shape=shape)
        head = he2019_different_head(point, shape, target.feature_shape())
        assert head(x).shape == target.head(x).shape
        assert [_layer(m) for m in head] == HE2019_LAYERS[point]


def _layer(m: torch.nn.Module) -> tuple:
    if isinstance(m, torch.nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.padding[0])
    return ("pool", m.kernel_size) if isinstance(m, torch.nn.MaxPool2d) else (type(m).__name__,)


#: The layer lists of He et al.'s code (net.py: LeNetAlternativeconv1Archi2, LeNetAlternativeReLU2Archi2,
#: CIFAR10CNNAlternativeconv11Archi2, ...ReLU22Archi2, ...ReLU32Archi2), transcribed by hand.
HE2019_LAYERS = {
    "conv1": [("conv", 1, 8, 3, 0), ("conv", 8, 8, 3, 0)],
    "ReLU2": [("conv", 1, 8, 3, 0), ("conv", 8, 16, 3, 0), ("pool", 2), ("conv", 16, 16, 3, 0),
              ("conv", 16, 16, 3, 0), ("ReLU",)],
    "conv11": [("conv", 3, 16, 3, 1), ("conv", 16, 64, 3, 1)],
    "ReLU22": [("conv", 3, 64, 5, 2), ("ReLU",), ("pool", 2), ("conv", 64, 128, 5, 2), ("ReLU",)],
    "ReLU32": [("conv", 3, 64, 5, 2), ("ReLU",), ("pool", 2), ("conv", 64, 128, 5, 2), ("ReLU",), ("pool", 2),
               ("conv", 128, 128, 5, 2), ("ReLU",)],
}


def test_he2019_shadow_refuses_a_point_it_has_no_net_for_before_training(trained_lenet, mnist5k):
    victim = ss.Victim(ss.split(trained_lenet, "pool2", input_shape=(1, 28, 28)), threat="query_free",
                       aux=mnist5k.holdout)
    with pytest.raises(ConfigError, match="not for split point 'pool2'; use shadow 'different'"):
        ss.QueryFreeInversion(shadow="he2019", steps=10**6, progress=False).fit(victim)
    with pytest.raises(ConfigError, match="maps \\(1, 28, 28\\) images to \\(8, 24, 24\\), but this head sends"):
        he2019_different_head("conv1", (1, 28, 28), (16, 8, 8))
    with pytest.raises(ConfigError, match="shadow must be an nn.Module or one of 'same', 'different', 'he2019'"):
        ss.QueryFreeInversion(shadow="he2020")


BAD_PARAMETERS = [
    (ss.WhiteBoxInversion, "iters", 0), (ss.WhiteBoxInversion, "iters", 2.5), (ss.WhiteBoxInversion, "lr", 0.0),
    (ss.WhiteBoxInversion, "tv", -1.0), (ss.WhiteBoxInversion, "l2", float("nan")),
    (ss.WhiteBoxInversion, "seed", -1), (ss.WhiteBoxInversion, "progress", "yes"),
    (ss.InverseNetwork, "steps", 0), (ss.InverseNetwork, "batch_size", -4), (ss.InverseNetwork, "lr", -1e-3),
    (ss.InverseNetwork, "standardize", 1), (ss.InverseNetwork, "decoder", "dense"), (ss.InverseNetwork, "seed", 1.0),
    (ss.QueryFreeInversion, "shadow", "other"), (ss.QueryFreeInversion, "steps", 0),
    (ss.QueryFreeInversion, "batch_size", True), (ss.QueryFreeInversion, "lr", float("inf")),
    (ss.QueryFreeInversion, "match_traffic", -1.0), (ss.QueryFreeInversion, "match_traffic", float("nan")),
    (ss.QueryFreeInversion, "match_traffic", "best"),
    (ss.QueryFreeInversion, "iters", -5), (ss.QueryFreeInversion, "rmle_lr", 0), (ss.QueryFreeInversion, "tv", -0.1),
    (ss.QueryFreeInversion, "l2", -1), (ss.QueryFreeInversion, "seed", "0"),
    (ss.ModelReconstruction, "shadow", "same"), (ss.ModelReconstruction, "steps", 0),
    (ss.ModelReconstruction, "batch_size", 0), (ss.ModelReconstruction, "lr", -1.0),
    (ss.ModelReconstruction, "iters", 0), (ss.ModelReconstruction, "rmle_lr", 0.0),
    (ss.ModelReconstruction, "tv", -1.0), (ss.ModelReconstruction, "seed", -1),
    (ss.ModelReconstruction, "progress", 1),
    (ss.ModelCompletion, "n_labels", 0), (ss.ModelCompletion, "hidden", 0), (ss.ModelCompletion, "steps", -1),
    (ss.ModelCompletion, "lr", 0.0), (ss.ModelCompletion, "weight_decay", -1e-4), (ss.ModelCompletion, "seed", -2),
]


@pytest.mark.parametrize(("cls", "field", "value"), BAD_PARAMETERS,
                         ids=[f"{c.__name__}-{f}={v!r}" for c, f, v in BAD_PARAMETERS])
def test_attacks_reject_a_bad_parameter_when_built(cls, field, value):
    with pytest.raises(ConfigError, match=rf"^{field} must .*, got {re.escape(repr(value))}$"):
        cls(**{field: value})


def test_registry_names_say_what_the_attack_is_and_old_names_still_resolve():
    assert set(ss.attacks.ATTACKS) == {"rmle", "inverse_network", "shadow_head", "model_completion", "strongest",
                                      "unsplit", "prior_inversion", "model_reconstruction"}
    assert all(cls.name == name for name, cls in ss.attacks.ATTACKS.items())
    resolve = ss.attacks.attack_name
    assert [resolve(n) for n in ("white_box", "black_box", "query_free")] == ["rmle", "inverse_network", "shadow_head"]
    assert resolve("inverse_network") == "inverse_network" and resolve("nonsense") == "nonsense"
    assert set(ss.attacks.ATTACK_ALIASES.values()) <= set(ss.attacks.ATTACKS)


# Each attack, small, against a noisy defense (so that the attacker's own noise draws matter): (build, threat).
ATTACKS = {
    "rmle": (lambda seed: ss.WhiteBoxInversion(iters=5, seed=seed, progress=False), "white_box"),
    "inverse_network": (lambda seed: ss.InverseNetwork(steps=5, seed=seed, progress=False), "black_box"),
    "shadow_head": (lambda seed: ss.QueryFreeInversion(steps=5, iters=5, seed=seed, progress=False), "query_free"),
    "model_completion": (lambda seed: ss.ModelCompletion(steps=5, seed=seed, progress=False), "black_box"),
    "model_reconstruction": (lambda seed: ss.ModelReconstruction(steps=5, iters=5, seed=seed, progress=False),
                             "black_box"),
    "unsplit": (lambda seed: ss.attacks.UnSplit(rounds=2, input_iters=3, model_iters=3, restarts=2, seed=seed,
                                                progress=False), "architecture_only"),
    "prior_inversion": (lambda seed: ss.attacks.PriorInversion(
        latent=8, width=16, steps=20, batch_size=32, latent_iters=10, refine_iters=5, refine_tv=0.1,
        keep_refined="always", seed=seed, progress=False), "white_box"),
}


@pytest.fixture(scope="module")
def noisy_features(trained_lenet, mnist5k, digits):
    """Per threat model a victim behind Gaussian noise, and the features it sent for the evaluated digits."""
    target = ss.split(trained_lenet, "ReLU2", input_shape=(1, 28, 28))
    victims = {threat: ss.Victim(target, ss.defenses.GaussianNoise(sigma=0.5), threat=threat,
                                 aux=mnist5k.holdout.take(256)) for threat in ss.attacks.THREATS}
    return victims, victims["black_box"].observe(digits[0])


def _output(attack, z: torch.Tensor) -> torch.Tensor:
    return attack.predict(z) if isinstance(attack, ss.attacks.CompletionAttack) else attack.invert(z)


def _settings(attack) -> dict:
    """The attack's constructor settings: its attributes not ending in ``_`` (those are fitted)."""
    return {k: v for k, v in vars(attack).items() if not k.endswith("_")}


@pytest.mark.parametrize("name", ATTACKS)
def test_a_second_fit_starts_afresh_and_leaves_the_settings_alone(name, noisy_features, one_thread):
    build, threat = ATTACKS[name]
    victims, z = noisy_features
    attack = build(0)
    settings = _settings(attack)
    first = _output(attack.fit(victims[threat]), z)
    assert _settings(attack) == settings
    assert torch.equal(_output(attack, z), first)  # a second call draws from the seed too
    assert torch.equal(_output(attack.fit(victims[threat]), z), first)
    assert _settings(attack) == settings


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_draw_from_their_seed_and_leave_the_global_rng_alone(name, noisy_features, one_thread):
    build, threat = ATTACKS[name]
    victims, z = noisy_features
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = _output(build(0).fit(victims[threat]), z)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)  # another global state: the same reconstructions
    assert torch.equal(_output(build(0).fit(victims[threat]), z), first)
    assert not torch.equal(_output(build(1).fit(victims[threat]), z), first)


def test_a_given_decoder_is_trained_as_a_copy(noisy_features):
    victims, _ = noisy_features
    decoder = ss.attacks.build_decoder((16, 8, 8), (1, 28, 28), hidden=64)
    weights = [p.detach().clone() for p in decoder.parameters()]
    attack = ss.InverseNetwork(decoder, steps=3, progress=False).fit(victims["black_box"])
    assert attack.decoder is decoder and attack.decoder_ is not decoder
    assert all(torch.equal(a, b) for a, b in zip(weights, decoder.parameters(), strict=True))


def test_invert_before_fit_says_so():
    with pytest.raises(RuntimeError, match="InverseNetwork is not fitted: call fit"):
        ss.InverseNetwork().invert(torch.zeros(1, 16, 8, 8))
