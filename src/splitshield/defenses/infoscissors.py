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

Only the input-leakage term is implemented: in this toolkit's split (head on the device, tail and
classifier in the cloud) the edge holds no classifier to protect, so the I(z; ŷ) term has no place.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ._adversary import OnlineAdversary, light_decoder
from ._params import non_negative, positive, positive_int
from .base import Defense


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
    """

    name = "infoscissors"

    def __init__(self, lam: float = 1.0, steps: int = 1, lr: float = 1e-3, width: int = 32,
                 standardize: bool = True, seed: int = 0):
        super().__init__()
        self.lam = non_negative("lam", lam)
        self.steps = positive_int("steps", steps)
        self.lr = positive("lr", lr)
        self.width = positive_int("width", width)
        self.standardize = bool(standardize)
        self.seed = int(seed)
        self.inversion = OnlineAdversary(partial(light_decoder, width=self.width, standardize=self.standardize),
                                       lr=self.lr, steps=self.steps, seed=self.seed)

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        if not self.lam:
            return None
        self.inversion.update(z_sent, x, lambda x_hat, target: (x_hat - target).pow(2).mean())
        x_hat = self.inversion.frozen_forward(z_sent)
        shuffled = x[torch.randperm(len(x), device=x.device)]
        club = (x_hat - shuffled).pow(2).mean() - (x_hat - x).pow(2).mean()
        return self.lam * club

    def training_state(self) -> dict[str, torch.Tensor]:
        """The inversion net's weights, Adam state and shapes (:meth:`OnlineAdversary.training_state`)."""
        return self.inversion.training_state()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inversion.load_training_state(state)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lam": self.lam, "steps": self.steps, "lr": self.lr, "width": self.width,
                "standardize": self.standardize, "seed": self.seed}
