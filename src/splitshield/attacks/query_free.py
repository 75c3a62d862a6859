"""Query-free model inversion with a shadow head (He et al., ACSAC 2019, §6, Algorithm 3, Eq. 6).

The attacker holds the cloud's tail f2 and labelled auxiliary data, but cannot query the device. It
trains a shadow head f1' so that the frozen tail classifies its output correctly,

    f1' = argmin_g (1/m) Σ CE(f2(g(xᵢ)), yᵢ),

then runs rMLE against f1' with the observed feature as the target.

Many heads satisfy the tail, and rMLE through a shadow whose features differ from the device's inverts
the wrong map. The cloud also sees what the device sends to it for other users (its traffic), so when the
view holds the traffic's moments the shadow is also pulled towards them, per channel and in units of the
traffic's standard deviation σ_c(z) (weight β = ``match_traffic``; 0 gives He et al.'s attack):

    + β · mean_c[((μ_c(f1'(x)) − μ_c(z))² + (σ_c(f1'(x)) − σ_c(z))²) / σ_c(z)²].

The traffic is data the cloud holds, not knowledge of the defense: a non-adaptive attacker uses it too.

The shadow head is either the
head's own architecture, freshly initialised (``shadow="same"``, He et al.'s "same net"), or a
different one built from the shapes (``shadow="different"``: 3×3 convolutions with pooling, He et al.'s
"diff net" idea generalised to any split), or any module the user gives.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ._rmle import rmle
from .base import FeatureMoments, InversionAttack, QueryFreeView, Victim, VictimView
from .whitebox import rmle_settings


def different_head(input_shape: tuple[int, int, int], feature_shape: tuple[int, ...],
                   final_activation: type[nn.Module] | None = None, width: int = 32) -> nn.Sequential:
    """A shadow head of another architecture mapping images of ``input_shape`` to ``feature_shape``."""
    cin, height, _ = input_shape
    layers: list[nn.Module] = [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
    size = height
    target = feature_shape[1] if len(feature_shape) == 3 else 4
    c = width
    while size >= 2 * target:
        layers += [nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU()]
        size, c = size // 2, 2 * c
    if len(feature_shape) == 3:
        layers += [nn.AdaptiveAvgPool2d(feature_shape[1:]), nn.Conv2d(c, feature_shape[0], 3, padding=1)]
    else:
        layers += [nn.AdaptiveAvgPool2d(target), nn.Flatten(), nn.Linear(c * target * target, feature_shape[0])]
    if final_activation is not None:
        layers.append(final_activation())
    return nn.Sequential(*layers)


class QueryFreeInversion(InversionAttack):
    """Shadow-head training through the frozen tail, then rMLE on the shadow head.

    Parameters
    ----------
    shadow:
        ``"same"`` (the head's architecture), ``"different"`` (built from shapes) or an ``nn.Module``.
    steps, batch_size, lr:
        Shadow training: Adam (amsgrad, eps 1e-3), cosine-decayed learning rate.
    match_traffic:
        Weight β of the moment-matching term (see the module docstring); used when the victim's view
        holds traffic.
    iters, rmle_lr, tv, l2:
        The rMLE stage; ``None`` takes the white-box defaults for the split point.
    seed:
        Seeds the shadow's initialisation and the batch order.
    """

    threats = ("query_free",)
    name = "query_free"

    def __init__(self, shadow: str | nn.Module = "same", steps: int = 3000, batch_size: int = 64,
                 lr: float = 1e-3, match_traffic: float = 3.0, iters: int | None = None,
                 rmle_lr: float | None = None, tv: float | None = None, l2: float | None = None, seed: int = 0,
                 progress: bool = True):
        if isinstance(shadow, str) and shadow not in ("same", "different"):
            raise ConfigError(f"shadow must be 'same', 'different' or an nn.Module, got {shadow!r}")
        if not match_traffic >= 0:
            raise ConfigError(f"match_traffic must be a weight >= 0, got {match_traffic!r}")
        self.match_traffic = match_traffic
        self.shadow = shadow
        self.steps, self.batch_size, self.lr, self.seed = steps, batch_size, lr, seed
        self.iters, self.rmle_lr, self.tv, self.l2 = iters, rmle_lr, tv, l2
        self.progress = progress
        self.shadow_head: nn.Module | None = None
        self.shadow_accuracy: float | None = None

    def fit(self, victim: Victim | VictimView) -> QueryFreeInversion:
        view: QueryFreeView = self._view_for(victim)  # type: ignore[assignment]
        aux = view.require_aux(type(self).__name__)
        torch.manual_seed(self.seed)
        if self.shadow == "same":
            head = view.head_architecture()
        elif self.shadow == "different":
            head = different_head(view.input_shape, view.feature_shape, view.head_final_activation)
        else:
            head = copy.deepcopy(self.shadow)
        opt = torch.optim.Adam(head.parameters(), lr=self.lr, eps=1e-3, amsgrad=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps, eta_min=self.lr * 0.01)
        x_all, y_all = aux.tensors()
        g = torch.Generator().manual_seed(self.seed)
        moments = view.traffic if self.match_traffic > 0 else None
        head.train()
        correct = seen = 0
        for step in tqdm(range(self.steps), desc="train shadow head", disable=not self.progress, leave=False):
            idx = torch.randint(len(x_all), (min(self.batch_size, len(x_all)),), generator=g)
            features = view.obfuscate(head(view.perturb(x_all[idx])))
            logits = view.tail(features)
            loss = F.cross_entropy(logits, y_all[idx])
            if moments is not None:
                loss = loss + self.match_traffic * _moment_distance(features, moments)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step >= self.steps - 100:  # accuracy over the last 100 batches, for the record
                correct += int((logits.argmax(1) == y_all[idx]).sum())
                seen += len(idx)
        self.shadow_accuracy = correct / max(seen, 1)
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        self.shadow_head = head
        self._perturb, self._obfuscate = view.perturb, view.obfuscate
        self._input_shape = view.input_shape
        self.iters, self.rmle_lr, self.tv, self.l2 = rmle_settings(
            view.point, self.iters, self.rmle_lr, self.tv, self.l2
        )
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        head = self.shadow_head
        if head is None:
            raise RuntimeError("call fit(victim) before invert(z)")
        perturb, obfuscate = self._perturb, self._obfuscate
        return rmle(lambda x: obfuscate(head(perturb(x))), z, self._input_shape, iters=self.iters, lr=self.rmle_lr,
                    tv=self.tv, l2=self.l2, progress=self.progress, desc="query-free rMLE")

    def config(self) -> dict:
        shadow = self.shadow if isinstance(self.shadow, str) else type(self.shadow).__name__
        return {"name": self.name, "shadow": shadow, "steps": self.steps, "match_traffic": self.match_traffic,
                "iters": self.iters, "rmle_lr": self.rmle_lr, "tv": self.tv, "l2": self.l2}


def _moment_distance(features: torch.Tensor, moments: FeatureMoments) -> torch.Tensor:
    """Mean over channels of the squared differences of mean and std, in units of the traffic's std."""
    # Channels that never vary (dead ReLUs) must not weigh without bound.
    unit = moments.std.clamp_min(1e-3 * moments.std.mean().item() + 1e-12)
    mean, std = features.mean(moments.dims), features.std(moments.dims, correction=0)
    return (((mean - moments.mean) / unit) ** 2 + ((std - moments.std) / unit) ** 2).mean()
