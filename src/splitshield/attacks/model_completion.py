"""Model completion: label leakage from features (passive model completion, Fu et al., USENIX Sec. 2022).

A curious cloud that holds a few labelled examples of its own — sent through the device like any other
input — fits a small classifier on their features and then labels every user's feature. Its accuracy,
against the tail's own accuracy and a from-scratch baseline, measures how much task information the
features give away to anyone, not just to the tail's owner.
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
        z = view.query(x).flatten(1).cpu()
        with seeded(self.seed):  # the initialisation, whatever noise the queries drew
            classifier = nn.Sequential(nn.LayerNorm(z.shape[1]), nn.Linear(z.shape[1], self.hidden), nn.ReLU(),
                                       nn.Linear(self.hidden, aux.num_classes))
        opt = torch.optim.Adam(classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in tqdm(range(self.steps), desc="model completion", disable=not self.progress, leave=False):
            loss = F.cross_entropy(classifier(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.classifier_ = classifier.eval()
        return self

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for features ``z`` [B, ...]."""
        self._check_fitted()
        return self.classifier_(z.flatten(1))

    def config(self) -> dict:
        return {"name": self.name, "n_labels": self.n_labels, "hidden": self.hidden, "steps": self.steps,
                "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed}
