"""One cell's measurement: the single pipeline the experiment engine and ``splitshield attack`` share.

A cell is (trained target, defense, attack setting, evaluated images, seed). Two functions measure it:

- :func:`measure_target` — what belongs to the trained target whatever the attack: task accuracy with the
  defense as deployed, the conditional-entropy MSE floor (an estimate) and the Gaussian-channel bound on
  I(x; z) (certified), the clean feature's and the noise's scale;
- :func:`measure_attack` — the attacker's view (threat model, auxiliary data, the traffic the cloud
  observed), the fitted attack, and its reconstructions of the evaluated images (or its label accuracy).

**One seeding rule.** Every draw of a cell comes from :func:`attack_seed` (spec seed, the attacker's side of
its setting) alone, split by :func:`derived_seed` into independent streams for the auxiliary sample, the
device's noise on what the cloud observes, and the attacker (its initialisation and its own queries): the
same attack setting and seed draw the same whichever defense it attacks (common random numbers, so paired
comparisons of defenses compare defenses, not attacker luck), and whichever path (``splitshield run`` or
``splitshield attack``) runs it. The target's own numbers are seeded by the spec seed. The caller's global
RNG is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._random import seeded
from .config import DEFAULT_METRICS
from .data import Dataset, ImageSet
from .defenses.base import Compose, Defense
from .errors import ConfigError, SplitShieldError
from .metrics import conditional_entropy_floor, gaussian_channel_bound
from .models.split import SplitModel

if TYPE_CHECKING:
    from .attacks import InversionAttack
    from .attacks.base import FeatureMoments
    from .runtime.artifacts import CloudTail

INVERSION_METRICS = ("mse", "psnr", "ssim")
#: Training images per class and pixel the conditional-entropy floor and the feature's scale are measured on:
#: each class's image covariance needs more samples than pixels, or its rank deficit drives the H(x) estimate,
#: and so the floor, towards 0 (all the training images when there are fewer).
FLOOR_IMAGES_PER_PIXEL = 2

#: Training images the clean feature's standard deviation is measured on: millions of elements already, while a
#: head's forward pass over every floor image costs minutes on a CPU for a CIFAR-sized network.
FEATURE_STD_IMAGES = 1000


def floor_images(data: Dataset) -> int:
    """How many training images :func:`measure_target` fits the floor on: :data:`FLOOR_IMAGES_PER_PIXEL` per class
    and pixel (e.g. 15,680 for MNIST's 10 classes of 784 pixels), or all of them."""
    return min(len(data.train), FLOOR_IMAGES_PER_PIXEL * data.num_classes * math.prod(data.image_shape))


@dataclass
class AttackResult:
    """One attack's numbers on one cell: ``metrics`` rows ``(name, image index or -1 for the mean, value)``,
    and for an inversion attack the evaluated images and their reconstructions (float [N, C, H, W] in [0, 1])."""

    metrics: list[tuple[str, int, float]]
    original: np.ndarray | None = None
    reconstruction: np.ndarray | None = None


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def derived_seed(seed: int, key: str) -> int:
    """A 31-bit seed from (a seed, a key): the same on every machine, unrelated for different keys."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


#: The fields of an attack setting that decide the attacker (which images it is evaluated on do not).
ATTACKER_FIELDS = ("name", "threat", "aux", "aux_n", "adaptive", "params")


def attack_seed(seed: int, setting: dict[str, Any]) -> int:
    """The 31-bit seed of an attack ``setting`` (the spec's concrete attack entry) under the spec's ``seed``."""
    attacker = {k: setting.get(k) for k in ATTACKER_FIELDS}
    if setting.get("aux_data") is not None:  # only when set: other settings keep the seeds they had before it
        attacker["aux_data"] = setting["aux_data"]
    return derived_seed(seed, config_hash({"attack": attacker}))


def _aux(data: Dataset, setting: dict[str, Any], seed: int, other: Dataset | None) -> ImageSet:
    """The attacker's auxiliary images for ``setting`` (``other``'s training images for other_distribution)."""
    if setting["aux"] == "other_distribution" and (other is None or other.name != setting.get("aux_data")):
        raise ConfigError(f"aux other_distribution: load the dataset aux_data names ({setting.get('aux_data')!r}) "
                          "and pass it as other=")
    return data.aux(setting["aux"], n=setting["aux_n"], seed=derived_seed(seed, "aux"),
                    other=other.train if other is not None else None)


def _test_images(data: Dataset, test_n: int | None) -> ImageSet:
    return data.test if test_n is None else data.test.take(test_n)


@dataclass
class FittedAttack:
    """An attack fitted by :func:`fit_attack`, the victim it attacks and the images it is evaluated on."""

    attack: Any
    victim: Any
    evaluated: ImageSet


def fit_attack(target: SplitModel, defense: Defense | None, data: Dataset, setting: dict[str, Any], *,
               images: str | int, seed: int, progress: bool = False, other: Dataset | None = None) -> FittedAttack:
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
        The cell's seed, from :func:`attack_seed`.
    other:
        With ``setting["aux"] == "other_distribution"``: the dataset ``setting["aux_data"]`` names, whose
        training images (converted to ``data``'s image shape) are the attacker's.
    """
    from .attacks import ATTACKS, Victim, attack_name
    from .attacks.base import TRAFFIC_IMAGES
    from .data import evaluation_split

    if isinstance(images, int) and images > len(data.test):
        raise ConfigError(f"images: {images} test images asked for, but {data.name}'s test split has "
                          f"{len(data.test)}; ask for at most {len(data.test)}")
    aux = _aux(data, setting, seed, other)
    evaluated, traffic = evaluation_split(data.test, images, TRAFFIC_IMAGES)
    # The device's noise on what the cloud observes and the attacker's own draws (including its queries to
    # the oracle) are independent streams: an attacker knows the defense, never its draws.
    victim = Victim(target, defense, threat=setting["threat"], aux=aux, adaptive=setting["adaptive"],
                    seed=derived_seed(seed, "device"), traffic=traffic)
    attack = ATTACKS[attack_name(setting["name"])](**setting["params"], seed=derived_seed(seed, "attacker"),
                                                   progress=progress)
    attack.fit(victim)
    return FittedAttack(attack, victim, evaluated)


#: The threats a cloud holding only its artifact (the tail's weights, the head's architecture) can mount.
CLOUD_THREATS = ("query_free", "architecture_only")
_BEYOND_THE_CLOUD = {
    "white_box": "it needs the head's weights, which the cloud artifact does not hold",
    "black_box": "it needs queries to the edge's head (features of images of the attacker's choosing), which the "
                 "cloud cannot make",
}


def check_cloud_threat(threat: str, attack: str | None = None) -> None:
    """A one-line ConfigError unless a curious cloud, holding only its artifact, can mount ``threat`` (the
    threat of the attack named ``attack``)."""
    if threat not in CLOUD_THREATS:
        why = _BEYOND_THE_CLOUD.get(threat, "")
        raise ConfigError(f"{f'{attack} runs under' if attack else 'threat'} {threat}, which a cloud artifact cannot "
                          f"mount{': ' + why if why else ''}; give the full checkpoint or the edge artifact to measure "
                          f"{threat} (the cloud artifact can mount query_free with shadow_head and architecture_only "
                          "with unsplit)")


def fit_cloud_attack(cloud: CloudTail, data: Dataset | None, setting: dict[str, Any], *, seed: int,
                     traffic: FeatureMoments | None = None, progress: bool = False,
                     other: Dataset | None = None) -> InversionAttack:
    """Fit the attack ``setting`` on what a curious cloud holds, and nothing else; returns the fitted attack.

    Parameters
    ----------
    cloud:
        A :class:`~splitshield.runtime.artifacts.CloudTail` loaded with ``architecture=True``: the tail's
        weights and an untrained head of the head's architecture. No head weight, no query oracle and no
        defense exist here, so the attacker is non-adaptive (it optimises through no defense) whatever
        ``setting["adaptive"]`` says.
    data:
        The attacker's auxiliary data comes from it (query-free only; ``None`` for architecture-only).
    setting:
        As for :func:`fit_attack`; its threat must be one of :data:`CLOUD_THREATS`.
    seed:
        The cell's seed (:func:`attack_seed`), split as :func:`fit_attack` splits it.
    other:
        As for :func:`fit_attack`.
    traffic:
        The :class:`~splitshield.attacks.base.FeatureMoments` of the features the cloud received
        (:func:`~splitshield.attacks.base.feature_moments` of its transcript), for the query-free view;
        ``None``: none.
    """
    from .attacks import ATTACKS, ArchitectureOnlyView, QueryFreeView, attack_name
    from .defenses import NoDefense
    from .models.split import fresh_copy

    check_cloud_threat(setting["threat"])
    if cloud.head_architecture is None:
        raise ConfigError("fit_cloud_attack needs the head's architecture: load_cloud(path, architecture=True)")
    none = NoDefense().eval()

    def identity_perturb(x: torch.Tensor) -> torch.Tensor:
        return none.perturb(x, training=False)

    def identity_obfuscate(z: torch.Tensor) -> torch.Tensor:
        return none.obfuscate(z, training=False)

    # As a Victim builds it: a template re-initialised from the device's stream, fresh copies of it on demand.
    with seeded(derived_seed(seed, "device")):
        template = fresh_copy(cloud.head_architecture)

    def head_architecture() -> torch.nn.Module:
        return fresh_copy(template)

    common = dict(threat=setting["threat"], input_shape=tuple(cloud.input_shape),
                  feature_shape=tuple(cloud.feature_shape), adaptive=False, point=cloud.point, cloud=None,
                  perturb=identity_perturb, obfuscate=identity_obfuscate, head_architecture=head_architecture)
    if setting["threat"] == "architecture_only":
        view = ArchitectureOnlyView(**common, aux=None)
    else:
        if data is None:
            raise ConfigError("a query-free attack needs auxiliary data: pass data=<Dataset>")
        aux = _aux(data, setting, seed, other)
        last = list(template.modules())[-1]
        final = type(last) if isinstance(last, (torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Tanh)) else None
        view = QueryFreeView(**common, aux=aux, tail=cloud.tail, head_final_activation=final, traffic=traffic)
    attack = ATTACKS[attack_name(setting["name"])](**setting["params"], seed=derived_seed(seed, "attacker"),
                                                   progress=progress)
    return attack.fit(view)


def measure_attack(target: SplitModel, defense: Defense | None, data: Dataset, setting: dict[str, Any], *,
                   images: str | int, seed: int, test_n: int | None = None,
                   metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS, device: str | torch.device = "cpu",
                   progress: bool = False, other: Dataset | None = None) -> AttackResult:
    """Fit the attack ``setting`` (:func:`fit_attack`, ``other`` as there) and measure it on the evaluated images.

    A completion attack's label accuracy (``completion_accuracy``) is measured on the first ``test_n`` test
    images (all when ``None``), and beside it ``scratch_accuracy``: the target's architecture trained from
    scratch on the attacker's labelled images (:meth:`ModelCompletion.train_from_scratch`), on the same images.
    """
    from . import metrics as M
    from .attacks import CompletionAttack, ModelCompletion

    fitted = fit_attack(target, defense, data, setting, images=images, seed=seed, progress=progress, other=other)
    attack, victim = fitted.attack, fitted.victim
    if isinstance(attack, CompletionAttack):
        if "completion_accuracy" not in metrics:
            return AttackResult([])
        test = _test_images(data, test_n)
        rows = [("completion_accuracy", -1, _accuracy(lambda x: attack.predict(victim.observe(x)), test, device))]
        if isinstance(attack, ModelCompletion):
            scratch = attack.train_from_scratch(target, device=device)
            rows.append(("scratch_accuracy", -1, _accuracy(scratch, test, device)))
        return AttackResult(rows)
    x, labels = fitted.evaluated.tensors(device)
    x_hat = attack.invert(victim.observe(x)).detach().cpu()
    x = x.cpu()
    rows: list[tuple[str, int, float]] = []
    for name in INVERSION_METRICS:
        if name in metrics:
            per_image = getattr(M, name)(x_hat, x, reduction="none")
            rows += [(name, i, float(v)) for i, v in enumerate(per_image)]
            rows.append((name, -1, float(per_image.mean())))
    if "reid_accuracy" in metrics:
        rows += _reid_rows(data, x, x_hat, labels, device)
    return AttackResult(rows + _kept_rows(attack), x.numpy(), x_hat.numpy())


def _reid_rows(data: Dataset, x: torch.Tensor, x_hat: torch.Tensor, labels: torch.Tensor,
               device: str | torch.device) -> list[tuple[str, int, float]]:
    """``reid_accuracy`` per image (1 or 0) and its mean, and ``reid_ceiling``: the evaluator on the true images.
    One evaluator per dataset (:data:`~splitshield.reidentify.EVALUATOR_SEED`), the same yardstick for every cell."""
    from .reidentify import EVALUATOR_SEED, identity_evaluator, reidentified

    evaluator = identity_evaluator(data, EVALUATOR_SEED, device)
    hits = reidentified(evaluator, x_hat, labels)
    ceiling = float(reidentified(evaluator, x, labels).mean())
    return [("reid_accuracy", i, float(v)) for i, v in enumerate(hits)] + [
        ("reid_accuracy", -1, float(hits.mean())), ("reid_ceiling", -1, ceiling)]


def _kept_rows(attack: InversionAttack) -> list[tuple[str, int, float]]:
    """For an attack that keeps each image from one of several alternatives (:meth:`InversionAttack.kept`: a
    portfolio's members, the query-free attack's shadows), per alternative ``kept:NAME`` rows, 1 or 0 per image,
    and the share of the images as the mean; no rows for any other attack."""
    kept = attack.kept()
    if kept is None:
        return []
    names, chosen = kept
    rows = []
    for k, name in enumerate(names):
        hit = (chosen.cpu() == k).double()
        rows += [(f"kept:{name}", i, float(v)) for i, v in enumerate(hit)]
        rows.append((f"kept:{name}", -1, float(hit.mean())))
    return rows


@torch.no_grad()
def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], test: ImageSet, device: str | torch.device) -> float:
    """The fraction of ``test`` whose label is the argmax of ``predict(images)`` (logits [B, classes])."""
    correct = sum(int((predict(x).argmax(1).cpu() == y.cpu()).sum()) for x, y in test.batches(1000, device=device))
    return correct / len(test)


