"""Model completion: label leakage from features (passive model completion, Fu et al., USENIX Sec. 2022).

A curious cloud that holds a few labelled examples of its own — sent through the device like any other
input — fits a small classifier on their features and then labels every user's feature. Its accuracy,
against the tail's own accuracy and a from-scratch baseline, measures how much task information the
features give away to anyone, not just to the tail's owner.

The baseline (:func:`train_from_scratch`) is what the same labelled images are worth without the device:
the whole model's architecture, freshly initialised, trained on them with the attack's own optimiser and
budget (InfoScissors' "training from scratch with 40 labels"). Completion accuracy far above it means
the features, not the labels, taught the attacker the task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._params import flag, non_negative, non_negative_int, positive, positive_int
from .base import CompletionAttack, VictimView, seeded


class ModelCompletion(CompletionAttack):
    """Fit an MLP on the features of ``n_labels`` labelled auxiliary images, balanced per class.

    Parameters
    ----------
    n_labels:
        How many labelled images the attacker has (> 0; InfoScissors uses 40 on CIFAR-10).
    hidden:
        Width of the MLP's hidden layer (> 0).
    steps, lr, weight_decay:
        Adam full-batch training: steps > 0, lr > 0, weight_decay >= 0.
    seed:
        Seeds the choice of the labelled images, the oracle's noise and the MLP's initialisation.
    progress:
        Show a progress bar over the training steps.

    Fitted attributes
    -----------------
    classifier_:
        The trained MLP: features [B, ...] -> logits [B, classes], built afresh by every ``fit``.
    labelled_:
        The attacker's labelled images [n, C, H, W] in [0, 1] and their labels [n] (the baseline's data).
    """

    threats = ("black_box", "white_box")
    name = "model_completion"

    def __init__(self, n_labels: int = 40, hidden: int = 128, steps: int = 500, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0, progress: bool = True):
        self.n_labels, self.hidden = positive_int("n_labels", n_labels), positive_int("hidden", hidden)
        self.steps, self.lr = positive_int("steps", steps), positive("lr", lr)
        self.weight_decay = non_negative("weight_decay", weight_decay)
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
        x, y = aux.subset(torch.cat(picks)).tensors()
        self.labelled_ = (x, y)
        z = view.query(x).flatten(1).cpu()
        with seeded(self.seed):  # the initialisation, whatever noise the queries drew
            classifier = nn.Sequential(nn.LayerNorm(z.shape[1]), nn.Linear(z.shape[1], self.hidden), nn.ReLU(),
                                       nn.Linear(self.hidden, aux.num_classes))
        self.classifier_ = _train(classifier, z, y, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay,
                                  desc="model completion", progress=self.progress)
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
        return self.classifier_(z.flatten(1))

    def config(self) -> dict:
        return {"name": self.name, "n_labels": self.n_labels, "hidden": self.hidden, "steps": self.steps,
                "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed}


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
