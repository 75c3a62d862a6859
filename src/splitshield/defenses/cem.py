"""CEM: Conditional Entropy Maximisation (Xia et al., "Theoretical Insights in Model Inversion Robustness
and Conditional Entropy Maximization for Collaborative Inference Systems", CVPR 2025; code
``xiasong0501/CEM``, ``model_training_paral_pruning.py``; ALGORITHMS §B.2), a plug-in on any base defense.

With noise of variance σ² on the feature ẑ, H(x|z) >= const − ½·Σⱼ πⱼ log det(I + Σⱼ/σ²) when ẑ is a
Gaussian mixture: shrinking each cluster's covariance relative to σ² raises the floor on any inversion's
MSE. As the authors' code:

1. at the end of every epoch, the clean features of the whole training set (after the deterministic
   ``clean`` part of the defenses composed before CEM, e.g. a bound) are clustered **per class** by
   k-means in torch (k-means++ the first time, warm-started after, at most 50 Lloyd iterations); each
   cluster keeps its centroid μ, weight w (its share of the class) and variance v̄ (mean squared
   distance to μ over samples and dimensions). The authors' code recomputes those features in a fresh
   pass over the training set with the head in eval mode (``cluster_features="refresh"``); by default
   CEM instead clusters the features the head already produced for the epoch's training batches
   (``"epoch"``), which saves that extra forward pass (the training-time ratio with and without CEM is a
   column of the paired comparisons of ``splitshield report``; see the generated results page,
   ``benchmarks/results/README.md``). They lag the
   final weights by up to an epoch and, with batch norm, use batch statistics; the clustering is
   warm-started and refreshed every epoch either way;
2. per batch (from the second epoch on), each clean feature goes to the nearest centroid of its own
   class; each cluster present gets v = a·v_b + (1 − a)·v̄ with its batch variance v_b and
   a = min(0.99, 10·n_j / (w·N_c)) (N_c = |train| / #classes), and pays
   ℓ = w·ReLU(log(v + γ) − log(τσ² + γ)); L_C = Σ ℓ / #classes in the batch. With
   ``variance="per_dim"`` v, v̄ and the hinge are taken per feature dimension and ℓ averages the hinged
   terms over dimensions, like the authors' older ``model_training.py`` (which hinges at a fixed 0.001): a
   diagonal rather than isotropic surrogate of log det(I + Σⱼ/σ²), so that a few high-variance
   dimensions cannot hide behind a small mean;
3. the loss added is λ·s·L_C with s = 1 when the learning rate is < 4.1e-4, else 0.001/lr (the code's
   schedule), read from the optimiser at every step. Under the Trainer's default protocol (Adam at a constant
   1e-3) s = 1 throughout; under ``protocol="cem_official"`` (the official SGD schedule from lr 0.05) s is
   0.02, 0.1, 0.5, then 1, as in the official run. L_C depends only on the clean feature, so its gradient
   reaches the edge head (and edge-side defense parameters) only, never the cloud tail: the code's "inject
   into the encoder's gradient". With plain gradients (SGD's weight decay is added after either), adding
   λ·s·L_C to the loss is the same as the code's ``g += λ·s·∇L_C``.

σ is taken from the noise defenses composed before CEM (their variances add) unless given; for a base
without noise, pass ``sigma`` explicitly (it then only sets the hinge τσ²).

**What λ means.** While a < 0.99, a cluster's weight w and batch count n_j cancel out of the blend: each
sample's gradient is 20·(z − μ) / (C_B·N_c·D·(v + γ)), with C_B the classes present in the batch. L_C sums
these over the batch while the task loss averages, so CEM pulls on the head λ·B/N_c times as hard as a
per-sample mean would: the same λ is twice as strong at batch 128 as at 64, and ten times as strong on a
tenth of the training set. The authors' λ = 8 or 16 was tuned at batch 128 with N_c = 5000 (CIFAR-10);
full MNIST (N_c = 4500) at batch 128 is the closest match. What λ buys against the inverse-network attack,
and at what accuracy, is on the generated results page, ``benchmarks/results/README.md``. CEM also shrinks
the feature, and a smaller scale alone slows a decoder fed raw (unstandardised) features, so such a
decoder overstates the protection.

**Resuming.** The clustering and the hinge's σ are training state, exported by :meth:`CEM.training_state`
into checkpoints to resume training from; the k-means++ draws come from a generator seeded with
``seed + epoch``, so a resumed run clusters as an uninterrupted one.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ._params import choice, non_negative, positive, positive_int
from .base import Compose, Defense
from .noise import noise_std

if TYPE_CHECKING:
    from ..train import Trainer


def kmeans(points: torch.Tensor, k: int, init: torch.Tensor | None = None, iters: int = 50,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``points`` [n, d]: (centroids [k, d], assignment [n]).

    ``init`` warm-starts from given centroids; otherwise k-means++ seeding with ``generator``.
    An emptied cluster keeps its previous centroid.
    """
    n = points.shape[0]
    if k > n:
        raise ConfigError(f"k={k} clusters is larger than the {n} samples to cluster; lower k")
    if init is None:
        first = torch.randint(n, (1,), generator=generator).item()
        centroids = points[first : first + 1]
        for _ in range(1, k):
            d2 = torch.cdist(points, centroids).pow(2).min(1).values
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).item()
            centroids = torch.cat([centroids, points[nxt : nxt + 1]])
    else:
        centroids = init.clone()
    assign = torch.zeros(n, dtype=torch.long, device=points.device)
    for it in range(iters):
        new_assign = torch.cdist(points, centroids).argmin(1)
        if it > 0 and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return centroids, assign


