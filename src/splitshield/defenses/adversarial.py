"""Adversarial representation learning: train the head against a reconstruction adversary.

DeepObfuscator (Li et al., IoTDI 2021) and Xiao et al. (AAAI 2020) solve
min over the encoder, max over a decoder D, of L_task − λ·L_rec(D(z), x); we follow the simplest
published recipe, CEM's ``gan_adv_stepK`` after ResSFL (Li et al., CVPR 2022; ALGORITHMS §B.4):

- a decoder D is updated ``steps`` times per training batch (Adam, lr 1e-3) to reconstruct x from the
  feature sent (detached), minimising MSE or maximising SSIM;
- the model then pays α·ReLU(SSIM(D(z_sent), x) − thr) (``metric="ssim"``, thr = 0.5 as in CEM), or
  α·ReLU(thr − MSE(D(z_sent), x)) (``metric="mse"``; thr = 1 keeps it always active: −α·MSE + α),
  back-propagated through the frozen D into the head.

Differences from CEM's code: D is a light decoder (``_adversary.light_decoder``: fully connected on
coarse features, 4 convolutions on finer ones), not ``res_normN4C64``, and it is not pre-trained for
30 epochs (it learns from the first batch, so early epochs defend less), and it standardises each
batch of features before decoding (``standardize``), so that the head cannot escape it by rescaling its
feature alone: CEM's ``res_normN4C64`` is scale-blind in the same way through its leading batch norm. The decoder
lives outside the trainer's optimiser and the deployed defense; its weights and Adam state are exported by
:meth:`~AdversarialReconstruction.training_state` into checkpoints to resume training from (``_adversary.py``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..metrics import ssim
from ._adversary import OnlineAdversary, light_decoder
from ._params import choice, non_negative, positive, positive_int
from .base import Defense


class AdversarialReconstruction(Defense):
    """Penalise how well an online decoder reconstructs x from the feature sent.

    Parameters
    ----------
    alpha:
        Penalty weight α >= 0 (CEM: 0.3 in ``run_exp.sh``, 1 in ``run_gan_attack.sh``).
    metric:
        ``"ssim"`` (Gaussian 11×11 window, CEM's) or ``"mse"``; what the decoder optimises and the model hinges on.
    threshold:
        SSIM above which (or MSE below which) the model pays; ``None``: 0.5 for SSIM, 1.0 for MSE.
    steps, lr:
        Decoder updates per batch and its Adam learning rate.
    width:
        Channels of the light decoder.
    standardize:
        Feed the decoder its input standardised by each batch's statistics (default), so that the head
        cannot defeat it by the feature's scale alone; ``False`` feeds it the raw feature. Which trains the
        better defense at which α is measured on the generated results page, ``benchmarks/results/README.md``.
    seed:
        Seeds the decoder's initialisation.
    """

    name = "adversarial"

    def __init__(self, alpha: float = 0.3, metric: str = "ssim", threshold: float | None = None, steps: int = 1,
                 lr: float = 1e-3, width: int = 32, standardize: bool = True, seed: int = 0):
        super().__init__()
        self.alpha = non_negative("alpha", alpha)
        self.metric = choice("metric", metric, ("ssim", "mse"))
        self.threshold = float(threshold) if threshold is not None else (0.5 if metric == "ssim" else 1.0)
        self.steps = positive_int("steps", steps)
        self.lr = positive("lr", lr)
        self.width = positive_int("width", width)
        self.standardize = bool(standardize)
        self.seed = int(seed)
        self.adversary = OnlineAdversary(partial(light_decoder, width=self.width, standardize=self.standardize),
                                       lr=self.lr, steps=self.steps, seed=self.seed)

    def _quality(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction quality the decoder maximises: SSIM, or −MSE."""
        if self.metric == "ssim":
            return ssim(x_hat, x, window="gaussian")
        return -(x_hat - x).pow(2).mean()

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        if not self.alpha:
            return None
        self.adversary.update(z_sent, x, lambda x_hat, target: -self._quality(x_hat, target))
        quality = self._quality(self.adversary.frozen_forward(z_sent), x)
        gap = quality - self.threshold if self.metric == "ssim" else self.threshold + quality
        return self.alpha * torch.relu(gap)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The online decoder's weights, Adam state and shapes (:meth:`OnlineAdversary.training_state`)."""
        return self.adversary.training_state()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adversary.load_training_state(state)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "metric": self.metric, "threshold": self.threshold,
                "steps": self.steps, "lr": self.lr, "width": self.width, "standardize": self.standardize,
                "seed": self.seed}