@torch.no_grad()
def measure_target(target: SplitModel, defense: Defense | None, data: Dataset, *, seed: int,
                   test_n: int | None = None, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
                   device: str | torch.device = "cpu") -> list[tuple[str, int, float]]:
    """The trained target's own numbers, as ``(name, -1, value)`` rows for the wanted ``metrics``.

    ``accuracy``: on the first ``test_n`` test images with the defense as deployed. ``ce_floor``: the estimated MSE
    floor the defense's Gaussian noise implies (:func:`ce_floor`), and ``mi_bound``: the certified bound, in nats
    per image, on what the sent feature carries about the image (:func:`mi_bound`), both fitted on
    :func:`floor_images` training images and absent without such noise. ``feature_std``: the
    standard deviation of the clean sent feature (``defense.clean(head(x))``, every element of the first
    :data:`FEATURE_STD_IMAGES` training images); ``noise_std``: the standard deviation per element of all the
    additive noise the defense puts on it (fixed and learned), so that their ratio is the noise's relative
    strength.
    """
    from .defenses import NoDefense

    defense = defense or NoDefense()
    target.eval()
    defense.eval()
    # The defense's draws (noise on the test images, parts before the floor's noise) are the same whatever ran
    # before: a target trained just now and one loaded from the cache give the same numbers.
    with seeded(derived_seed(seed, "target")):
        return _target_rows(target, defense, data, test_n, metrics, device)