class CEM(Defense):
    """Conditional-entropy maximisation loss on top of a base defense (put it last in the composition).

    Parameters
    ----------
    lam:
        λ >= 0 (the paper uses 8 or 16; 0 disables CEM).
    sigma:
        Noise standard deviation for the hinge τσ²; ``None`` reads it from the noise defenses before CEM.
    k:
        Clusters per class (5 as the code's ``*_sgm`` models).
    tau, gamma:
        The code's ``var_threshold`` (0.125) and log offset (0.01).
    iters:
        Maximum Lloyd iterations per epoch.
    cluster_features:
        ``"epoch"`` (default): cluster the features collected from the epoch's training batches;
        ``"refresh"``: a fresh eval-mode pass over the training set at each epoch end, as the code.
    variance:
        ``"mean"`` (default, the current code): one variance per cluster, averaged over dimensions;
        ``"per_dim"``: one per cluster and dimension, each hinged at τσ².
    seed:
        Seeds the k-means++ initialisation.
    """

    name = "cem"

    def __init__(self, lam: float = 16.0, sigma: float | None = None, k: int = 5, tau: float = 0.125,
                 gamma: float = 0.01, iters: int = 50, cluster_features: str = "epoch", variance: str = "mean",
                 seed: int = 0):
        super().__init__()
        self.lam = non_negative("lam", lam)
        self.sigma = positive("sigma", sigma) if sigma is not None else None
        self.k = positive_int("k", k)
        self.tau = positive("tau", tau)
        self.gamma = positive("gamma", gamma)
        self.iters = positive_int("iters", iters)
        self.cluster_features = choice("cluster_features", cluster_features, ("epoch", "refresh"))
        self.variance = choice("variance", variance, ("mean", "per_dim"))
        self.seed = int(seed)
        # Training-only state, deliberately not buffers: it is not deployed and its shape is data-dependent.
        self.centroids: torch.Tensor | None = None  # [classes, k, D]
        self.weights: torch.Tensor | None = None  # [classes, k]
        self.variances: torch.Tensor | None = None  # [classes, k, 1], or [classes, k, D] per dimension
        self.samples_per_class = 0.0
        self.hinge_sigma: float | None = self.sigma
        self._optimizer_ref: weakref.ref | None = None  # a weak reference survives deepcopy as itself
        self._epoch_features: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- epoch start and end: the schedule's optimiser, the clustering -------------------------

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._optimizer_ref = weakref.ref(trainer.optimizer)  # the λ schedule reads its learning rate

    def on_epoch_end(self, trainer: Trainer) -> None:
        if not self.lam:
            return
        before = _parts_before(trainer.defense, self)
        if self.hinge_sigma is None:
            self.hinge_sigma = noise_std(Compose(*before), trainer.target.feature_shape()) if before else 0.0
            if not self.hinge_sigma > 0:
                raise ConfigError("CEM needs the noise level: compose it after a noise defense "
                                  "(e.g. GaussianNoise(0.1) + CEM()) or pass sigma=")
        if self.cluster_features == "epoch" and self._epoch_features:
            features = torch.cat([z for z, _ in self._epoch_features])
            labels = torch.cat([y for _, y in self._epoch_features])
        else:
            features, labels = self._clean_features(trainer, before)
        self._epoch_features = []
        self.fit_clusters(features, labels, seed=self.seed + trainer.epoch)

    @torch.no_grad()
    def fit_clusters(self, features: torch.Tensor, labels: torch.Tensor, seed: int | None = None) -> None:
        """Per-class k-means of clean ``features`` [N, ...] with ``labels`` [N] (warm-started when possible)."""
        features = features.flatten(1)
        classes = int(labels.max()) + 1
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        warm = self.centroids is not None and self.centroids.shape == (classes, self.k, features.shape[1])
        cents, weights, variances = [], [], []
        for c in range(classes):
            zc = features[labels == c]
            if len(zc) < self.k:
                raise ConfigError(f"CEM k={self.k} is larger than class {c}'s {len(zc)} training samples; lower k")
            mu, assign = kmeans(zc, self.k, init=self.centroids[c] if warm else None, iters=self.iters, generator=g)
            counts = torch.bincount(assign, minlength=self.k).to(zc.dtype)
            sq = self._squared_deviation(zc, mu[assign])
            cents.append(mu)
            weights.append(counts / len(zc))
            variances.append(torch.zeros(self.k, sq.shape[1], dtype=zc.dtype, device=zc.device)
                             .index_add_(0, assign, sq) / counts.clamp_min(1)[:, None])
        self.centroids, self.weights, self.variances = torch.stack(cents), torch.stack(weights), torch.stack(variances)
        self.samples_per_class = len(features) / classes

    @torch.no_grad()
    def _clean_features(self, trainer: Trainer, before: list[Defense]) -> tuple[torch.Tensor, torch.Tensor]:
        head = trainer.target.head
        mode = head.training
        head.eval()
        feats, labels = [], []
        for x, y in trainer.train_data.batches(1000, device=trainer.device):
            z = head(x)
            for d in before:
                z = d.clean(z)
            feats.append(z.flatten(1))
            labels.append(y)
        head.train(mode)
        return torch.cat(feats), torch.cat(labels)

    def _squared_deviation(self, flat: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        """[n, D] features and their centroids -> [n, 1] mean over dimensions, or [n, D] per dimension."""
        sq = (flat - centre).pow(2)
        return sq if self.variance == "per_dim" else sq.mean(1, keepdim=True)

    # ---- checkpoints: the training state ---------------------------------------------------------

    def training_state(self) -> dict[str, torch.Tensor]:
        """The clustering once fitted (``centroids``, ``weights``, ``variances`` with their shapes above, and
        ``samples_per_class``) and ``hinge_sigma`` once known; the scalars as 0-d float64 tensors.

        The buffer of the epoch's features is not part of it: :meth:`on_epoch_end` empties it, and
        checkpoints are written between epochs.
        """
        state: dict[str, torch.Tensor] = {}
        if self.centroids is not None:
            state.update(centroids=self.centroids, weights=self.weights, variances=self.variances,
                         samples_per_class=torch.tensor(self.samples_per_class, dtype=torch.float64))
        if self.hinge_sigma is not None:
            state["hinge_sigma"] = torch.tensor(self.hinge_sigma, dtype=torch.float64)
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.centroids, self.weights, self.variances = (state.get(k) for k in ("centroids", "weights", "variances"))
        self.samples_per_class = float(state["samples_per_class"]) if "samples_per_class" in state else 0.0
        self.hinge_sigma = float(state["hinge_sigma"]) if "hinge_sigma" in state else self.sigma

    # ---- per batch: the loss --------------------------------------------------------------------

    def schedule_factor(self) -> float:
        """s = 1 when the optimiser's current learning rate is < 4.1e-4, else 0.001/lr (the CEM code's schedule;
        1 before a trainer has started an epoch)."""
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None:
            return 1.0
        lr = optimizer.param_groups[0]["lr"]
        return 1.0 if lr < 4.1e-4 else 0.001 / lr

    def cem_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_C of the batch of clean features ``z`` [B, ...] with labels ``y`` [B] (needs a clustering)."""
        assert self.centroids is not None and self.hinge_sigma is not None
        flat = z.flatten(1)
        k = self.k
        with torch.no_grad():  # the assignment is a constant of the loss
            to_own = torch.cdist(flat, self.centroids.flatten(0, 1)).view(len(y), -1, k)  # [B, classes, k]
            j = to_own[torch.arange(len(y), device=z.device), y].argmin(1)
        cluster = y * k + j
        sq = self._squared_deviation(flat, self.centroids[y, j])  # [B, 1 or D]
        total = self.centroids.shape[0] * k
        count = torch.bincount(cluster, minlength=total).to(flat.dtype)
        v_batch = (torch.zeros(total, sq.shape[1], dtype=flat.dtype, device=z.device).index_add(0, cluster, sq)
                   / count.clamp_min(1)[:, None])
        w = self.weights.flatten()
        a = (10.0 * count / (w * self.samples_per_class).clamp_min(1e-12)).clamp(max=0.99)[:, None]
        v = a * v_batch + (1 - a) * self.variances.flatten(0, 1)
        hinge = torch.log(torch.tensor(self.tau * self.hinge_sigma**2 + self.gamma, dtype=flat.dtype))
        terms = w * torch.relu(torch.log(v + self.gamma) - hinge).mean(1)
        present = count > 0
        return terms[present].sum() / torch.unique(y).numel()

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        if self.lam and self.training and self.cluster_features == "epoch":
            self._epoch_features.append((z.detach().flatten(1), y.detach()))
        if not self.lam or self.centroids is None:
            return None  # the first epoch has no clustering yet, as in the code
        return self.lam * self.schedule_factor() * self.cem_loss(z, y)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lam": self.lam, "sigma": self.sigma, "k": self.k, "tau": self.tau,
                "gamma": self.gamma, "iters": self.iters, "cluster_features": self.cluster_features,
                "variance": self.variance, "seed": self.seed}


def _parts_before(root: Defense, me: Defense) -> list[Defense]:
    """The defenses applied before ``me`` in ``root`` (a Compose or ``me`` itself)."""
    if not isinstance(root, Compose):
        return []
    before: list[Defense] = []
    for part in root.parts:
        if part is me:
            return before
        before.append(part)
    return before
