"""UnSplit: inversion knowing only the head's architecture (Erdogan, Küpçü, Çiçek, WPES 2022; ALGORITHMS §G.4).

The attacker sees the features z the device sends and knows the head's architecture, nothing else: no
weights, no queries, no data. It recovers the images and a clone of the head together, alternating between
the two unknowns, batched over the images (one estimate per image, one clone for the whole batch):

    Input:  features z [B, ...]; ``restarts`` heads g_θ of the head's architecture, each θ drawn at ``fit``;
            send(x) = obfuscate(g_θ(perturb(x))), the defense's mechanism (identity when non-adaptive)
    for each restart (its own clone g_θ):
        x̂ ← ½ (grey)                                                [B, C, H, W], float in [0, 1]
        repeat ``rounds`` times:
            x̂ ← rMLE from x̂: ``input_iters`` Adam steps (lr ``input_lr``, x̂ clipped to [0, 1]) on
                 Σ_b mean((send(x̂_b) − z_b)²) + λ_TV·TV(x̂_b) + λ_l2·mean(x̂_b²)
            θ ← ``model_iters`` Adam steps (lr ``model_lr``, its state kept across rounds) on
                 Σ_b mean((send(x̂_b) − z_b)²)
    per image, keep the restart whose relative residual ‖send(x̂_b) − z_b‖² / ‖z_b‖² is lowest
    if ``stretch``: x̂_b ← (x̂_b − min x̂_b) / (max x̂_b − min x̂_b)
    Output: x̂ [B, C, H, W] in [0, 1], and the stolen heads g_θ

Where a clone starts decides much of where it ends (a poor start stalls with a high residual, or finds the
images' negative), so the restarts, ranked by the attacker's own criterion (the residual, never the private
images), make the attack far less a matter of luck.

The clone absorbs any affine change of the images' intensities (a scale into its first layer's weights, a
shift into its biases), so the features fix x̂ only up to one. The L2 prior pulls towards black, as the
authors' does, which picks the polarity; ``stretch`` (the min-max ``normalize`` the authors' code applies to
colour images) then takes each image to span [0, 1]. Against a defended device the adaptive attacker
optimises through the defense's mechanism, its noise re-drawn at every step from the attack's seed.

Unlike the authors' code, each round's input steps are one warm-started rMLE run (:func:`~._rmle.rmle`: its
Adam state starts afresh each round), and a batch shares one clone where their code carries one clone from
image to image.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from ._params import flag, non_negative, non_negative_int, positive, positive_int
from ._rmle import rmle
from .base import ArchitectureOnlyView, InversionAttack, seeded


class UnSplit(InversionAttack):
    """Alternating inversion of the features and of a clone of the head, from the head's architecture alone.

    Parameters
    ----------
    rounds:
        Alternations of input and clone steps (> 0) per restart.
    input_iters, input_lr:
        Adam steps (> 0) on the images per round, and their step size (> 0).
    model_iters, model_lr:
        Adam steps (> 0) on the clone's weights per round, and their step size (> 0).
    tv, l2:
        Weights (>= 0) of the total-variation prior and of the pull towards black (mean x̂²).
    restarts:
        Independent clones (> 0), each optimised with its own estimates; per image the lowest residual is kept.
    stretch:
        Stretch each reconstruction to span [0, 1] (see the module docstring).
    seed:
        Seeds the clone's initial weights and the defense's noise the adaptive attacker draws.
    progress:
        Show a progress bar over the rounds.

    Fitted attributes
    -----------------
    view_:
        The architecture-only view of the victim.
    initial_heads_:
        Per restart the clone's initial weights (frozen), drawn from ``seed`` by every ``fit``; each
        ``invert`` starts from them.
    heads_, chosen_, residual_:
        Set by each ``invert``: per restart the clone as its last round left it (frozen), and per image [B]
        the restart kept and its relative residual ``‖send(x̂) − z‖² / ‖z‖²`` before stretching (one noise
        draw).
    """

    threats = ("architecture_only",)
    name = "unsplit"

    def __init__(self, rounds: int = 50, input_iters: int = 20, model_iters: int = 20, input_lr: float = 5e-2,
                 model_lr: float = 1e-3, tv: float = 0.1, l2: float = 1.0, restarts: int = 4, stretch: bool = True,
                 seed: int = 0, progress: bool = True):
        self.rounds = positive_int("rounds", rounds)
        self.input_iters, self.model_iters = positive_int("input_iters", input_iters), positive_int(
            "model_iters", model_iters)
        self.input_lr, self.model_lr = positive("input_lr", input_lr), positive("model_lr", model_lr)
        self.tv, self.l2 = non_negative("tv", tv), non_negative("l2", l2)
        self.restarts = positive_int("restarts", restarts)
        self.stretch = flag("stretch", stretch)
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    def _fit(self, view: ArchitectureOnlyView) -> UnSplit:  # type: ignore[override]
        from ..measure import derived_seed

        self.view_ = view
        # Not drawn from ``seed`` itself: the default seed 0 would redraw the model zoo's default initialisation
        # (``build_model(seed=0)``), the very weights the victim's head was trained from.
        with seeded(derived_seed(self.seed, "unsplit clone")):
            self.initial_heads_ = [view.head_architecture().eval().requires_grad_(False)
                                   for _ in range(self.restarts)]
        return self

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        z = z.detach()
        runs = [self._run(z, head, restart) for restart, head in enumerate(self.initial_heads_)]
        self.heads_ = [head for _, _, head in runs]
        residuals = torch.stack([residual for _, residual, _ in runs])  # [R, B]
        images = torch.arange(z.shape[0], device=z.device)
        self.chosen_ = residuals.argmin(0)
        self.residual_ = residuals[self.chosen_, images]
        x_hat = torch.stack([x for x, _, _ in runs])[self.chosen_, images]
        return _stretch(x_hat) if self.stretch else x_hat

    def _run(self, z: torch.Tensor, initial: nn.Module,
             restart: int) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
        """One restart from the clone ``initial``: the estimates [B, C, H, W], their residuals [B], the clone."""
        view, clone = self.view_, copy.deepcopy(initial)
        params = list(clone.parameters())
        # A head without weights (a fixed transform) leaves nothing to steal: the rounds are input steps only.
        opt = torch.optim.Adam(params, lr=self.model_lr, amsgrad=True) if params else None

        def send(x: torch.Tensor) -> torch.Tensor:
            return view.obfuscate(clone(view.perturb(x)))

        x_hat = torch.full((z.shape[0], *view.input_shape), 0.5, device=z.device)
        with seeded(self.seed + restart):
            desc = f"UnSplit {restart + 1}/{self.restarts}"
            for _ in tqdm(range(self.rounds), desc=desc, disable=not self.progress, leave=False):
                clone.requires_grad_(False)
                x_hat = rmle(send, z, view.input_shape, iters=self.input_iters, lr=self.input_lr, tv=self.tv,
                             l2=self.l2, init=0.0, start=x_hat)
                if opt is None:
                    continue
                clone.requires_grad_(True)
                for _ in range(self.model_iters):
                    loss = (send(x_hat) - z).pow(2).flatten(1).mean(1).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            clone.requires_grad_(False)
            with torch.no_grad():
                residual = (send(x_hat) - z).pow(2).flatten(1).sum(1) / z.pow(2).flatten(1).sum(1).clamp_min(1e-30)
        return x_hat, residual, clone

    def config(self) -> dict:
        return {"name": self.name, "rounds": self.rounds, "input_iters": self.input_iters,
                "model_iters": self.model_iters, "input_lr": self.input_lr, "model_lr": self.model_lr,
                "tv": self.tv, "l2": self.l2, "restarts": self.restarts, "stretch": self.stretch, "seed": self.seed}


def _stretch(x: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] mapped linearly onto [0, 1]; a constant image is left as it is."""
    lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    span = x.flatten(1).amax(1).view(-1, 1, 1, 1) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), x)
