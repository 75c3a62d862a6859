"""CEM: k-means, the hinged log-variance loss, where its gradient goes, the λ schedule, trainer integration."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitshield import Trainer, split
from splitshield.data import ImageSet
from splitshield.defenses import CEM, FeatureBound, GaussianNoise, NoPeek
from splitshield.defenses.cem import kmeans
from splitshield.errors import ConfigError
from splitshield.models import build_model


def tiny_set(n: int = 64) -> ImageSet:
    """Random 28×28 grey images with 4 labels (the CEM mechanics need no learnable task)."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    return ImageSet(images, torch.arange(n) % 4, ("a", "b", "c", "d"))


def mixture(seed: int = 0, per: int = 60, spread: float = 1.0):
    """Two classes, each a mixture of three well-separated Gaussian clusters in 6-D."""
    g = torch.Generator().manual_seed(seed)
    means = 20 * torch.randn(2, 3, 6, generator=g)
    points = means[:, :, None, :] + spread * torch.randn(2, 3, per, 6, generator=g)
    labels = torch.arange(2)[:, None, None].expand(2, 3, per)
    truth = torch.arange(6).view(2, 3, 1).expand(2, 3, per)
    return points.reshape(-1, 6), labels.reshape(-1), truth.reshape(-1)


def within_variance(points, labels, truth):
    return torch.stack([(points[truth == t] - points[truth == t].mean(0)).pow(2).mean() for t in truth.unique()]).mean()


def test_kmeans_recovers_separated_clusters():
    points, labels, truth = mixture()
    for c in (0, 1):
        _, assign = kmeans(points[labels == c], 3, generator=torch.Generator().manual_seed(1))
        t = truth[labels == c]
        # Each found cluster is exactly one true cluster (a permutation of the labels).
        pairs = {(int(a), int(b)) for a, b in zip(assign, t, strict=True)}
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


def test_cem_loss_lowers_within_cluster_variance_down_to_the_hinge():
    points, labels, truth = mixture(spread=1.0)
    z = points.clone().requires_grad_(True)
    sigma = 1.0
    cem = CEM(lam=1.0, sigma=sigma, k=3, tau=0.125)
    opt = torch.optim.SGD([z], lr=50.0)
    start = within_variance(z.detach(), labels, truth).item()
    for epoch in range(15):
        cem.fit_clusters(z.detach(), labels, seed=epoch)
        for _ in range(10):
            loss = cem.cem_loss(z, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    end = within_variance(z.detach(), labels, truth).item()
    assert start == pytest.approx(1.0, rel=0.15)
    assert end < 0.5 * start
    # The hinge stops the shrinking near tau*sigma^2 (log(v + gamma) = log(tau sigma^2 + gamma)): not far below.
    assert end > 0.5 * cem.tau * sigma**2
    assert cem.cem_loss(z.detach(), labels).item() < 0.05


def test_cem_per_dimension_variance_hinges_each_dimension():
    # One cluster per class, all of its spread in one of 4 dimensions: that dimension's variance is 4x the
    # hinge and the dimension mean is exactly at it. The pooled loss is then 0; the per-dimension loss is
    # the mean over dimensions of the hinged logs, (log(4h + γ) − log(h + γ)) / 4 with h = τσ².
    tau, sigma, gamma = 0.125, 2.0, 0.01
    h = tau * sigma**2
    spread = torch.tensor([-1.0, 1.0]).repeat(8) * (4 * h) ** 0.5  # 16 samples with variance exactly 4h
    z = torch.zeros(32, 4)
    z[:16, 0] = spread
    z[16:, 2] = spread + 5
    labels = torch.arange(2).repeat_interleave(16)
    pooled = CEM(lam=1, sigma=sigma, k=1, tau=tau, gamma=gamma)
    per_dim = CEM(lam=1, sigma=sigma, k=1, tau=tau, gamma=gamma, variance="per_dim")
    for cem in (pooled, per_dim):
        cem.fit_clusters(z, labels)
    expected = (torch.log(torch.tensor(4 * h + gamma)) - torch.log(torch.tensor(h + gamma))).item() / 4
    assert pooled.cem_loss(z, labels).item() == pytest.approx(0.0, abs=1e-6)
    # Two classes, weight 1 each, divided by the two classes present.
    assert per_dim.cem_loss(z, labels).item() == pytest.approx(expected, rel=1e-5)
    # With a single dimension both are the same loss.
    one = z[:, :1]
    for cem in (pooled, per_dim):
        cem.fit_clusters(one, labels)
    assert per_dim.cem_loss(one, labels).item() == pytest.approx(pooled.cem_loss(one, labels).item(), rel=1e-6)


def test_blended_variance_gradient_matches_the_closed_form():
    # With v = a·v_b + (1 − a)·v̄ and a = 10·n_j/(w·N_c) < 0.99, the n_j and w cancel: each sample's gradient
    # is 20·(z − μ) / (C_B·N_c·D·(v + γ)), C_B the classes in the batch. So the batch *sum* pushes B times as
    # hard as one sample, and a class of N_c samples damps it by 1/N_c: CEM's strength relative to a
    # mean-over-batch loss is λ·B/N_c.
    points, labels, _ = mixture(per=60)
    cem = CEM(lam=1.0, sigma=0.1, k=3)
    cem.fit_clusters(points, labels)
    cem.samples_per_class = 5000.0  # a CIFAR-10-sized class: a stays far below its 0.99 cap
    batch = torch.cat([torch.arange(0, 7), torch.arange(180, 185)])  # uneven: n_j differs between clusters
    z = points[batch].clone().requires_grad_(True)
    y = labels[batch]
    cem.cem_loss(z, y).backward()
    with torch.no_grad():
        j = torch.cdist(z, cem.centroids.flatten(0, 1)).view(len(y), -1, 3)[torch.arange(len(y)), y].argmin(1)
        mu = cem.centroids[y, j]
        cluster = y * 3 + j
        d = z.shape[1]
        sq = (z - mu).pow(2).mean(1)
        count = torch.bincount(cluster, minlength=6).float()
        v_b = torch.zeros(6).index_add(0, cluster, sq) / count.clamp_min(1)
        w = cem.weights.flatten()
        a = 10 * count / (w * cem.samples_per_class)
        v = a * v_b + (1 - a) * cem.variances.flatten()
        expected = 20 * (z - mu) / (2 * cem.samples_per_class * d * (v[cluster] + cem.gamma))[:, None]
    assert (a[count > 0] < 0.99).all()
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-9)