def _target_rows(target: SplitModel, defense: Defense, data: Dataset, test_n: int | None,
                 metrics: tuple[str, ...] | list[str], device: str | torch.device) -> list[tuple[str, int, float]]:
    from .train import evaluate

    rows: list[tuple[str, int, float]] = []
    if "accuracy" in metrics:
        rows.append(("accuracy", -1, evaluate(target, defense, _test_images(data, test_n), device=device)))
    if "feature_std" in metrics:
        x, _ = data.train.take(min(FEATURE_STD_IMAGES, len(data.train))).tensors(device)
        z_clean = _batched(lambda chunk: defense.clean(target.head(defense.perturb(chunk, training=False))), x)
        rows.append(("feature_std", -1, float(z_clean.std())))
    if "noise_std" in metrics:
        rows.append(("noise_std", -1, additive_noise_std(defense, target.feature_shape())))
    if not {"ce_floor", "mi_bound"} & set(metrics):
        return rows
    x, labels = data.train.take(floor_images(data)).tensors(device)
    noised = noise_input(x, target, defense)
    if noised is not None:
        z, sigma = noised
        if "ce_floor" in metrics and (floor := _floor(x, labels, z, sigma)) is not None:
            rows.append(("ce_floor", -1, floor))
        if "mi_bound" in metrics and sigma > 0:
            rows.append(("mi_bound", -1, gaussian_channel_bound(z, sigma)))
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


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 1000) -> torch.Tensor:
    """``fn(x)`` computed ``size`` images at a time: a head's activations on thousands of images at once can
    take gigabytes."""
    return torch.cat([fn(chunk) for chunk in x.split(size)])


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
def noise_input(x: torch.Tensor, target: SplitModel, defense: Defense) -> tuple[torch.Tensor, float] | None:
    """Where the defense adds its Gaussian noise: the feature there for the images ``x`` ([N, ...], on the CPU)
    and the noise's standard deviation σ; ``None`` without Gaussian noise on the feature.

    That is where the first Gaussian part adds its noise: the feature is the head's output through the parts
    before it (as deployed; clipped first when that part is DP noise), and σ² sums the variances of that part and
    of the Gaussian-noise parts directly after it. Whatever follows can only destroy information, so what holds
    for the feature sent through that noise holds for what is finally sent (data-processing inequality).
    """
    from .defenses import DPNoise, GaussianNoise
    from .defenses.dp import clip_norm

    parts = _parts(defense)
    first = next((i for i, p in enumerate(parts) if _is_gaussian(p)), None)
    if first is None:
        return None
    # Independent Gaussian noises added one after the other add in variance; a part that changes the feature in
    # between (DP noise clips it first) ends the run, and what follows is post-processing.
    run = first + 1
    while run < len(parts) and isinstance(parts[run], GaussianNoise) and parts[run].on == "feature":
        run += 1
    noise = parts[first]

    def sent_to_the_noise(chunk: torch.Tensor) -> torch.Tensor:
        z = target.head(defense.perturb(chunk, training=False))
        for part in parts[:first]:
            z = part.obfuscate(z, training=False)
        return clip_norm(z, noise.clip, noise.norm) if isinstance(noise, DPNoise) else z

    dim = math.prod(target.feature_shape())
    sigma = math.sqrt(sum(p.std_for(dim) ** 2 for p in parts[first:run]))
    return _batched(sent_to_the_noise, x).cpu(), sigma


