"""Black-box model inversion: the inverse network (He et al., ACSAC 2019, §5, Algorithm 2).

The attacker queries the device on its auxiliary images X, collects (f1(x), x) pairs and trains a
decoder g to minimise (1/m) Σ ||g(f1(xᵢ)) − xᵢ||². The decoder's architecture is unrelated to f1: it is
built from the feature and image shapes (:func:`~splitshield.attacks.decoders.build_decoder`), or He
et al.'s hand-made decoder at their named CIFAR split points. Against a defended device the oracle
returns defended features, so the decoder learns to invert the defense too (adaptive attacker).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from ._params import flag, module_or, non_negative_int, positive, positive_int
from ._refit import last_linear_layer, refit_last_layer
from .base import InversionAttack, VictimView
from .decoders import Standardize, build_decoder, dense_width, he2019_decoder, standardize_dims

#: Below this many auxiliary images the attack warns that it under-reports leakage.
SMALL_AUX = 256

#: With ``refit``, this share of the auxiliary images (at most :data:`MAX_HELD_OUT`) is held out to choose
#: between the trained decoder and its refit.
HELD_OUT = 0.1
MAX_HELD_OUT = 1000


class InverseNetwork(InversionAttack):
    """Train a decoder on query pairs from auxiliary data.

    Parameters
    ----------
    decoder:
        A module mapping features [B, ...] to images [B, C, H, W], trained as a copy (the module given is left
        untouched); ``None`` builds one, its dense layers sized to the auxiliary set
        (:func:`~splitshield.attacks.decoders.dense_width`). Fewer than :data:`SMALL_AUX` auxiliary images give
        a warning.
    steps:
        Optimiser steps (batches, > 0), independent of the auxiliary set's size.
    batch_size, lr:
        Batch size (> 0) and learning rate (> 0) of Adam with its standard eps (1e-8), the learning rate decayed
        by cosine to 1 % of ``lr``. Not the authors' eps of 1e-3: with a decoder's small MSE gradients it
        dominates Adam's step size.
    refit:
        After training, solve the decoder's last layer (``Linear``, or a stride-1 ``Conv2d`` /
        ``ConvTranspose2d``, followed by reshapes only) in closed form: ridge regression of the images on that
        layer's inputs (:func:`~splitshield.attacks._refit.refit_last_layer`). A tenth of the auxiliary images
        (at most 1,000) is then held out of training; the ridge strength, and whether the refit is kept at all,
        are chosen by the reconstruction error on them (the attacker's own criterion). For a decoder that is a
        single linear layer, such as He et al.'s at ``conv11``, this is the exact least-squares decoder, which
        gradient descent approaches only slowly. A decoder with no such last layer is left as trained.
    standardize:
        Feed the decoder features standardised by their mean and standard deviation over the attacker's
        queries: per value, or per channel of a feature map that gets a convolutional decoder. Any attacker
        can do this, and it makes the attack blind to the feature's scale, which a defense can otherwise
        inflate to stall the decoder's optimiser.
    seed:
        Seeds the decoder's initialisation, the oracle's noise and the batch order.
    progress:
        Show a progress bar over the training steps.

    Fitted attributes
    -----------------
    decoder_:
        The trained decoder (built afresh, or copied from ``decoder``, by every ``fit``).
    scaler_:
        The :class:`~splitshield.attacks.decoders.Standardize` fixed from the queries, or ``nn.Identity``.
    losses_:
        The training loss (MSE in [0, 1] pixel units) at every step.
    refit_:
        With ``refit``: the relative ridge strength of the kept refit, or ``None`` when the trained decoder
        reconstructed the held-out images better (or could not be refitted). Without: ``None``.
    """

    threats = ("black_box", "white_box")
    name = "inverse_network"

    def __init__(self, decoder: nn.Module | None = None, steps: int = 3000, batch_size: int = 64,
                 lr: float = 1e-3, refit: bool = False, standardize: bool = True, seed: int = 0,
                 progress: bool = True):
        self.decoder = module_or("decoder", decoder, (None,))
        self.steps, self.batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
        self.lr = positive("lr", lr)
        self.refit = flag("refit", refit)
        self.standardize = flag("standardize", standardize)
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: VictimView) -> InverseNetwork:
        aux = view.require_aux(type(self).__name__)
        if len(aux) < SMALL_AUX:
            warnings.warn(f"InverseNetwork: the auxiliary set has only {len(aux)} images; a decoder trained on so few "
                          "overfits them and under-reports leakage: give the attacker 1000 or more", stacklevel=3)
        if self.decoder is not None:
            decoder = copy.deepcopy(self.decoder)
        else:
            decoder = he2019_decoder(view.point, view.feature_shape) or build_decoder(
                view.feature_shape, view.input_shape, hidden=dense_width(len(aux))
            )
        x_all, _ = aux.tensors()
        # Query once per auxiliary image: the oracle is the costly, rate-limited part in practice.
        z_all = torch.cat([view.query(x_all[i : i + 512]) for i in range(0, len(x_all), 512)]).cpu()
        device = next(decoder.parameters()).device
        if self.standardize:
            scaler: nn.Module = Standardize(standardize_dims(view.feature_shape, decoder), reference=z_all).to(device)
        else:
            scaler = nn.Identity()
        x_train, z_train, x_held, z_held = x_all, z_all, None, None
        if self.refit and len(x_all) > 1:
            order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(self.seed))
            held = order[: min(len(x_all) - 1, MAX_HELD_OUT, max(1, round(HELD_OUT * len(x_all))))]
            kept = order[len(held) :]
            x_train, z_train, x_held, z_held = x_all[kept], z_all[kept], x_all[held], z_all[held]
        decoder.train()
        opt = torch.optim.Adam(decoder.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps, eta_min=self.lr * 0.01)
        g = torch.Generator().manual_seed(self.seed)
        losses = []
        for _ in tqdm(range(self.steps), desc="train inverse network", disable=not self.progress, leave=False):
            idx = torch.randint(len(x_train), (min(self.batch_size, len(x_train)),), generator=g)
            x, z = x_train[idx].to(device), z_train[idx].to(device)
            loss = (decoder(scaler(z)) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        decoder.eval()
        refit = None
        layer = last_linear_layer(decoder) if z_held is not None else None
        if layer is not None:
            decode = nn.Sequential(scaler, decoder)

            @torch.no_grad()
            def held_out_error() -> float:
                errors = [(decode(z_held[i : i + 256].to(device)).clamp(0, 1) - x_held[i : i + 256].to(device))
                          .pow(2).flatten(1).mean(1) for i in range(0, len(z_held), 256)]
                return torch.cat(errors).mean().item()

            refit = refit_last_layer(decode, layer, (z_train, x_train), (z_held, x_held), held_out_error)
        self.decoder_, self.scaler_, self.losses_, self.refit_ = decoder, scaler, losses, refit
        return self

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self.decoder_(self.scaler_(z)).clamp(0.0, 1.0)

    def config(self) -> dict:
        decoder = None if self.decoder is None else type(self.decoder).__name__
        config = {"name": self.name, "decoder": decoder, "steps": self.steps, "batch_size": self.batch_size,
                  "lr": self.lr, "standardize": self.standardize, "seed": self.seed}
        # Named only when on, so that the cells measured before the option existed keep their hashes.
        return config | ({"refit": True} if self.refit else {})
