"""Model completion: label leakage from features (passive model completion, Fu et al., USENIX Sec. 2022).

A curious cloud that holds a few labelled examples of its own — sent through the device like any other
input — fits a classifier on their features and then labels every user's feature. Its accuracy, against
the tail's own accuracy and a from-scratch baseline, measures how much task information the features give
away to anyone, not just to the tail's owner.

Two ways to fit that classifier (``method``):

* ``"supervised"`` (the default, what every existing spec ran): a small MLP fitted by full-batch Adam on the
  features of the labelled images alone — a probe, weaker than the published attack.
* ``"mixmatch"``: Fu et al.'s passive model completion as published — their head (BatchNorm → ReLU → Linear,
  the last Linear's weights initialised to ones; see :func:`fu_head`) trained by their MixMatch variant, on
  the labelled images and, unlabelled, on every other auxiliary image the attacker holds (see
  :func:`_mixmatch`). The labelled images' features are queried once (one draw of a noisy defense, as in the
  supervised probe); the unlabelled ones' a batch per step, each query a fresh draw.

Fu et al. also fine-tune the bottom model, the part the attacker holds. In a two-part split that is none:
the device's head is not the attacker's to train, so the classifier sees the features as the device sends
them (defended, under an adaptive threat model). In a U-shaped split (``relu..layer3.1``) the cloud holds the
middle of the model (``view.cloud``) and the device keeps the classifier: the attacker's classifier is then
a copy of that middle part followed by the head — frozen under the supervised probe, which fits the head on
the middle's output; under mixmatch fine-tuned with the head, as Fu et al. train their bottom model, or, with
``fine_tune=False``, frozen too. Frozen is the stronger attack on a middle trained for the task: fine-tuning
it on 40 labels and guessed labels wears away what it learned.

The baseline (:func:`train_from_scratch`) is what the same labelled images are worth without the device:
the whole model's architecture, freshly initialised, trained on them with the attack's own optimiser and
budget (InfoScissors' "training from scratch with 40 labels"). Completion accuracy far above it means
the features, not the labels, taught the attacker the task.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ._params import flag, non_negative, non_negative_int, one_of, optional, positive, positive_int
from .base import CompletionAttack, VictimView, seeded

METHODS = ("supervised", "mixmatch")
#: Per method, the ``lr`` and ``weight_decay`` used when they are not set: the supervised probe's own, and
#: Fu et al.'s (Adam at 2e-3 and no weight decay; the EMA step shrinks the live weights instead).
DEFAULT_LR = {"supervised": 1e-3, "mixmatch": 2e-3}
DEFAULT_WEIGHT_DECAY = {"supervised": 1e-4, "mixmatch": 0.0}
#: Fu et al.'s MixMatch constants (their code's defaults, those of MixMatch for CIFAR-10): sharpening
#: temperature, Beta(alpha, alpha) of mixup, the unlabelled loss's weight after its ramp-up, the EMA's decay
#: and the factor of the learning rate by which the EMA step shrinks the live weights.
SHARPEN_T, MIXUP_ALPHA, LAMBDA_U, EMA_DECAY, EMA_SHRINK = 0.8, 0.75, 50.0, 0.999, 0.02


class ModelCompletion(CompletionAttack):
    """Label the features with a classifier fitted on ``n_labels`` labelled auxiliary images, balanced per class.

    Parameters
    ----------
    n_labels:
        How many labelled images the attacker has (> 0; InfoScissors and Fu et al. use 40 on CIFAR-10):
        ``n_labels // classes`` per class, at least one.
    hidden:
        Width of the hidden layers (> 0): the supervised MLP's one, or mixmatch's ``layers - 1`` (none at
        ``layers = 1``, where ``hidden`` is unused).
    steps:
        Optimiser steps (> 0). Supervised: full-batch steps. Mixmatch: steps of ``batch_size`` labelled plus
        ``batch_size`` unlabelled features. One default for both (500, the probe's, which keeps existing specs'
        results and the audit's minimum as they were): for mixmatch a CPU-sized budget, about 2 % of Fu et al.'s
        CIFAR-10 run (25 epochs of 1,024 steps), at which its EMA still holds 0.999^500 ≈ 61 % of the initial
        weights; its advantage over the probe takes a few thousand steps — set ``steps`` with ``method``.
    lr, weight_decay:
        Adam's learning rate (> 0) and weight decay (>= 0); ``None``: the method's own (supervised 1e-3 and
        1e-4, mixmatch Fu et al.'s 2e-3 and 0).
    method:
        ``"supervised"`` or ``"mixmatch"`` (see the module docstring).
    layers:
        Mixmatch only: Fu et al.'s ``num_layer`` (>= 1), the head's Linear layers. ``layers - 1`` steps
        BN → ReLU → Linear(→ hidden), then BN → ReLU → Linear(→ classes). Fu et al.'s hidden layers are as wide
        as the features; here they are ``hidden`` wide, which bounds the head on wide feature maps.
    batch_size:
        Mixmatch only: labelled (and as many unlabelled) features per step, B (>= 2; Fu et al.'s 16).
    fine_tune:
        Mixmatch only, and only in a U-shaped split (a two-part split has no part of the model on the cloud):
        train the attacker's copy of the cloud's part with the head, as Fu et al. fine-tune their bottom model
        (``True``), or keep it frozen in eval mode and train the head on its output (``False``).
    seed:
        Seeds the choice of the labelled images, the oracle's noise, the classifier's initialisation and
        every draw of the training (batches, mixup).
    progress:
        Show a progress bar over the training steps.

    Fitted attributes
    -----------------
    classifier_:
        The trained classifier: features [B, *feature_shape] -> logits [B, classes], in eval mode, built afresh
        by every ``fit`` (in a U-shaped split it begins with the attacker's copy of the cloud's part); with
        mixmatch, the exponential moving average of the trained weights.
    labelled_:
        The attacker's labelled images [n, C, H, W] in [0, 1] and their labels [n] (the baseline's data).
    """

    threats = ("black_box", "white_box")
    name = "model_completion"

    def __init__(self, n_labels: int = 40, hidden: int = 128, steps: int = 500, lr: float | None = None,
                 weight_decay: float | None = None, seed: int = 0, progress: bool = True,
                 method: Literal["supervised", "mixmatch"] = "supervised", layers: int = 1, batch_size: int = 16,
                 fine_tune: bool = True):
        self.method = one_of("method", method, METHODS)
        self.n_labels, self.hidden = positive_int("n_labels", n_labels), positive_int("hidden", hidden)
        self.steps = positive_int("steps", steps)
        self.lr = optional(positive, "lr", lr) or DEFAULT_LR[self.method]
        weight_decay = optional(non_negative, "weight_decay", weight_decay)
        self.weight_decay = DEFAULT_WEIGHT_DECAY[self.method] if weight_decay is None else weight_decay
        self.layers, self.batch_size = positive_int("layers", layers), positive_int("batch_size", batch_size)
        if self.batch_size < 2:  # each forward pass normalises its chunk by the chunk's own BatchNorm statistics
            raise ConfigError(f"batch_size must be an integer >= 2 (BatchNorm needs two features), got {batch_size!r}")
        self.fine_tune = flag("fine_tune", fine_tune)
        if self.method == "supervised" and (self.layers, self.batch_size, self.fine_tune) != (1, 16, True):
            field = "layers" if self.layers != 1 else "batch_size" if self.batch_size != 16 else "fine_tune"
            raise ConfigError(f"{field} is a parameter of method 'mixmatch' (the supervised MLP has one hidden "
                              f"layer, trains full-batch and never trains the cloud's part), got "
                              f"{field}={getattr(self, field)!r}; set method: mixmatch or remove it")
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: VictimView) -> ModelCompletion:
        aux = view.require_aux(type(self).__name__)
        g = torch.Generator().manual_seed(self.seed)
        per_class = max(1, self.n_labels // aux.num_classes)
        picks = []
        for c in range(aux.num_classes):
            idx = (aux.labels == c).nonzero().flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        labelled = torch.cat(picks)
        x, y = aux.subset(labelled).tensors()
        self.labelled_ = (x, y)
        z = view.query(x).cpu()
        # The cloud's part of a U-shaped split, on the CPU like the features: what the attacker's classifier starts
        # from (nothing in a two-part split).
        bottom = [] if view.cloud is None else [copy.deepcopy(view.cloud).cpu()]
        with torch.no_grad():  # the frozen copy is in eval mode
            r = nn.Sequential(*bottom, nn.Flatten())(z)
        if self.method == "supervised":
            with seeded(self.seed):  # the initialisation, whatever noise the queries drew
                classifier = nn.Sequential(nn.LayerNorm(r.shape[1]), nn.Linear(r.shape[1], self.hidden), nn.ReLU(),
                                           nn.Linear(self.hidden, aux.num_classes))
            _train(classifier, r, y, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay,
                   desc="model completion", progress=self.progress)
            self.classifier_ = nn.Sequential(*bottom, nn.Flatten(), classifier).eval()
            return self
        rest = torch.ones(len(aux), dtype=torch.bool)
        rest[labelled] = False
        rest = rest.nonzero().flatten()
        if len(rest) == 0:
            raise ConfigError(f"method 'mixmatch' needs unlabelled auxiliary images: all {len(aux)} of the "
                              f"attacker's images are among its n_labels={self.n_labels} labelled ones")

        # Fu et al. fine-tune the bottom model with the head; frozen, the cloud's part stays as the view copied it
        # (eval mode, no gradients) and the head trains on its output.
        trained, frozen = ([*bottom, nn.Flatten()], []) if self.fine_tune else ([], [*bottom, nn.Flatten()])
        for part in trained:
            part.requires_grad_(True)
        through_frozen = nn.Sequential(*frozen)

        def unlabelled(index: torch.Tensor) -> torch.Tensor:
            # What the trained modules take for the unlabelled images [B, ...]: their features, queried like the
            # labelled ones, B at a time, through the frozen part if there is one.
            with torch.no_grad():
                return through_frozen(view.query(aux.subset(rest[index]).tensors()[0]).cpu())

        with seeded(self.seed):
            head = fu_head(r.shape[1], aux.num_classes, layers=self.layers, hidden=self.hidden)
        average = _mixmatch(nn.Sequential(*trained, head), z if self.fine_tune else r, y, aux.num_classes,
                            unlabelled, len(rest), steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                            weight_decay=self.weight_decay, generator=g, progress=self.progress)
        self.classifier_ = nn.Sequential(*frozen, *average).eval()
        return self

    def train_from_scratch(self, architecture: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
        """The baseline: ``architecture`` (images -> logits; its weights are re-initialised, from ``seed``) trained
        on the attacker's labelled images with the attack's optimiser and steps; returned in eval mode."""
        from ..models.split import fresh_copy

        self._check_fitted()
        x, y = self.labelled_
        with seeded(self.seed):
            model = fresh_copy(architecture).to(device).train().requires_grad_(True)
        return _train(model, x.to(device), y.to(device), steps=self.steps, lr=self.lr,
                      weight_decay=self.weight_decay, desc="from scratch", progress=self.progress)

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for features ``z`` [B, ...]."""
        self._check_fitted()
        return self.classifier_(z.cpu())

    def config(self) -> dict:
        config = {"name": self.name, "n_labels": self.n_labels, "hidden": self.hidden, "steps": self.steps,
                  "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed}
        # The method's keys only for mixmatch: a supervised attack's config is what it was before methods.
        if self.method != "supervised":
            config.update(method=self.method, layers=self.layers, batch_size=self.batch_size)
        # Named only when off, so that the mixmatch cells measured before the option existed keep their hashes.
        if not self.fine_tune:
            config.update(fine_tune=False)
        return config


def fu_head(features: int, classes: int, *, layers: int = 1, hidden: int = 128) -> nn.Sequential:
    """Fu et al.'s completion head: flattened features [B, features] -> logits [B, classes].

    ``layers - 1`` steps BatchNorm → ReLU → Linear(→ ``hidden``), then BatchNorm → ReLU → Linear(→ ``classes``).
    The last Linear's weights are ones, as Fu et al. initialise theirs; its bias and the hidden layers keep
    PyTorch's initialisation, drawn from the global RNG (the caller seeds it). Two departures from Fu et al.:
    they set the hidden layers' weights to ones too, which harms (see the comment in the code); and their hidden
    layers are as wide as the features, here ``hidden`` wide, which bounds the head on wide feature maps.
    """
    modules: list[nn.Module] = []
    width = features
    for _ in range(layers - 1):
        # Not ones, unlike Fu et al.: with every weight one, BatchNorm removes what the biases tell apart and
        # the next layer's weights are equal, so every hidden unit gets the same value and the same gradient;
        # the units differ only by rounding errors, which training amplifies slowly (the layer starts out one
        # unit wide). Measured on LeNet's pool2 features (40 labels, 2,000 steps, layers = 2), the EMA head with
        # all-ones hidden layers labelled 50-55 % of the test digits, with PyTorch's initialisation 80 %.
        modules += [nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, hidden)]
        width = hidden
    last = nn.Linear(width, classes)
    # Ones, as Fu et al.: harmless for the last layer, where every class's logit starts equal (a zero
    # initialisation of a softmax regression up to a shift the softmax ignores) and the first step tells the
    # classes apart (on LeNet's pool2 features as accurate as PyTorch's initialisation, or slightly more).
    nn.init.ones_(last.weight)
    return nn.Sequential(*modules, nn.BatchNorm1d(width), nn.ReLU(), last)


def _mixmatch(head: nn.Module, z: torch.Tensor, y: torch.Tensor, classes: int,
              unlabelled: Callable[[torch.Tensor], torch.Tensor], n_unlabelled: int, *, steps: int, batch_size: int,
              lr: float, weight_decay: float, generator: torch.Generator, progress: bool) -> nn.Module:
    """Fu et al.'s MixMatch variant: ``head`` (features -> logits over ``classes``) trained on labelled features
    ``z`` [n, ...] with labels ``y`` [n] and the features of ``n_unlabelled`` unlabelled images
    (``unlabelled(index)`` [B, ...] for indices [B]); returns the exponential moving average of its weights, in
    eval mode.

    Each step, with B = ``batch_size``:

    1. B labelled features (one-hot labels) and the features of B unlabelled images, each drawn from a
       shuffled pass over its set (reshuffled when it runs out); the unlabelled images are queried now, so
       memory holds B of their features at a time and a noisy defense draws fresh noise for each query;
    2. guess the unlabelled labels without gradient, p = softmax(head(u)) (the head in training mode, as Fu
       et al.'s: BatchNorm normalises by u's statistics and updates its running ones), and sharpen them,
       q = p^(1/T) / Σ p^(1/T), T = 0.8 (no augmentation);
    3. mixup over [labelled; unlabelled] inputs and [one-hot; q] targets: λ ~ Beta(0.75, 0.75), λ ← max(λ, 1 − λ),
       each row mixed with the row a random permutation puts there;
    4. interleave the two halves (the second half of the labelled chunk swapped with that of the unlabelled
       one) so that BatchNorm's statistics in each forward pass see both, forward each chunk, un-interleave;
    5. loss L_x + w·L_u: L_x the cross-entropy of the labelled chunk's logits with its soft targets, L_u the
       mean squared difference of the unlabelled chunk's probabilities and its targets, w = 50·clip(t / steps,
       0, 1) at step t = 0, 1, ...; one Adam step;
    6. the EMA step: every floating-point entry of the state (weights and BatchNorm statistics) averaged with
       decay 0.999 into the EMA model, and the live one multiplied by 1 − 0.02·lr.

    The batches and permutations draw from ``generator``, λ from a NumPy generator seeded from it; the head's
    initialisation and the oracle's noise are the caller's (seeded) global RNG's.
    """
    beta = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
    targets = F.one_hot(y, classes).float()
    labelled, unlabelled_order = _Batches(len(z), batch_size, generator), _Batches(n_unlabelled, batch_size, generator)
    ema = copy.deepcopy(head).requires_grad_(False)
    live_state, ema_state = list(head.state_dict().values()), list(ema.state_dict().values())
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="model completion (mixmatch)", disable=not progress, leave=False):
            index = labelled.next()
            zx, tx = z[index], targets[index]
            zu = unlabelled(unlabelled_order.next())
            with torch.no_grad():
                q = torch.softmax(head(zu), 1).pow(1 / SHARPEN_T)
                q = q / q.sum(1, keepdim=True)
            lam = float(beta.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            lam = max(lam, 1 - lam)
            inputs, mixed_targets = torch.cat([zx, zu]), torch.cat([tx, q])
            perm = torch.randperm(len(inputs), generator=generator)
            inputs = lam * inputs + (1 - lam) * inputs[perm]
            mixed_targets = lam * mixed_targets + (1 - lam) * mixed_targets[perm]
            logits_x, logits_u = _interleave([head(c) for c in _interleave(list(inputs.split(batch_size)))])
            loss_x = -(mixed_targets[:batch_size] * F.log_softmax(logits_x, 1)).sum(1).mean()
            loss_u = (torch.softmax(logits_u, 1) - mixed_targets[batch_size:]).pow(2).mean()
            loss = loss_x + LAMBDA_U * min(max(step / steps, 0.0), 1.0) * loss_u
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for live, avg in zip(live_state, ema_state, strict=True):
                    if avg.dtype.is_floating_point:
                        avg.mul_(EMA_DECAY).add_(live, alpha=1 - EMA_DECAY)
                        live.mul_(1 - EMA_SHRINK * lr)
    return ema.eval()


def _interleave(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """MixMatch's interleaving of two chunks [n, ...]: the second halves swapped (its own inverse)."""
    a, b = chunks
    half = len(a) // 2
    return [torch.cat([a[:half], b[half:]]), torch.cat([b[:half], a[half:]])]


class _Batches:
    """Indices into ``n`` items, ``size`` at a time, from shuffled passes drawn from ``generator``; a batch that
    reaches the end of a pass continues into the next one (so an item can appear twice in it; Fu et al.'s
    loader drops a pass's last partial batch instead, and needs at least ``size`` labelled images)."""

    def __init__(self, n: int, size: int, generator: torch.Generator):
        self.n, self.size, self.generator = n, size, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self.order) < self.size:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.generator)])
        index, self.order = self.order[:self.size], self.order[self.size:]
        return index


def _train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
           weight_decay: float, desc: str, progress: bool) -> nn.Module:
    """``model`` fitted to ``labels`` by full-batch Adam on cross-entropy; returned in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            loss = F.cross_entropy(model(inputs), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
