"""Black-box model inversion: the inverse network (He et al., ACSAC 2019, §5, Algorithm 2).

The attacker queries the device on its auxiliary images X, collects (f1(x), x) pairs and trains a
decoder g to minimise (1/m) Σ ||g(f1(xᵢ)) − xᵢ||². The decoder's architecture is unrelated to f1: it is
built from the feature and image shapes (:func:`~splitshield.attacks.decoders.build_decoder`), or He
et al.'s hand-made decoder at their named CIFAR split points. Against a defended device the oracle
returns defended features, so the decoder learns to invert the defense too (adaptive attacker).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import InversionAttack, Victim, VictimView
from .decoders import Standardize, build_decoder, dense_width, he2019_decoder, standardize_dims

#: Below this many auxiliary images the attack warns that it under-reports leakage.
SMALL_AUX = 256


class InverseNetwork(InversionAttack):
    """Train a decoder on query pairs from auxiliary data.

    Parameters
    ----------
    decoder:
        A module mapping features [B, ...] to images [B, C, H, W]; ``None`` builds one, its dense layers
        sized to the auxiliary set (:func:`~splitshield.attacks.decoders.dense_width`). Fewer than
        :data:`SMALL_AUX` auxiliary images give a warning.
    steps:
        Optimiser steps (batches), independent of the auxiliary set's size.
    batch_size, lr:
        Adam with its standard eps (1e-8), learning rate decayed by cosine to 1 % of ``lr``. Not the
        authors' eps of 1e-3: with a decoder's small MSE gradients it dominates Adam's step size
        (LeNet/MNIST ``ReLU2``, dense decoder, 1400 steps: 22.3 dB with 1e-8 against 19.7 dB with 1e-3).
    standardize:
        Feed the decoder features standardised by their mean and standard deviation over the attacker's
        queries: per value, or per channel of a feature map that gets a convolutional decoder (the
        statistics are part of the fitted attack). Any attacker can do this, and it makes the attack blind
        to the feature's scale, which a defense can otherwise inflate to stall the decoder's optimiser.
        LeNet/MNIST ``ReLU2``, Gaussian noise σ = 0.5, 1000 steps of 128: MSE 0.0093 raw, 0.0080
        standardised; against a CEM variant that grew the feature to a standard deviation of 54, 0.068
        raw (a false sign of privacy) and 0.0091 standardised. At ``conv1`` (no defense, 1000 steps of
        32): 38.1 dB raw, 38.5 dB per channel, 28.3 dB per value.
    seed:
        Seeds the decoder's initialisation and the batch order.
    """

    threats = ("black_box", "white_box")
    name = "black_box"

    def __init__(self, decoder: nn.Module | None = None, steps: int = 3000, batch_size: int = 64,
                 lr: float = 1e-3, standardize: bool = True, seed: int = 0, progress: bool = True):
        self.decoder = decoder
        self.steps, self.batch_size, self.lr, self.seed = steps, batch_size, lr, seed
        self.standardize = standardize
        self.scaler: nn.Module | None = None
        self.progress = progress
        self.losses: list[float] = []

    def fit(self, victim: Victim | VictimView) -> InverseNetwork:
        view = self._view_for(victim)
        aux = view.require_aux(type(self).__name__)
        torch.manual_seed(self.seed)
        if len(aux) < SMALL_AUX:
            warnings.warn(f"InverseNetwork: the auxiliary set has only {len(aux)} images; a decoder trained on so few "
                          "overfits them and under-reports leakage: give the attacker 1000 or more", stacklevel=2)
        if self.decoder is None:
            self.decoder = he2019_decoder(view.point, view.feature_shape) or build_decoder(
                view.feature_shape, view.input_shape, hidden=dense_width(len(aux))
            )
        x_all, _ = aux.tensors()
        # Query once per auxiliary image: the oracle is the costly, rate-limited part in practice.
        z_all = torch.cat([view.query(x_all[i : i + 512]) for i in range(0, len(x_all), 512)]).cpu()
        device = next(self.decoder.parameters()).device
        if self.standardize:
            self.scaler = Standardize(standardize_dims(view.feature_shape, self.decoder), reference=z_all).to(device)
        else:
            self.scaler = nn.Identity()
        self.decoder.train()
        opt = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps, eta_min=self.lr * 0.01)
        g = torch.Generator().manual_seed(self.seed)
        for _ in tqdm(range(self.steps), desc="train inverse network", disable=not self.progress, leave=False):
            idx = torch.randint(len(x_all), (min(self.batch_size, len(x_all)),), generator=g)
            x, z = x_all[idx].to(device), z_all[idx].to(device)
            loss = (self.decoder(self.scaler(z)) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            self.losses.append(loss.item())
        self.decoder.eval()
        return self

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None or self.scaler is None:
            raise RuntimeError("call fit(victim) before invert(z)")
        return self.decoder(self.scaler(z)).clamp(0.0, 1.0)

    def config(self) -> dict:
        return {"name": self.name, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "standardize": self.standardize}

