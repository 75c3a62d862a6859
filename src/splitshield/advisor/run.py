"""``advise``: score every legal cut of a model for edge cost, wire bytes and leakage, and recommend one."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset, load_dataset
from ..errors import ConfigError, DataError, SplitError
from ..models.split import ModelCuts, SplitModel, SplitPoint, _modes_kept
from .costs import LATENCY_BATCHES, compute_cost, cpu_share
from .leakage import (
    FAST_ATTACKS,
    FAST_IMAGES,
    FastAttack,
    FastBudget,
    Inversion,
    ce_floor,
    fast_inversion,
    gpz_radius,
    held_out_index,
    relative_drops,
)
from .memory import check_memory, free_memory
from .recommend import RANKINGS, strongest_measure
from .table import Advice, PointAdvice
from .wire import CHUNK, eight_bit_options, wire_cost

#: Held-out images shown per cut in the reconstruction strips (fewer when the fast attacks score fewer).
STRIP_IMAGES = 8
#: Below this share of its cores (:func:`~splitshield.advisor.costs.cpu_share`) a cut's head latency is reported as
#: measured on a busy machine; an idle one gives about 1.
BUSY_SHARE = 0.85


def select_points(legal: Sequence[SplitPoint], wanted: Sequence[str] | None, model_name: str) -> list[SplitPoint]:
    """The cuts of ``legal`` named in ``wanted`` (names or aliases), in the model's order; all when ``None``.

    Raises :class:`SplitError` naming every unknown name and listing the legal ones.
    """
    if wanted is None:
        return list(legal)
    if not wanted:
        raise ConfigError("points: name at least one split point, or pass None for all of them")
    by_name = {name: p for p in legal for name in (p.name, *p.aliases)}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SplitError(f"unknown split point(s) {', '.join(map(repr, unknown))} of {model_name}; legal points: "
                         f"{', '.join(p.name for p in legal)}")
    keep = {by_name[w].name for w in wanted}
    return [p for p in legal if p.name in keep]


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _input_shape(model: nn.Module, data: Dataset | None, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    spec = getattr(model, "model_spec", None) or {}
    shape = tuple(input_shape) if input_shape is not None else (
        data.image_shape if data is not None else tuple(spec.get("input_shape") or ()))
    if not shape:
        raise ConfigError("advise needs the shape of one input image: pass input_shape=(C, H, W) or data")
    if data is not None and tuple(data.image_shape) != shape:
        raise DataError(f"{data.name}'s images are {tuple(data.image_shape)} but the model takes {shape}: load the "
                        f"data converted (load_dataset(..., image_shape={shape}) or --input-shape)")
    return shape


def _fast_attacks(fast: FastBudget | Sequence[FastBudget] | None) -> tuple[FastBudget, ...]:
    """``fast`` as a tuple of fast attacks, one per threat (the defaults for ``None``)."""
    fix = "a FastAttack, a FastWhiteBox or a sequence of them (one per threat)"
    if fast is None:
        return FAST_ATTACKS
    if isinstance(fast, FastBudget):
        return (fast,)
    if isinstance(fast, (str, bytes)) or not isinstance(fast, Sequence):
        raise ConfigError(f"fast must be {fix}, got {fast!r}")
    chosen = tuple(fast)
    wrong = [a for a in chosen if not isinstance(a, FastBudget)]
    if wrong or not chosen:
        raise ConfigError(f"fast must be {fix}, got {wrong[0] if wrong else fast!r}")
    threats = [a.threat for a in chosen]
    if len(set(threats)) < len(threats):
        raise ConfigError(f"fast: one budget per threat, got {', '.join(threats)}")
    return chosen


def _leakage(target: SplitModel, data: Dataset, fast: tuple[FastBudget, ...], images: int, seed: int,
             device: str | torch.device, lap: Callable[[str], None], by: str = "ssim",
             ) -> tuple[dict[str, float | str], Inversion]:
    """Every fast attack's PSNR/SSIM at ``target``'s cut, all on the same ``images`` held-out images; the strongest
    attack's (the highest mean ``by``, ``ssim`` or ``psnr``: ``strongest_threat``, its ``psnr`` and ``ssim``), and
    its :class:`Inversion`."""
    leak: dict[str, float | str] = {}
    results = {}
    for attack in fast:
        results[attack.threat] = inversion = fast_inversion(target, data, attack, seed, images, device)
        leak |= {f"{attack.threat}_psnr": inversion.psnr, f"{attack.threat}_ssim": inversion.ssim}
        lap(f"attack ({attack.threat})")

    def strength(threat: str) -> float:
        # A diverged attack (NaN) is the weakest, wherever it comes in the order; an exact one (PSNR +inf) the
        # strongest.
        value = getattr(results[threat], by)
        return -math.inf if math.isnan(value) else value

    strongest = max(results, key=strength)
    best = results[strongest]
    leak |= {"psnr": best.psnr, "ssim": best.ssim, "strongest_threat": strongest}
    return leak, best


def _ranking(rank_by: str | None, attacked: bool, measured: bool) -> str | None:
    if rank_by is None:
        return "ssim" if attacked else "gpz" if measured else None
    if rank_by not in RANKINGS:
        raise ConfigError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    if rank_by in ("ssim", "psnr") and not attacked and measured:
        raise ConfigError(f"rank_by={rank_by!r} needs the fast attacks: rank by ce_floor or gpz with attack=False")
    return rank_by if measured else None


class _Stopwatch:
    """Seconds per stage: each :meth:`lap` adds the time since the previous lap to its stage."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.totals[stage] += now - self.last
        self.last = now