@torch.no_grad()
def ce_floor(x: torch.Tensor, labels: torch.Tensor, target: SplitModel, defense: Defense) -> float | None:
    """The estimated MSE floor (:func:`~splitshield.metrics.conditional_entropy_floor`: an estimate, not a
    certified bound) that the defense's Gaussian noise implies for any inversion of the sent feature, taken at
    :func:`noise_input`; ``None`` without Gaussian noise on the feature."""
    noised = noise_input(x, target, defense)
    return None if noised is None else _floor(x, labels, *noised)


@torch.no_grad()
def mi_bound(x: torch.Tensor, target: SplitModel, defense: Defense) -> float | None:
    """The certified upper bound, in nats per image, on the information the sent feature carries about the image
    (:func:`~splitshield.metrics.gaussian_channel_bound`, with the variances of the feature at
    :func:`noise_input` over the images ``x``); ``None`` without Gaussian noise on the feature, or with σ = 0."""
    noised = noise_input(x, target, defense)
    return None if noised is None or noised[1] == 0 else gaussian_channel_bound(*noised)


def _floor(x: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, sigma: float) -> float | None:
    try:
        return float(conditional_entropy_floor(x.cpu(), z, sigma, labels=labels.cpu())["mse_floor"])
    except (SplitShieldError, ValueError, RuntimeError):
        return None
