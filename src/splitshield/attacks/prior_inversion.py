"""Inversion through a learned image prior: GLASS's idea at CPU size (Li et al., NeurIPS 2023; ALGORITHMS §G.5).

rMLE searches all of pixel space, held back only by a smoothness (TV) prior. At a deep cut many images give
nearly the same feature, and TV picks a smooth blob among them rather than an image. GLASS searches instead
the latent space of a generator of natural images, so every candidate is an image of the kind the generator
learned, and then refines in pixel space from there. GLASS uses a pre-trained StyleGAN; here the attacker
trains a small convolutional VAE on its own auxiliary images, then inverts in its latent space, batched over
the images:

    fit:
        aux images → D_gen (all but the last ``holdout``, at most a quarter) and D_held (the last ``holdout``)
        G ← decoder of a VAE trained ``steps`` Adam steps on D_gen (ELBO: per-pixel BCE + β·KL)
        send(x) = obfuscate(head(perturb(x)))      white_box: the head and the defense's mechanism (adaptive)
                  obfuscate(shadow(perturb(x)))    query_free: the shadow head of a QueryFreeInversion fitted
                                                   on D_gen (its shadow training, with this attack's seed)
        on D_held: z_h ← send(x_h); invert z_h as below, refining with every (λ_TV, lr) of the grid
            (``REFINE_TV_GRID`` × ``REFINE_LR_GRID``, or the given ``refine_tv``/``refine_lr``), and keep the
            refinement, or (``keep_refined="auto"``) no refinement, whose images have the best mean PSNR
            against x_h: the attacker's own images, never the private ones
            (query_free with ``keep_refined="auto"``: no refinement, nothing to choose; see below)
    invert(z):                                     z [B, ...]
        w_{r,b} ← s_r for every image b; s_0 = 0, s_1..s_{R-1} ~ N(0, I)   (R = ``restarts``; drawn from the seed)
        ``latent_iters`` Adam steps (lr ``latent_lr``, β₂ = 0.9) on
            Σ_{r,b} mean((send(G(w_{r,b})) − z_b)²) + λ_w·mean(w_{r,b}²)
        per image b, keep the restart r* with the lowest relative residual ‖send(G(w_{r,b})) − z_b‖² / ‖z_b‖²
            (averaged over ``RESIDUAL_DRAWS`` draws of the defense's noise, the same for every restart)
        x_lat ← G(w_{r*,b})                         the latent image: on the generator's range
        if refinement is kept: x ← rMLE from x_lat (``refine_iters`` Adam steps, the chosen λ_TV and lr, x in
                                [0, 1]); else x ← x_lat
        Output: x [B, C, H, W] in [0, 1]

Each image's loss is summed over the batch, never averaged (ALGORITHMS §F.4), and every image starts from the
same R codes, so an image's reconstruction does not depend on the others in its batch (a defense's noise
aside, which is drawn for the whole batch).

Why the refined image replaces the latent one by a choice on held-out images and not by the residual: the
refinement minimises the residual, starting from the latent image, so the residual would always pick it; yet
at a deep cut a lower residual is exactly what leads rMLE away from natural images. The held-out images tell,
per cut and per defense, whether refinement helps and with which TV weight, from the only ground truth the
attacker has. ``keep_refined="always"`` keeps the refinement regardless. The choice is by PSNR, as the other
attacks' searches are; the latent images often have the higher SSIM (a refinement sharpens the strokes and
adds faint noise to flat backgrounds).

Under query_free that check cannot be made: the attacker computes its held-out images' features with the
shadow head, which inverts them easily, while the observed features come from the device's head, which the
shadow only resembles. A refinement fits the observed features through the wrong map, and the held-out
images do not show it (on LeNet/MNIST the refinement they chose fell below the latent images alone, and below
He et al.'s shadow-head rMLE). So there ``keep_refined="auto"`` returns the latent images; ``"always"`` refines,
its settings chosen through the shadow.

The latent search uses Adam with β₂ = 0.9, not 0.999: the residual falls by orders of magnitude within the
run, and with a slow second-moment average the steps shrink with it long before the code has converged.

``benchmarks/prior_inversion.py`` measures this attack against white-box rMLE at LeNet's deep cuts (PSNR, SSIM
and time); ``examples/attacks_lenet.yaml`` and ``examples/attacks_cifar.yaml`` run it beside every other attack.

The generator is the attacker's: trained on the same auxiliary images the other attacks get, it knows nothing
of the private images but their distribution. Against a defended device the adaptive attacker optimises
through the defense's mechanism, its noise re-drawn at every step from the attack's seed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import metrics
from ..data import ImageSet
from ._params import flag, non_negative, non_negative_int, one_of, optional, positive, positive_int
from ._rmle import rmle
from .base import InversionAttack, QueryFreeView, VictimView, seeded

KEEP_REFINED = ("auto", "always")
#: Fraction of the VAE's training over which the KL weight rises linearly from 0 to β.
WARMUP = 0.25
#: The refinements (λ_TV × lr) ``fit`` tries on the held-out aux images when ``refine_tv``/``refine_lr`` are ``None``.
REFINE_TV_GRID = (0.01, 0.1, 1.0)
REFINE_LR_GRID = (0.01, 0.03)
#: (λ_TV, lr) of the refinement when they cannot be chosen (no held-out images).
REFINE_FALLBACK = (0.1, 0.01)
#: The attributes each ``invert`` sets.
_PER_INVERT = ("restart_codes_", "restart_residuals_", "chosen_", "codes_", "residual_", "latent_images_")
#: Draws of the defense's noise each restart's residual is averaged over (the same draws for every restart).
RESIDUAL_DRAWS = 4
#: PSNR cap (dB) when comparing latent and refined images on the held-out aux images: exact inversions tie.
_PSNR_CAP = 100.0


def _stages(height: int, width: int) -> int:
    """Stride-2 stages of the generator: the coarsest map is about 7 pixels on the shorter side (1 to 5 stages)."""
    return min(5, max(1, round(math.log2(max(min(height, width), 1) / 7))))


class ConvVAE(nn.Module):
    """A small convolutional VAE for images of any shape (C, H, W) in [0, 1].

    The decoder maps a code [B, latent] by a linear layer to ``width`` channels at the coarsest size, then
    doubles the size ``stages`` times by transposed convolutions (halving the channels, at least 8) and
    centre-crops to H×W; a sigmoid maps to [0, 1]. The encoder mirrors it with strided convolutions at half the
    decoder's widths (it only teaches the decoder during training) and an adaptive pooling to the coarsest size,
    so any H×W fits.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent: int, width: int):
        super().__init__()
        channels, height, wide = image_shape
        self.image_shape, self.latent = tuple(image_shape), latent
        stages = _stages(height, wide)
        self.base = (math.ceil(height / 2**stages), math.ceil(wide / 2**stages))
        widths = [max(width // 2**k, 8) for k in range(stages)]  # coarsest first
        cells = widths[0] * self.base[0] * self.base[1]
        down: list[nn.Module] = []
        c = channels
        for w in reversed(widths):
            down += [nn.Conv2d(c, max(w // 2, 8), 4, stride=2, padding=1), nn.ReLU()]
            c = max(w // 2, 8)
        self.encoder = nn.Sequential(*down, nn.AdaptiveAvgPool2d(self.base), nn.Flatten(),
                                     nn.Linear(c * self.base[0] * self.base[1], 2 * latent))
        up: list[nn.Module] = [nn.Linear(latent, cells), nn.ReLU(), nn.Unflatten(1, (widths[0], *self.base))]
        for k in range(stages):
            last = k == stages - 1
            out = channels if last else widths[k + 1]
            up.append(nn.ConvTranspose2d(widths[k], out, 4, stride=2, padding=1))
            if not last:
                up.append(nn.ReLU())
        self.decoder = nn.Sequential(*up)

    def logits(self, w: torch.Tensor) -> torch.Tensor:
        """The decoder's pre-sigmoid output for codes ``w`` [B, latent], cropped to the image: [B, C, H, W]."""
        y = self.decoder(w)
        _, height, wide = self.image_shape
        top, left = (y.shape[2] - height) // 2, (y.shape[3] - wide) // 2
        return y[:, :, top:top + height, left:left + wide]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] for codes ``w`` [B, latent]: the generator G."""
        return torch.sigmoid(self.logits(w))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance [B, latent] for images ``x``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def loss(self, x: torch.Tensor, noise: torch.Tensor, beta: float) -> torch.Tensor:
        """The negative ELBO per image [B] (BCE summed over the pixels + β·KL), with ``noise`` ~ N(0, I) [B, latent]."""
        mu, logvar = self.encode(x)
        w = mu + (0.5 * logvar).exp() * noise
        recon = F.binary_cross_entropy_with_logits(self.logits(w), x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return recon + beta * kl


class PriorInversion(InversionAttack):
    """Inversion in the latent space of a VAE trained on the attacker's auxiliary images (module docstring).

    Parameters
    ----------
    latent:
        The generator's code size (> 0).
    width:
        Channels of the generator's coarsest feature map (> 0; halved at each finer one, at least 8).
    steps, batch_size, lr, beta:
        The VAE's training (steps, batch_size, lr > 0; β >= 0 weighs the KL term): Adam, cosine-decayed lr.
    restarts:
        Starting codes per image (> 0): w = 0, then draws from N(0, I); per image the lowest residual is kept.
    latent_iters, latent_lr, latent_l2:
        The latent search: Adam steps (> 0), its step size (> 0), and λ_w (>= 0), the weight of mean(w²).
    refine_iters:
        Steps (>= 0) of the pixel-space rMLE from the latent images; 0: none, the latent images are returned.
    refine_tv, refine_lr:
        Its λ_TV (>= 0) and step size (> 0); ``None``: chosen at ``fit`` on the held-out aux images among
        ``REFINE_TV_GRID`` × ``REFINE_LR_GRID`` (without held-out images: ``REFINE_FALLBACK``).
    keep_refined:
        ``"auto"``: return the refined images only if on the held-out aux images they beat the latent ones
        (mean PSNR; see the module docstring), never under query_free; ``"always"``: whenever ``refine_iters``
        > 0.
    holdout:
        Aux images (>= 0) kept from the VAE to make the choices above (at most a quarter of the aux set);
        with none, ``"auto"`` keeps the latent images.
    shadow_steps:
        ``query_free`` only: training steps (> 0) of the shadow head; ``None``: the
        :class:`~splitshield.attacks.QueryFreeInversion` default. The shadow is that attack's, fitted with this
        attack's seed on the aux images the VAE learns from.
    seed:
        Seeds the generator's initialisation and batches, the restarts' codes, the shadow and the defense's
        noise the adaptive attacker draws.
    progress:
        Show progress bars over the training and the inversion.

    Fitted attributes
    -----------------
    generator_:
        The trained VAE (frozen); ``generator_(w)`` is G.
    vae_loss_:
        The VAE's mean negative ELBO per image over its last 100 training batches.
    shadow_:
        ``query_free``: the fitted :class:`~splitshield.attacks.QueryFreeInversion` whose shadow head the attack
        inverts through; ``None`` under ``white_box``.
    refine_tv_, refine_lr_, keep_refined_:
        The refinement's settings in use, and whether ``invert`` returns the refined images.
    calibration_:
        Mean PSNR in dB (capped at 100) on the held-out aux images of the latent images (key ``None``) and of
        each refinement tried (key ``(λ_TV, lr)``); ``{}`` when nothing was chosen on them.
    view_:
        The victim's view.
    restart_codes_, restart_residuals_, chosen_, codes_, residual_, latent_images_:
        Set by each ``invert``: per restart and image the final codes [R, B, latent] and relative residuals
        ``‖send(G(w)) − z‖² / ‖z‖²`` [R, B] (averaged over ``RESIDUAL_DRAWS`` noise draws); per image the
        restart kept [B], its code [B, latent] and residual [B], and its image G(code) [B, C, H, W] before any
        refinement.
    """

    threats = ("white_box", "query_free")
    name = "prior_inversion"

    def __init__(self, latent: int = 32, width: int = 32, steps: int = 1000, batch_size: int = 64,
                 lr: float = 2e-3, beta: float = 1.0, restarts: int = 2, latent_iters: int = 200,
                 latent_lr: float = 0.2, latent_l2: float = 1e-3, refine_iters: int = 400,
                 refine_tv: float | None = None, refine_lr: float | None = None, keep_refined: str = "auto",
                 holdout: int = 8, shadow_steps: int | None = None, seed: int = 0, progress: bool = True):
        self.latent, self.width = positive_int("latent", latent), positive_int("width", width)
        self.steps, self.batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
        self.lr, self.beta = positive("lr", lr), non_negative("beta", beta)
        self.restarts = positive_int("restarts", restarts)
        self.latent_iters = positive_int("latent_iters", latent_iters)
        self.latent_lr, self.latent_l2 = positive("latent_lr", latent_lr), non_negative("latent_l2", latent_l2)
        self.refine_iters = non_negative_int("refine_iters", refine_iters)
        self.refine_tv = optional(non_negative, "refine_tv", refine_tv)
        self.refine_lr = optional(positive, "refine_lr", refine_lr)
        self.keep_refined = one_of("keep_refined", keep_refined, KEEP_REFINED)
        self.holdout = non_negative_int("holdout", holdout)
        self.shadow_steps = optional(positive_int, "shadow_steps", shadow_steps)
        self.seed = non_negative_int("seed", seed)
        self.progress = flag("progress", progress)

    # ------------------------------------------------------------------------------------------ fit

    def _refine_grid(self) -> list[tuple[float, float]]:
        """The refinements (λ_TV, lr) ``fit`` chooses among: the given values, the grids for ``None``."""
        tvs = REFINE_TV_GRID if self.refine_tv is None else (self.refine_tv,)
        lrs = REFINE_LR_GRID if self.refine_lr is None else (self.refine_lr,)
        return [(t, r) for t in tvs for r in lrs]

    def _fit(self, view: VictimView) -> PriorInversion:
        aux = view.require_aux(type(self).__name__)
        for attr in _PER_INVERT:  # a refit starts afresh: no reconstruction of the last invert is left
            self.__dict__.pop(attr, None)
        grid = self._refine_grid()
        # Under query_free the held-out images' features are the shadow's own: they cannot tell (module docstring).
        trust_held = not isinstance(view, QueryFreeView)
        choose = self.refine_iters > 0 and ((self.keep_refined == "auto" and trust_held) or
                                            (self.keep_refined == "always" and len(grid) > 1))
        held_n = min(self.holdout, len(aux) // 4) if choose else 0
        rest = aux.subset(list(range(len(aux) - held_n)))
        self.view_, self.shadow_ = view, None
        if isinstance(view, QueryFreeView):
            from .query_free import QueryFreeInversion

            params = {} if self.shadow_steps is None else {"steps": self.shadow_steps}
            self.shadow_ = QueryFreeInversion(**params, seed=self.seed, progress=self.progress).fit(
                dataclasses.replace(view, aux=rest))
        self.generator_, self.vae_loss_ = self._train_generator(rest)
        fallback = (REFINE_FALLBACK[0] if self.refine_tv is None else self.refine_tv,
                    REFINE_FALLBACK[1] if self.refine_lr is None else self.refine_lr)
        self.refine_tv_, self.refine_lr_ = grid[0] if len(grid) == 1 else fallback
        self.keep_refined_ = self.refine_iters > 0 and self.keep_refined == "always"
        self.calibration_: dict[tuple[float, float] | None, float] = {}
        if held_n > 0:
            x, _ = aux.subset(list(range(len(aux) - held_n, len(aux)))).tensors()
            self._calibrate(x, grid)
        return self

    def _train_generator(self, images: ImageSet) -> tuple[ConvVAE, float]:
        """A VAE trained on ``images``, frozen, and its mean loss per image over the last 100 batches."""
        from ..measure import derived_seed

        # Not the attack's seed itself, which seeds other draws (and, for 0, the model zoo's default weights).
        seed = derived_seed(self.seed, "prior generator")
        with seeded(seed):
            vae = ConvVAE(self.view_.input_shape, self.latent, self.width)
        x_all, _ = images.tensors()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(vae.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps, eta_min=self.lr * 0.05)
        vae.train()
        total = seen = 0.0
        for step in tqdm(range(self.steps), desc="train prior (VAE)", disable=not self.progress, leave=False):
            idx = torch.randint(len(x_all), (min(self.batch_size, len(x_all)),), generator=g)
            beta = self.beta * min(1.0, step / (WARMUP * self.steps))  # KL warm-up: no early collapse to the mean
            loss = vae.loss(x_all[idx], torch.randn(len(idx), self.latent, generator=g), beta)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()  # a mean over the batch is fine here: Adam's eps is tiny, and this is training
            opt.step()
            sched.step()
            if step >= self.steps - 100:
                total, seen = total + float(loss.detach().sum()), seen + len(idx)
        vae.eval().requires_grad_(False)
        return vae, total / max(seen, 1)

    def _calibrate(self, x: torch.Tensor, grid: list[tuple[float, float]]) -> None:
        """Choose the refinement (and with ``keep_refined="auto"`` whether to refine) on held-out aux images ``x``."""
        from ..measure import derived_seed

        with torch.no_grad(), seeded(derived_seed(self.seed, "prior held-out features")):
            z = self._send(x)
        latent = self._latent(z)
        refined = self._refine(z, latent, grid).view(len(grid), *x.shape)
        candidates: list[tuple[tuple[float, float] | None, torch.Tensor]] = [
            (setting, refined[k]) for k, setting in enumerate(grid)]
        if self.keep_refined == "auto":
            candidates.insert(0, (None, latent))
        for key, images in candidates:
            score = float(metrics.psnr(images, x, reduction="none").clamp(max=_PSNR_CAP).mean())
            self.calibration_[key] = score if math.isfinite(score) else -math.inf
        # Best mean PSNR; among ties, no refinement, then the weakest TV (the order of ``candidates``).
        best = max((key for key, _ in candidates), key=lambda k: self.calibration_[k])
        self.keep_refined_ = best is not None
        if best is not None:
            self.refine_tv_, self.refine_lr_ = best
        for attr in _PER_INVERT:  # those were the held-out images'; ``invert`` sets them for the observed ones
            self.__dict__.pop(attr)

    def _send(self, x: torch.Tensor) -> torch.Tensor:
        """The feature the attacker's model of the device sends for ``x``: the head's, or the shadow head's."""
        view = self.view_
        if self.shadow_ is None:
            return view.send(x)
        return view.obfuscate(self.shadow_.shadow_heads_[0](view.perturb(x)))  # its one shadow (β = 3)

    # --------------------------------------------------------------------------------------- invert

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, C, H, W] in [0, 1] of the features ``z`` [B, ...] the device sent."""
        self._check_fitted()
        z = z.detach()
        latent = self._latent(z)
        if not self.keep_refined_:
            return latent
        return self._refine(z, latent, [(self.refine_tv_, self.refine_lr_)])

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        """The latent search: per image G(w) of the restart with the lowest residual [B, C, H, W]."""
        from ..measure import derived_seed

        b, r = z.shape[0], self.restarts
        g = torch.Generator().manual_seed(derived_seed(self.seed, "prior restarts"))
        starts = torch.cat([torch.zeros(1, self.latent), torch.randn(r - 1, self.latent, generator=g)])
        # Every image starts from the same R codes: its result does not depend on the rest of its batch.
        w = starts.to(z.device).repeat_interleave(b, 0).requires_grad_(True)  # [R·B, latent], restart-major
        zz = z.repeat(r, *([1] * (z.dim() - 1)))
        opt = torch.optim.Adam([w], lr=self.latent_lr, betas=(0.9, 0.9))
        generator = self.generator_
        with seeded(derived_seed(self.seed, "prior latent noise")):
            for _ in tqdm(range(self.latent_iters), desc="prior latent search", disable=not self.progress,
                          leave=False):
                loss = (self._send(generator(w)) - zz).pow(2).flatten(1).mean(1)
                if self.latent_l2:
                    loss = loss + self.latent_l2 * w.pow(2).mean(1)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
        w = w.detach()
        with torch.no_grad():
            x = generator(w)
            residual = self._residual(x, zz, b).view(r, b)
        images = torch.arange(b, device=z.device)
        self.restart_codes_, self.restart_residuals_ = w.view(r, b, -1), residual
        self.chosen_ = residual.argmin(0)
        self.codes_ = self.restart_codes_[self.chosen_, images]
        self.residual_ = residual[self.chosen_, images]
        self.latent_images_ = x.view(r, b, *x.shape[1:])[self.chosen_, images]
        return self.latent_images_

    def _refine(self, z: torch.Tensor, start: torch.Tensor, settings: list[tuple[float, float]]) -> torch.Tensor:
        """rMLE from ``start`` [B, C, H, W] with each refinement (λ_TV, lr), one batched run: [K·B, C, H, W],
        setting-major."""
        from ..measure import derived_seed

        k, b = len(settings), z.shape[0]
        tv = torch.tensor([s[0] for s in settings]).repeat_interleave(b)
        lr = torch.tensor([s[1] for s in settings], dtype=torch.float64).repeat_interleave(b)
        with seeded(derived_seed(self.seed, "prior refine noise")):
            return rmle(self._send, z.repeat(k, *([1] * (z.dim() - 1))), self.view_.input_shape,
                        iters=self.refine_iters, lr=lr if k > 1 else settings[0][1],
                        tv=tv if k > 1 else settings[0][0], l2=0.0, start=start.repeat(k, 1, 1, 1),
                        progress=self.progress, desc="prior refine")

    def _residual(self, x: torch.Tensor, z: torch.Tensor, block: int) -> torch.Tensor:
        """Relative residual ``‖send(x) − z‖² / ‖z‖²`` per row [N], averaged over ``RESIDUAL_DRAWS`` noise draws;
        every block of ``block`` rows (one restart) sees the same draws."""
        from ..measure import derived_seed

        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], block):
            rows = slice(start, start + block)
            for draw in range(RESIDUAL_DRAWS):
                with seeded(derived_seed(self.seed, f"prior residual {draw}")):
                    total[rows] += (self._send(x[rows]) - z[rows]).pow(2).flatten(1).sum(1).double()
        return (total / RESIDUAL_DRAWS / z.pow(2).flatten(1).sum(1).double().clamp_min(1e-30)).float()

    def config(self) -> dict:
        return {"name": self.name, "latent": self.latent, "width": self.width, "steps": self.steps,
                "batch_size": self.batch_size, "lr": self.lr, "beta": self.beta, "restarts": self.restarts,
                "latent_iters": self.latent_iters, "latent_lr": self.latent_lr, "latent_l2": self.latent_l2,
                "refine_iters": self.refine_iters, "refine_tv": self.refine_tv, "refine_lr": self.refine_lr,
                "keep_refined": self.keep_refined, "holdout": self.holdout, "shadow_steps": self.shadow_steps,
                "seed": self.seed}
