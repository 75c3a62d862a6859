"""One cell's measurement: the single pipeline the experiment engine and ``splitshield attack`` share.

A cell is (trained target, defense, attack setting, evaluated images, seed). Two functions measure it:

- :func:`measure_target` — what belongs to the trained target whatever the attack: task accuracy with the
  defense as deployed, the conditional-entropy MSE floor, the clean feature's and the noise's scale;
- :func:`measure_attack` — the attacker's view (threat model, auxiliary data, the traffic the cloud
  observed), the fitted attack, and its reconstructions of the evaluated images (or its label accuracy).

**One seeding rule.** The attacker's randomness comes from :func:`attack_seed` (spec seed, attack setting)
alone: the same attack setting and seed draw the same auxiliary sample, decoder initialisation and defense
noise whichever defense it attacks (common random numbers, so paired comparisons of defenses compare
defenses, not attacker luck), and whichever path (``splitshield run`` or ``splitshield attack``) runs it.
Attacks and the victim draw from generators of their own: the caller's global RNG is left as it was.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attacks.base import seeded
from .config import METRICS
from .data import Dataset, ImageSet
from .defenses.base import Compose, Defense
from .errors import SplitShieldError
from .models.split import SplitModel

INVERSION_METRICS = ("mse", "psnr", "ssim")
#: Training images the conditional-entropy floor and the feature's scale are measured on: each class's image
#: covariance needs more samples than pixels, or its rank deficit drives the H(x) estimate, and so the floor,
#: towards 0.
FLOOR_IMAGES = 5000


@dataclass
class AttackResult:
    """One attack's numbers on one cell: ``metrics`` rows ``(name, image index or -1 for the mean, value)``,
    and for an inversion attack the evaluated images and their reconstructions (float [N, C, H, W] in [0, 1])."""

    metrics: list[tuple[str, int, float]]
    original: np.ndarray | None = None
    reconstruction: np.ndarray | None = None


def attack_seed(seed: int, setting: dict[str, Any]) -> int:
    """The attacker's 31-bit seed for an attack ``setting`` (the spec's concrete attack entry) under ``seed``."""
    from .experiment import config_hash, derived_seed

    return derived_seed(seed, config_hash({"attack": setting}))




def _test_images(data: Dataset, test_n: int | None) -> ImageSet:
    return data.test if test_n is None else data.test.take(test_n)


@dataclass
class FittedAttack:
    """An attack fitted by :func:`fit_attack`, the victim it attacks and the images it is evaluated on."""

    attack: Any
    victim: Any
    evaluated: ImageSet
    seed: int


def fit_attack(target: SplitModel, defense: Defense | None, data: Dataset, setting: dict[str, Any], *,
               images: str | int, seed: int, device: str | torch.device = "cpu",
               progress: bool = False) -> FittedAttack:
    """Build the attacker's view of ``target`` + ``defense`` and fit the attack ``setting`` on it.

    Parameters
    ----------
    setting:
        ``{"name", "threat", "aux", "aux_n", "adaptive", "params"}`` (an entry of
        :meth:`ExperimentSpec.attack_settings`): the attack's registry name, its threat model, auxiliary
        data kind and size, whether it knows the defense, and its constructor arguments.
    images:
        The evaluated test images: ``"first_per_class"`` or the first n. The cloud's traffic (features of
        other test images, for the query-free attacker) never includes them.
    seed:
        The attacker's seed, from :func:`attack_seed`.
    """
    from .attacks import ATTACKS, Victim, attack_name
    from .attacks.base import TRAFFIC_IMAGES
    from .data import evaluation_split

    aux = data.aux(setting["aux"], n=setting["aux_n"], seed=seed)
    evaluated, traffic = evaluation_split(data.test, images, TRAFFIC_IMAGES)
    victim = Victim(target, defense, threat=setting["threat"], aux=aux, adaptive=setting["adaptive"], seed=seed,
                    traffic=traffic)
    cls = ATTACKS[attack_name(setting["name"])]
    accepted = inspect.signature(cls).parameters
    kwargs = {**setting["params"], **{k: v for k, v in (("seed", seed), ("progress", progress)) if k in accepted}}
    attack = cls(**kwargs)
    attack.fit(victim)  # attacks draw from generators of their own, seeded by ``seed``
    return FittedAttack(attack, victim, evaluated, seed)


def measure_attack(target: SplitModel, defense: Defense | None, data: Dataset, setting: dict[str, Any], *,
                   images: str | int, seed: int, test_n: int | None = None,
                   metrics: tuple[str, ...] | list[str] = METRICS, device: str | torch.device = "cpu",
                   progress: bool = False) -> AttackResult:
    """Fit the attack ``setting`` (:func:`fit_attack`) and measure it on the evaluated images.

    A completion attack's label accuracy is measured on the first ``test_n`` test images (all when ``None``).
    """
    from . import metrics as M
    from .attacks import CompletionAttack

    fitted = fit_attack(target, defense, data, setting, images=images, seed=seed, device=device, progress=progress)
    attack, victim = fitted.attack, fitted.victim
    if isinstance(attack, CompletionAttack):
        if "completion_accuracy" not in metrics:
            return AttackResult([])
        test = _test_images(data, test_n)
        correct = sum(int((attack.predict(victim.observe(x)).argmax(1).cpu() == y.cpu()).sum())
                      for x, y in test.batches(1000, device=device))
        return AttackResult([("completion_accuracy", -1, correct / len(test))])
    x = fitted.evaluated.tensors(device)[0]
    x_hat = attack.invert(victim.observe(x)).detach().cpu()
    x = x.cpu()
    rows: list[tuple[str, int, float]] = []
    for name in INVERSION_METRICS:
        if name in metrics:
            per_image = getattr(M, name)(x_hat, x, reduction="none")
            rows += [(name, i, float(v)) for i, v in enumerate(per_image)]
            rows.append((name, -1, float(per_image.mean())))
    return AttackResult(rows, x.numpy(), x_hat.numpy())


@torch.no_grad()
def measure_target(target: SplitModel, defense: Defense | None, data: Dataset, *, test_n: int | None = None,
                   metrics: tuple[str, ...] | list[str] = METRICS,
                   device: str | torch.device = "cpu") -> list[tuple[str, int, float]]:
    """The trained target's own numbers, as ``(name, -1, value)`` rows for the wanted ``metrics``.

    ``accuracy``: on the first ``test_n`` test images with the defense as deployed. ``ce_floor``: the MSE floor
    implied by the defense's Gaussian noise (:func:`ce_floor`, fitted on :data:`FLOOR_IMAGES` training
    images), absent without such noise. ``feature_std``: the
    standard deviation of the clean sent feature (``defense.clean(head(x))``, every element of
    :data:`FLOOR_IMAGES` training images); ``noise_std``: the standard deviation per element of all the
    additive noise the defense puts on it (fixed and learned), so that their ratio is the noise's relative
    strength.
    """
    from .defenses import NoDefense
    from .train import evaluate

    defense = defense or NoDefense()
    target.eval()
    defense.eval()
    rows: list[tuple[str, int, float]] = []
    if "accuracy" in metrics:
        rows.append(("accuracy", -1, evaluate(target, defense, _test_images(data, test_n), device=device)))
    if not {"ce_floor", "feature_std", "noise_std"} & set(metrics):
        return rows
    x, labels = data.train.take(FLOOR_IMAGES).tensors(device)
    z_clean = defense.clean(target.head(defense.perturb(x, training=False)))
    if "feature_std" in metrics:
        rows.append(("feature_std", -1, float(z_clean.std())))
    if "noise_std" in metrics:
        rows.append(("noise_std", -1, additive_noise_std(defense, target.feature_shape())))
    if "ce_floor" in metrics:
        with seeded(0):  # parts before the noise that draw at inference draw the same every time
            floor = ce_floor(x, labels, target, defense)
        if floor is not None:
            rows.append(("ce_floor", -1, floor))
    return rows


class WireStage(Defense):
    """The network between edge and cloud as the last stage of a defense: at inference the feature becomes what
    the server decodes from the edge client's frames (:func:`~splitshield.runtime.codec.wire_roundtrip`); in
    training it is the identity (the model was trained on float features). Gradients pass straight through,
    so an adaptive white-box attacker can still optimise through it."""

    name = "wire"

    def __init__(self, dtype: str = "float32", compress: str | None = None, batch_size: int = 1):
        from .runtime.codec import WireFormat

        super().__init__()
        self.format = WireFormat(dtype, compress)
        self.batch_size = batch_size

    def obfuscate(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        from .runtime.codec import wire_roundtrip

        if training:
            return z
        return z + (wire_roundtrip(z.detach(), self.format, batch_size=self.batch_size) - z).detach()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.format.dtype, "compress": self.format.compress,
                "batch_size": self.batch_size}


def through_wire(defense: Defense | None, dtype: str = "float32", compress: str | None = None,
                 batch_size: int = 1) -> Compose:
    """``defense`` followed by the wire (:class:`WireStage`): what the cloud receives when it is deployed."""
    from .defenses import NoDefense

    parts = _parts(defense or NoDefense())
    return Compose(*parts, WireStage(dtype, compress, batch_size))


def _parts(defense: Defense) -> list[Defense]:
    return list(defense.parts) if isinstance(defense, Compose) else [defense]


def _is_gaussian(part: Defense) -> bool:
    from .defenses import DPNoise, GaussianNoise

    return (isinstance(part, GaussianNoise) and part.on == "feature") or (
        isinstance(part, DPNoise) and part.mechanism == "gaussian")


def additive_noise_std(defense: Defense, feature_shape: tuple[int, ...]) -> float:
    """Standard deviation per element of all the additive noise ``defense`` puts on the feature: fixed noise
    (``std_for``) and learned noise (``learned_std``, e.g. Shredder's), independent, so their variances add."""
    from .defenses import noise_std

    learned = [p.learned_std() for p in _parts(defense) if callable(getattr(p, "learned_std", None))]
    return math.sqrt(noise_std(defense, feature_shape) ** 2 + sum(s**2 for s in learned))


@torch.no_grad()
def ce_floor(x: torch.Tensor, labels: torch.Tensor, target: SplitModel, defense: Defense) -> float | None:
    """The MSE floor (:func:`~splitshield.metrics.conditional_entropy_floor`) that the defense's Gaussian noise
    implies for any inversion of the sent feature; ``None`` without Gaussian noise on the feature.

    The floor is taken where the first Gaussian part adds its noise: the feature there is the head's output
    through the parts before it (as deployed), and σ² sums the variances of that part and of the Gaussian
    parts directly after it (independent noises add). Whatever follows can only destroy information, so the
    floor holds for what is finally sent (data-processing inequality).
    """
    from .metrics import conditional_entropy_floor

    parts = _parts(defense)
    first = next((i for i, p in enumerate(parts) if _is_gaussian(p)), None)
    if first is None:
        return None
    run = first
    while run < len(parts) and _is_gaussian(parts[run]):
        run += 1
    z = target.head(defense.perturb(x, training=False))
    for part in parts[:first]:
        z = part.obfuscate(z, training=False)
    dim = math.prod(target.feature_shape())
    sigma = math.sqrt(sum(p.std_for(dim) ** 2 for p in parts[first:run]))
    try:
        return float(conditional_entropy_floor(x.cpu(), z.cpu(), sigma, labels=labels.cpu())["mse_floor"])
    except (SplitShieldError, ValueError, RuntimeError):
        return None
