"""An auxiliary network trained online against the defended model, with its own optimiser.

Adversarial representation learning and InfoScissors train a decoder (and update it every step) while
the model is trained to defeat it. The decoder must not be moved by the trainer's optimiser (which
minimises the model's loss, i.e. would make the decoder *worse*), and is not part of what is deployed.
So it is kept outside the defense's registered modules: it is absent from ``parameters()`` (hence from
the trainer's optimiser) and from ``state_dict()`` (hence from the deployed defense), and is built lazily
on the feature's device once the shapes are known. Its weights and optimiser state are training state:
:meth:`OnlineAdversary.training_state` exports them for checkpoints to resume training from, and
:meth:`OnlineAdversary.load_training_state` rebuilds the module from the saved shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._random import seeded
from .base import load_optimizer_tensors, optimizer_tensors, substate


def light_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, ...], width: int = 32,
                  sigmoid: bool = True, standardize: bool = True) -> nn.Module:
    """A small decoder from features to images, in (0, 1) with ``sigmoid`` (as CEM's decoders).

    Features the inverse-network attack decodes with its fully connected decoder (flat ones, coarse maps of
    small images: :func:`~splitshield.attacks.decoders.wants_dense_decoder`) get it here too, with ``8 * width``
    hidden units (:func:`~splitshield.attacks.decoders.build_decoder`; imported late: the attacks package imports
    ``defenses.base``). Finer convolutional features: conv 3×3, bilinear resize to half the image size,
    conv 3×3, a stride-2 transposed conv to full size, conv 3×3 to the image channels — about a quarter
    of the attack's convolutional decoder, because an online adversary runs twice per training step.
    Without ``sigmoid`` the output is unbounded: better for an attack trained with Adam's large ``eps``
    (the sigmoid's small gradients then barely move it).

    With ``standardize`` the decoder first standardises each batch by its own statistics (per value for
    the dense decoder, per channel for the convolutional one), as the inverse-network attack does with
    its query set, so that the penalty measures what the feature reveals up to its scale, which is what a
    scale-blind attacker sees. Raw-fed, the decoder can also be slowed by rescaling the feature alone.
    (Which trains the better defense is an empirical question: see the generated results page,
    ``benchmarks/results/README.md``.)
    """
    from ..attacks.decoders import Standardize, dense_decoder, standardize_dims, wants_dense_decoder

    channels, height, wide = image_shape
    if wants_dense_decoder(feature_shape, image_shape):
        body = dense_decoder(feature_shape, image_shape, hidden=8 * width)
    else:
        half = max(1, width // 2)
        body = nn.Sequential(
            nn.Conv2d(feature_shape[0], width, 3, padding=1), nn.ReLU(),
            nn.Upsample(size=(max(1, height // 2), max(1, wide // 2)), mode="bilinear", align_corners=False),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, half, 4, stride=2, padding=1), nn.ReLU(),
            nn.Upsample(size=(height, wide), mode="bilinear", align_corners=False),
            nn.Conv2d(half, channels, 3, padding=1),
        )
    head = [Standardize(standardize_dims(feature_shape, body))] if standardize else []
    return nn.Sequential(*head, body, *([nn.Sigmoid()] if sigmoid else []))


class OnlineAdversary:
    """A lazily built module with its own Adam optimiser.

    Parameters
    ----------
    build:
        ``build(feature_shape, image_shape) -> nn.Module``.
    lr:
        Adam learning rate.
    steps:
        Optimiser steps per training batch.
    seed:
        Seeds the module's initialisation.
    """

    def __init__(self, build: Callable[[tuple[int, ...], tuple[int, ...]], nn.Module], lr: float, steps: int,
                 seed: int):
        self._build, self.lr, self.steps, self.seed = build, lr, steps, seed
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (feature, image) it was built for

    def _make(self, feature_shape: tuple[int, ...], image_shape: tuple[int, ...], device: torch.device) -> None:
        """Build the module (initialised from ``seed``; the global RNG is left as it was) and its optimiser."""
        with seeded(self.seed):
            self.module = self._build(feature_shape, image_shape).to(device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self.lr)
        self.shapes = (feature_shape, image_shape)

    def update(self, inputs: torch.Tensor, targets: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Train ``steps`` steps minimising ``loss_fn(module(inputs), targets)`` (inputs are detached)."""
        if self.module is None:
            self._make(tuple(inputs.shape[1:]), tuple(targets.shape[1:]), inputs.device)
        self.module.train()
        inputs = inputs.detach()
        for _ in range(self.steps):
            loss = loss_fn(self.module(inputs), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # leave no stale gradient behind

    def frozen_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The module's output with its weights held fixed: gradients reach ``inputs`` only."""
        assert self.module is not None, "call update() first"
        for p in self.module.parameters():
            p.requires_grad_(False)
        try:
            return self.module(inputs)
        finally:
            for p in self.module.parameters():
                p.requires_grad_(True)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The module's weights (``module.*``), its Adam state (``optim.*``) and the shapes it was built for
        (``feature_shape``, ``image_shape``: int64 [ndim]); empty before the first update."""
        if self.module is None:
            return {}
        feature_shape, image_shape = self.shapes
        return {"feature_shape": torch.tensor(feature_shape), "image_shape": torch.tensor(image_shape),
                **{f"module.{k}": v for k, v in self.module.state_dict().items()},
                **{f"optim.{k}": v for k, v in optimizer_tensors(self.optimizer).items()}}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned: rebuild the module for the saved shapes, on their device."""
        if not state:
            self.module = self.optimizer = self.shapes = None
            return
        shapes = state["feature_shape"]
        self._make(tuple(shapes.tolist()), tuple(state["image_shape"].tolist()), shapes.device)
        self.module.load_state_dict(substate(state, "module."))
        load_optimizer_tensors(self.optimizer, substate(state, "optim."))
