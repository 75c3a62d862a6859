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

from .base import CompletionAttack, Victim, VictimView


class ModelCompletion(CompletionAttack):
    """Fit an MLP on the features of ``n_labels`` labelled auxiliary images, balanced per class.

    Parameters
    ----------
    n_labels:
        How many labelled images the attacker has (InfoScissors uses 40 on CIFAR-10).
    hidden:
        Width of the MLP's hidden layer.
    steps, lr, weight_decay:
        Adam full-batch training.
    """

    threats = ("black_box", "white_box")
    name = "model_completion"

    def __init__(self, n_labels: int = 40, hidden: int = 128, steps: int = 500, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0, progress: bool = True):
        self.n_labels, self.hidden, self.steps, self.lr = n_labels, hidden, steps, lr
        self.weight_decay, self.seed, self.progress = weight_decay, seed, progress
        self.classifier: nn.Module | None = None

    def fit(self, victim: Victim | VictimView) -> ModelCompletion:
        view = self._view_for(victim)
        aux = view.require_aux(type(self).__name__)
        g = torch.Generator().manual_seed(self.seed)
        per_class = max(1, self.n_labels // aux.num_classes)
        picks = []
        for c in range(aux.num_classes):
            idx = (aux.labels == c).nonzero().flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        x, y = aux.subset(torch.cat(picks)).tensors()
        z = view.query(x).flatten(1).cpu()
        torch.manual_seed(self.seed)
        self.classifier = nn.Sequential(nn.LayerNorm(z.shape[1]), nn.Linear(z.shape[1], self.hidden), nn.ReLU(),
                                        nn.Linear(self.hidden, aux.num_classes))
        opt = torch.optim.Adam(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in tqdm(range(self.steps), desc="model completion", disable=not self.progress, leave=False):
            loss = F.cross_entropy(self.classifier(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.classifier.eval()
        return self

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for features ``z`` [B, ...]."""
        if self.classifier is None:
            raise RuntimeError("call fit(victim) before predict(z)")
        return self.classifier(z.flatten(1))

    def config(self) -> dict:
        return {"name": self.name, "n_labels": self.n_labels, "hidden": self.hidden, "steps": self.steps}