def test_cem_gradient_reaches_the_head_only():
    target = split(build_model("lenet", num_classes=4), "ReLU2", input_shape=(1, 28, 28))
    x, y = tiny_set(32).tensors()
    cem = CEM(lam=16, sigma=0.001, k=2)
    with torch.no_grad():
        cem.fit_clusters(target.head(x), y)
    z = target.head(x)
    logits = target.tail(z)
    loss = cem.regularizer(x, y, z, z, logits)
    assert loss is not None and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.head.parameters())
    assert all(p.grad is None for p in target.tail.parameters())


def test_lambda_schedule_follows_the_learning_rate():
    cem = CEM(lam=8, sigma=0.1)
    assert cem.schedule_factor() == 1.0  # no optimiser yet
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    cem.on_epoch_start(SimpleNamespace(optimizer=opt))  # the trainer's hook, also called on a resumed run
    assert cem.schedule_factor() == pytest.approx(0.02)  # 0.001 / 0.05, as the code's first LR stage
    opt.param_groups[0]["lr"] = 1e-3
    assert cem.schedule_factor() == pytest.approx(1.0)
    opt.param_groups[0]["lr"] = 4e-4
    assert cem.schedule_factor() == 1.0


def test_cem_trains_on_top_of_noise_and_reads_sigma_from_it():
    target = split(build_model("lenet", num_classes=4), "ReLU2", input_shape=(1, 28, 28))
    cem = CEM(lam=16, k=2)
    defense = FeatureBound("tanh") + GaussianNoise(0.2) + cem
    trainer = Trainer(target, defense, epochs=2, batch_size=16, progress=False)
    trainer.fit(tiny_set(64))
    assert cem.hinge_sigma == pytest.approx(0.2)
    assert cem.centroids.shape == (4, 2, 16 * 8 * 8)
    assert cem.centroids.abs().max() <= 1  # clustered the bounded (tanh) feature, as the tail's input
    assert torch.allclose(cem.weights.sum(1), torch.ones(4))


def test_cem_first_epoch_adds_no_loss():
    z = torch.randn(4, 3)
    assert CEM(lam=16, sigma=0.1).regularizer(None, torch.zeros(4, dtype=torch.long), z, z, None) is None


def test_cem_errors_are_clear():
    points, labels, _ = mixture(per=1)
    with pytest.raises(ConfigError, match="k=5 is larger than class 0's 3 training samples"):
        CEM(lam=8, sigma=0.1, k=5).fit_clusters(points, labels)
    with pytest.raises(ConfigError, match="sigma must be > 0"):
        CEM(sigma=0.0)
    target = split(build_model("lenet", num_classes=4), "ReLU2", input_shape=(1, 28, 28))
    trainer = Trainer(target, NoPeek(0.1) + CEM(lam=8), epochs=1, progress=False)
    with pytest.raises(ConfigError, match=r"defense.parts\[1\] \(cem\): has no noise level sigma"):
        trainer.fit(tiny_set(16))
    assert trainer.epoch == 0  # refused before any training, not after an epoch


class _RecordingCEM(CEM):
    """Keeps what it was asked to cluster."""

    def fit_clusters(self, features, labels, seed=None):
        self.seen = (features.clone(), labels.clone())
        super().fit_clusters(features, labels, seed)


def test_epoch_features_are_the_training_sets_clean_features_without_an_extra_pass():
    data = tiny_set(64)
    seen, images_through_head = {}, {}
    for mode in ("epoch", "refresh"):
        target = split(build_model("lenet", num_classes=4), "ReLU2", input_shape=(1, 28, 28))
        cem = _RecordingCEM(lam=16, k=2, cluster_features=mode)
        head_calls = []
        target.head.register_forward_hook(lambda module, args, out, calls=head_calls: calls.append(len(args[0])))
        # A vanishing learning rate keeps the weights, so both modes must see the same features.
        Trainer(target, FeatureBound("tanh") + GaussianNoise(0.2) + cem, epochs=1, batch_size=16, lr=1e-12,
                progress=False).fit(data)
        features, labels = cem.seen
        assert len(features) == 64 and torch.equal(torch.bincount(labels), torch.bincount(data.labels))
        seen[mode] = torch.stack([features[labels == c].mean(0) for c in range(4)])
        images_through_head[mode] = sum(head_calls)
    assert torch.allclose(seen["epoch"], seen["refresh"], atol=1e-5)
    assert images_through_head["refresh"] - images_through_head["epoch"] == 64  # the refresh is a second pass
    with pytest.raises(ConfigError, match="cluster_features must be one of epoch, refresh"):
        CEM(cluster_features="batch")
    with pytest.raises(ConfigError, match="variance must be one of mean, per_dim"):
        CEM(variance="diag")
