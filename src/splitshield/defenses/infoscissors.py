"""InfoScissors, **as reconstructed here** (Duan, Sun, Jia, Chen, Gorlatova, "Reimagining Mutual
Information for Enhanced Defense against Data Leakage in Collaborative Inference", NeurIPS 2024).

The paper regularises variational upper bounds of I(r; x) (input leakage from the edge's representation
r) and I(z; ŷ) (prediction leakage). Neither the paper body nor code was reachable, so this implements the
CLUB-style bound of ALGORITHMS §C (Cheng et al., "CLUB: A Contrastive Log-ratio Upper Bound of Mutual
Information", ICML 2020), which is consistent with "variational upper bounds" but **not verified** against
the paper:

- an inversion net ψ (``_adversary.light_decoder``) models q_ψ(x | r) = N(ψ(r), ½·I), trained online
  (``steps`` Adam updates per batch, on the detached r) to minimise ‖x − ψ(r)‖²; by default ψ first
  standardises r by the batch's statistics, so q_ψ conditions on r up to its scale, which the head
  could otherwise change to loosen the bound without hiding anything;
- the model pays λ·[E_{p(x,r)} log q_ψ(x|r) − E_{p(x)p(r)} log q_ψ(x|r)]
  = λ·[MSE(ψ(r), x_shuffled) − MSE(ψ(r), x)] (pixel means; negatives are the batch's images in a random
  permutation), back-propagated through the frozen ψ into the head.

The label term (``label_lam``, ALGORITHMS §G.3) has a place only in a U-shaped split, where the device keeps
the classifier and the cloud's part returns features ``r`` to it; there an auxiliary classifier φ models
q_φ(y | r), trained online (cross-entropy on the detached ``r``), and the model pays
label_lam·[CE(φ(r), y_shuffled) − CE(φ(r), y)] (negatives: the batch's labels in a random permutation), so
that what the cloud computes tells a simple classifier little about the label while the device's own
classifier, trained with the model, still reads it. Model completion (Fu et al.) is the attack it defends.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._adversary import OnlineAdversary, light_decoder
from ._params import non_negative, positive, positive_int
from .base import Defense, substate


class InfoScissors(Defense):
    """CLUB upper bound on I(x; z_sent) with an online Gaussian inversion net.

    Parameters
    ----------
    lam:
        Weight λ >= 0 of the CLUB term.
    steps, lr:
        Inversion-net updates per batch and its Adam learning rate.
    width:
        Channels of the light decoder.
    standardize:
        Feed the decoder its input standardised by each batch's statistics (default), so that the head
        cannot defeat it by the feature's scale alone; ``False`` feeds it the raw feature.
    seed:
        Seeds the inversion net's initialisation and the negative pairs' permutation.
    label_lam:
        Weight >= 0 of the label term, for U-shaped splits only (0: none): a classifier of ``4 * width``
        hidden units on the features the cloud returns, updated ``steps`` times per batch at ``lr``.
    """

    name = "infoscissors"

    def __init__(self, lam: float = 1.0, steps: int = 1, lr: float = 1e-3, width: int = 32,
                 standardize: bool = True, seed: int = 0, label_lam: float = 0.0):
        super().__init__()
        self.lam = non_negative("lam", lam)
        self.steps = positive_int("steps", steps)
        self.lr = positive("lr", lr)
        self.width = positive_int("width", width)
        self.standardize = bool(standardize)
        self.seed = int(seed)
        self.inversion = OnlineAdversary(partial(light_decoder, width=self.width, standardize=self.standardize),
                                       lr=self.lr, steps=self.steps, seed=self.seed)
        self.label_lam = non_negative("label_lam", label_lam)
        self.labels = OnlineAdversary(partial(_label_classifier, hidden=4 * self.width), lr=self.lr,
                                      steps=self.steps, seed=self.seed + 1)

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        if not self.lam:
            return None
        self.inversion.update(z_sent, x, lambda x_hat, target: (x_hat - target).pow(2).mean())
        x_hat = self.inversion.frozen_forward(z_sent)
        shuffled = x[torch.randperm(len(x), device=x.device)]
        club = (x_hat - shuffled).pow(2).mean() - (x_hat - x).pow(2).mean()
        return self.lam * club

    def label_regularizer(self, y, returned, logits):  # noqa: D102 - documented on Defense
        if not self.label_lam:
            return None
        # One-hot targets: their shape tells the lazily built classifier how many classes there are.
        one_hot = F.one_hot(y, logits.shape[1]).float()
        self.labels.update(returned, one_hot, lambda guess, target: F.cross_entropy(guess, target))
        guess = self.labels.frozen_forward(returned)
        shuffled = y[torch.randperm(len(y), device=y.device)]
        return self.label_lam * (F.cross_entropy(guess, shuffled) - F.cross_entropy(guess, y))

    def training_state(self) -> dict[str, torch.Tensor]:
        """The inversion net's weights, Adam state and shapes (:meth:`OnlineAdversary.training_state`), and the
        label classifier's under ``labels.``."""
        return {**self.inversion.training_state(),
                **{f"labels.{k}": v for k, v in self.labels.training_state().items()}}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inversion.load_training_state({k: v for k, v in state.items() if not k.startswith("labels.")})
        self.labels.load_training_state(substate(state, "labels."))

    def config(self) -> dict[str, Any]:
        config = {"name": self.name, "lam": self.lam, "steps": self.steps, "lr": self.lr, "width": self.width,
                  "standardize": self.standardize, "seed": self.seed}
        if self.label_lam:  # only when set: a setting without the label term keeps its hash
            config["label_lam"] = self.label_lam
        return config


def _label_classifier(feature_shape: tuple[int, ...], target_shape: tuple[int, ...], hidden: int) -> nn.Module:
    """InfoScissors' auxiliary classifier φ: features [B, *feature_shape] -> logits [B, classes], classes the
    one-hot targets' width (``target_shape == (classes,)``); one hidden layer of ``hidden`` units."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, target_shape[0]))