@dataclasses.dataclass
class _Inputs:
    """What every cut is measured on: 32 images to time heads on (``cost``, [32, C, H, W]); test images, their labels
    and the model's predictions (``test``: [N, C, H, W], [N], [N]) for bytes, accuracy and statistics."""

    cost: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


@torch.no_grad()
def _inputs(model: nn.Module, data: Dataset | None, shape: tuple[int, ...], images: int, seed: int,
            device: str | torch.device) -> _Inputs:
    size = LATENCY_BATCHES[-1]
    if data is None:
        cost = torch.rand(size, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
        return _Inputs(cost, None)
    x, y = data.test.subset(held_out_index(data.test, images)).tensors(device)  # balanced, whatever the order
    predicted = torch.cat([model(c).argmax(1) for c in x.split(CHUNK)])
    return _Inputs(x.repeat(math.ceil(size / len(x)), 1, 1, 1)[:size], (x, y, predicted))


def _statistics(x: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
                noise: float) -> tuple[dict[str, float | None], str | None]:
    """The GPZ statistic and the CE floor of one cut's features, and why the floor is missing (``None`` if not)."""
    r2, variance = gpz_radius(z, predicted)
    try:
        floor, missing = ce_floor(x, z, labels, noise), None
    except ConfigError as exc:
        floor, missing = None, str(exc)
    return {"gpz_r2": r2, "gpz_r2_norm": r2 / variance if r2 is not None and variance > 0 else None,
            "ce_floor": floor}, missing


def _warnings_to_notes(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """splitshield's own UserWarnings (e.g. an attack on too few auxiliary images) as notes, once each; every other
    warning shown as it would have been, once per place."""
    package = Path(__file__).parents[1]
    notes, shown = [], set()
    for w in caught:
        if issubclass(w.category, UserWarning) and Path(w.filename).is_relative_to(package):
            notes.append(str(w.message))
        elif (key := (str(w.message), w.category, w.filename, w.lineno)) not in shown:
            shown.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # through the caller's filters
    return list(dict.fromkeys(notes))


def _busy_note(shares: dict[str, float], threads: int) -> list[str]:
    """A note naming the cuts whose heads were timed with less CPU than their ``threads`` threads need, if any."""
    busy = {p: share for p, share in shares.items() if share < BUSY_SHARE}
    if not busy:
        return []
    worst = min(busy, key=busy.__getitem__)
    need = f"{threads} thread{' needs' if threads == 1 else 's need'}"
    return [f"{len(busy)} of {len(shares)} cuts were timed while this process got less than {BUSY_SHARE:.0%} of the "
            f"cores its {need} (least: {busy[worst]:.0%} at {worst}): other processes, a CPU quota or more threads "
            "than cores. Head ms there may be inflated, and an edge-latency budget may rule cuts out wrongly; time "
            "them on an idle machine, or with fewer threads (torch.set_num_threads; the CLI's --threads)."]


def _notes(data: Dataset | None, trained: bool, inputs: _Inputs, meta: dict) -> list[str]:
    if not trained:
        return ["Untrained model (no checkpoint): costs only. Leakage and accuracy need a trained model."]
    if data is None:
        return ["No data: costs only. Leakage, accuracy and 8-bit bytes need images (pass data)."]
    _, y, predicted = inputs.test
    meta["accuracy"] = float(predicted.eq(y).double().mean())
    if meta["accuracy"] < 2 / data.num_classes:
        return [f"Test accuracy {meta['accuracy']:.1%} is near chance (1/{data.num_classes}): the model looks "
                "untrained, and the leakage of an untrained model says little about a trained one."]
    return []


def advise(model: nn.Module, data: Dataset | str | None = None, *, input_shape: Sequence[int] | None = None,
           points: Sequence[str] | None = None, trained: bool = True, attack: bool = True, noise: float = 0.5,
           rank_by: str | None = None, max_edge_ms: float | None = None, max_kbytes: float | None = None,
           fast: FastBudget | Sequence[FastBudget] | None = None, attack_images: int = FAST_IMAGES,
           images: int = 1000, device: str | torch.device = "cpu", seed: int = 0, progress: bool = True) -> Advice:
    """Score every legal cut of ``model`` (or ``points``) for edge cost, wire bytes and leakage; recommend one.

    Per cut: head and tail multiply-adds, head parameters, MB and latency (batch 1 and 32, measured here); bytes
    per image as float32, float16 and 8-bit + zstd frames, and the accuracy on decoded 8-bit features; leakage as
    the PSNR/SSIM of fast attacks (black-box inverse network, white-box rMLE) on held-out test images and the
    strongest of them, the CE floor at ``noise`` and the GPZ statistic (:mod:`~splitshield.advisor.leakage`). The
    recommended cut is the one within budgets that leaks least. Latencies are wall-clock times; on a CPU (with torch's
    threads), a note names the cuts timed while this process got too little of the cores (:data:`BUSY_SHARE`).

    Parameters
    ----------
    model:
        The uncut model, trained (its weights are used as they are; it is moved to ``device`` and its modules'
        train/eval flags are restored afterwards). Any model :func:`~splitshield.split_points` can cut.
    data:
        A :class:`~splitshield.Dataset` or a name for :func:`~splitshield.load_dataset`; its images must have the
        model's input shape. ``None``: costs only, from shapes (no 8-bit bytes, no leakage).
    input_shape:
        (C, H, W) of one image; default ``data``'s, else the model's ``model_spec``.
    points:
        Names (or aliases) of the cuts to score, default all legal ones.
    trained:
        ``False`` for a model that was never trained: costs (and 8-bit bytes) only, since the leakage and accuracy of
        random weights say nothing about a trained model.
    attack:
        Run the fast attacks (the slow part); ``False``: costs and statistics only.
    noise:
        The CE floor's Gaussian noise, in units of the feature's standard deviation (> 0).
    rank_by:
        What cuts are ranked by: ``ssim`` or ``psnr`` (the strongest fast attack's by that measure), ``ce_floor``,
        ``gpz`` (R̄²/V); default ``ssim`` with the attacks, else ``gpz``, which ranked LeNet's cuts closer to the
        full attacks than the CE floor did (``benchmarks/advisor_validity.py``).
    max_edge_ms, max_kbytes:
        Budgets: head milliseconds per image at batch 1, and kB (10³ bytes) per image on the wire (8-bit coded).
    fast:
        The fast attacks and their budgets, one per threat: a :class:`FastAttack` (black box), a
        :class:`FastWhiteBox` (white box) or both (the default, with their default budgets). A cut's leakage is
        the strongest one's (the highest mean SSIM; the highest mean PSNR with ``rank_by="psnr"``): the cloud may
        hold the head's weights (a public pretrained backbone) or only query it.
    attack_images:
        Held-out test images every fast attack reconstructs and is scored on, the same for all of them (balanced
        over the classes: :func:`~splitshield.advisor.leakage.held_out_index`).
    images:
        Test images the bytes, the 8-bit accuracy, the CE floor and the GPZ statistic are measured on (balanced over
        the classes: :func:`~splitshield.advisor.leakage.held_out_index`); the first 32 also time the heads.
    device, seed:
        Torch device; the seed of every random draw (the same seed gives the same numbers, latencies and the busy
        note aside).
    progress:
        Show a progress bar over the cuts.

    Raises
    ------
    SplitError
        An unknown point (the message lists the legal ones), or an input shape the model does not take.
    ConfigError, DataError
        A bad parameter, or data whose images do not fit the model.
    """
    for name, value in (("noise", noise), ("max_edge_ms", max_edge_ms), ("max_kbytes", max_kbytes)):
        _check_positive(name, value)
    if isinstance(images, bool) or not isinstance(images, int) or images < 2:
        raise ConfigError(f"images must be an integer of at least 2 test images, got {images!r}")
    if isinstance(attack_images, bool) or not isinstance(attack_images, int) or attack_images < 1:
        raise ConfigError(f"attack_images must be a positive integer, got {attack_images!r}")
    fast = _fast_attacks(fast)
    data = load_dataset(data) if isinstance(data, str) else data
    shape = _input_shape(model, data, input_shape)
    model_name = (getattr(model, "model_spec", None) or {}).get("name", type(model).__name__)
    watch = _Stopwatch()
    cuts = ModelCuts(model, shape)  # one trace for the points, the cuts and the chain through them
    chosen = select_points(cuts.points, points, model_name)
    measured = trained and data is not None
    if data is not None:
        # On a GPU the features live in its memory, which torch reports when it runs out.
        inverse = next((a for a in fast if isinstance(a, FastAttack)), None)  # one budget per threat
        aux = min(inverse.aux_images, len(data.holdout)) if inverse and measured and attack else 0
        check_memory(shape, chosen, min(images, len(data.test)), measured,
                     free_memory() if torch.device(device).type == "cpu" else None, aux, aux > 0 and inverse.refit)
    ranking = _ranking(rank_by, measured and attack, measured)
    options, wire_label = eight_bit_options()
    meta = {"model": model_name, "input_shape": shape, "data": data.name if data is not None else None,
            "device": str(device), "threads": torch.get_num_threads(), "seed": seed, "wire_8bit": wire_label,
            "noise": noise,
            "fast_attacks": {a.threat: a.describe() for a in fast} if measured and attack else None,
            "fast_images": attack_images}
    watch.lap("trace")
    rows, originals, strips = [], None, {}
    shares: dict[str, float] = {}  # cut -> this process's share of its cores while its head was timed
    no_floor: dict[str, list[str]] = {}  # why the CE floor is missing -> the cuts
    shown = min(STRIP_IMAGES, attack_images)
    with _modes_kept(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # every fast attack's warnings go into the notes, once each
        model.to(device).eval()
        inputs = _inputs(model, data, shape, images, seed, device)
        notes = _notes(data, trained, inputs, meta)
        lap = watch.lap
        # The features of every cut in one pass: each cut's from the previous cut's, not from the images.
        chain = [m.eval() for m in cuts.chain([p.name for p in chosen])] if inputs.test is not None else []
        z = inputs.test[0] if inputs.test is not None else None
        lap("inputs")
        for k, p in enumerate(tqdm(chosen, desc="advise", unit="cut", disable=not progress)):
            target = cuts.split(p.name).eval()
            lap("split")
            before = cpu_share() if torch.device(device).type == "cpu" else None
            compute = compute_cost(target, inputs.cost)
            if before is not None:  # the load before and after the timing: the worse counts
                shares[p.name] = min(before, cpu_share())
            lap("compute")
            leak: dict[str, float | str | None] = {}
            if inputs.test is None:
                wire = wire_cost(p.feature_shape)
            else:
                x, y, predicted = inputs.test
                with torch.no_grad():
                    z = torch.cat([chain[k](c) for c in z.split(CHUNK)])
                lap("features")
                wire = wire_cost(p.feature_shape, z, target.tail if measured else None, y, options)
                lap("wire")
                if measured:
                    leak, missing = _statistics(x, z, y, predicted, noise)
                    if missing is not None:
                        no_floor.setdefault(missing, []).append(p.name)
                    lap("statistics")
            if measured and attack:
                scores, strongest = _leakage(target, data, fast, attack_images, seed, device, lap,
                                             strongest_measure(ranking))
                leak |= scores
                originals = strongest.originals[:shown]  # every attack scores the same images
                strips[p.name] = strongest.reconstructions[:shown]
            rows.append(PointAdvice(p.name, tuple(p.feature_shape), **dataclasses.asdict(compute),
                                    **dataclasses.asdict(wire), **leak))
    drops = relative_drops([r.gpz_r2 for r in rows])
    drops_norm = relative_drops([r.gpz_r2_norm for r in rows])
    rows = [dataclasses.replace(r, gpz_drop=d, gpz_drop_norm=dn)
            for r, d, dn in zip(rows, drops, drops_norm, strict=True)]
    notes += _warnings_to_notes(caught)
    notes += _busy_note(shares, meta["threads"])
    notes += [f"CE floor not computed at {', '.join(names)}: {why}." for why, names in no_floor.items()]
    if points is not None and len(chosen) < len(cuts.points) and measured:
        notes.append("R̄² drops are between neighbouring rows of this table, a subset of the legal cuts: Liu et al.'s "
                     "zone is defined over neighbouring layers, so score every cut for it.")
    diverged = [r.point for r in rows if r.ssim is not None and math.isnan(r.ssim)]
    if diverged:
        notes.append(f"Every fast attack diverged (NaN) at {', '.join(diverged)}: the leakage there is unknown.")
    if ranking == "gpz" and not attack:
        notes.append("Ranked by R̄²/V, a statistic of the features, not an attack: it can misrank deep cuts (see "
                     "benchmarks/results/advisor_validity.md); run the fast attacks for a measured ranking.")
    return Advice(rows, ranking, max_edge_ms, max_kbytes, meta, notes, dict(watch.totals), originals, strips)
