"""The ``Defense`` protocol: what the edge device does to a feature before it leaves.

A defense has six optional hooks, called by :class:`~splitshield.Trainer` (and the runtime):

- ``perturb(x, training) -> x'`` — transforms the images before the head sees them (noise on the input,
  He et al. IoT-J 2020 §IV). Identity for feature-side defenses.
- ``obfuscate(z, training) -> z'`` — transforms the feature on its way to the cloud, in training and
  in inference (noise, dropout, pruning, quantisation, learned noise). Must be differentiable where the
  defense is to be trained through, since an adaptive white-box attacker optimises through it.
- ``regularizer(x, y, z, z_sent, logits) -> loss`` — an extra training loss (NoPeek, VIB, CEM, ...),
  given the input images ``x`` [B, C, H, W] in [0, 1], labels ``y`` [B], the clean feature ``z``, the
  feature sent ``z_sent = obfuscate(z)`` and the tail's logits.
- ``label_regularizer(y, returned, logits) -> loss`` — in a U-shaped split only (the device keeps the classifier), an
  extra loss on the features the cloud's part returns (InfoScissors' label term).
- ``on_epoch_start(trainer)`` / ``on_epoch_end(trainer)`` — epoch-level work (CEM's clustering and
  its learning-rate schedule).

Defenses with parameters own them as an ``nn.Module``; the trainer optimises them with the model and
checkpoints them (``state_dict``). Training-only state kept elsewhere (CEM's clusters, an online
decoder and its optimiser) is exported by ``training_state()`` and restored by ``load_training_state()``,
so that training resumes exactly; a defense that cannot do so sets ``resumable = False``.
``a + b`` stacks two defenses (:class:`Compose`): obfuscations apply in order, losses add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..train import Trainer


class Defense(nn.Module):
    """Base class of every defense; the identity by default (no defense)."""

    #: Short registry name, used in configs and reports.
    name: str = "none"
    #: Whether :meth:`training_state` holds all the training state kept outside parameters and buffers;
    #: ``False`` makes ``Trainer.fit(resume=True)`` refuse to continue from a checkpoint.
    resumable: bool = True

    def perturb(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Transform images ``x`` [B, C, H, W] (in [0, 1]) before the head; the identity unless input-side."""
        return x

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        """Transform feature ``z`` [B, ...] before it is sent; same shape out unless documented."""
        return z

    def send(self, head: nn.Module, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """What the device sends for images ``x`` [B, C, H, W]: ``obfuscate(head(perturb(x)))``."""
        return self.obfuscate(head(self.perturb(x, training)), training)

    def regularizer(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, z_sent: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor | None:
        """Extra training loss (a 0-d tensor), or ``None`` for none."""
        return None

    def label_regularizer(self, y: torch.Tensor, returned: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Extra training loss (a 0-d tensor) on ``returned`` [B, ...], the features the cloud's part of a U-shaped
        split returns to the device for a batch with labels ``y`` [B] (the device's logits [B, classes] from
        them); ``None`` for none. Called for U-shaped targets only (:attr:`SplitModel.u_shaped`)."""
        return None

    def clean(self, z: torch.Tensor) -> torch.Tensor:
        """The deterministic, noise-free part of :meth:`obfuscate` (identity unless it reshapes the feature).

        A bound (sigmoid) or a learned mean map is *clean*; noise, dropout and pruning are not. In a
        :class:`Compose`, each part's regularizer receives ``z`` after the ``clean`` of the parts before
        it, so a CEM or NoPeek stacked on a feature bound regularises the bounded feature.
        """
        return z

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Called once before each training epoch, after the trainer has set the epoch's learning rate."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Called once after each training epoch."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Training-only state kept outside parameters and buffers, as named tensors (none by default).

        Saved between epochs in resumable checkpoints (:class:`~splitshield.Trainer` with
        ``checkpoint_dir``); Python scalars travel as 0-d float64 tensors, which hold them exactly.
        """
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned (its tensors already on the training device)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable parameters, stored with checkpoints and results."""
        return {"name": self.name}

    def __add__(self, other: Defense) -> Compose:
        return Compose(self, other)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Inference-time obfuscation, so a defense can sit in an ``nn.Sequential`` on the device."""
        return self.obfuscate(z, training=False)


class Compose(Defense):
    """Several defenses in a row: obfuscations apply in order, regularizers add up."""

    name = "compose"

    def __init__(self, *defenses: Defense):
        super().__init__()
        flat: list[Defense] = []
        for d in defenses:
            flat.extend(d.parts if isinstance(d, Compose) else [d])
        self.parts = nn.ModuleList(flat)

    def perturb(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        for d in self.parts:
            x = d.perturb(x, training)
        return x

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        for d in self.parts:
            z = d.obfuscate(z, training)
        return z

    def regularizer(self, x, y, z, z_sent, logits):  # noqa: D102 - documented on Defense
        losses = []
        for d in self.parts:
            if (loss := d.regularizer(x, y, z, z_sent, logits)) is not None:
                losses.append(loss)
            z = d.clean(z)
        return torch.stack(losses).sum() if losses else None

    def label_regularizer(self, y, returned, logits):  # noqa: D102 - documented on Defense
        losses = [loss for d in self.parts if (loss := d.label_regularizer(y, returned, logits)) is not None]
        return torch.stack(losses).sum() if losses else None

    def clean(self, z: torch.Tensor) -> torch.Tensor:
        for d in self.parts:
            z = d.clean(z)
        return z

    @property
    def resumable(self) -> bool:
        """Whether every part is resumable."""
        return all(d.resumable for d in self.parts)

    def on_epoch_start(self, trainer: Trainer) -> None:
        for d in self.parts:
            d.on_epoch_start(trainer)

    def on_epoch_end(self, trainer: Trainer) -> None:
        for d in self.parts:
            d.on_epoch_end(trainer)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The parts' states, part ``i``'s keys prefixed with ``parts.i.`` (as in ``state_dict``)."""
        return {f"parts.{i}.{key}": value
                for i, d in enumerate(self.parts) for key, value in d.training_state().items()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, d in enumerate(self.parts):
            d.load_training_state(substate(state, f"parts.{i}."))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "parts": [d.config() for d in self.parts]}


class NoDefense(Defense):
    """The undefended baseline: the feature leaves the device as it is."""


# ---- checkpointable state as flat dicts of tensors (nothing is ever pickled) ---------------------


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose key starts with ``prefix``, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state as ``{"<param index>.<name>": tensor}`` (e.g. Adam's moments).

    Hyperparameters (learning rate, betas) are not included: the owner sets them when it builds the optimiser.
    """
    return {f"{idx}.{name}": value for idx, state in optimizer.state_dict()["state"].items()
            for name, value in state.items() if isinstance(value, torch.Tensor)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the per-parameter state :func:`optimizer_tensors` returned into an optimiser built alike."""
    state = optimizer.state_dict()
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state["state"].setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(state)
