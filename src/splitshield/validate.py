"""A validation pass before work starts: every problem of a target and its defense, found at once.

In the manner of Opacus's ``ModuleValidator``: :func:`validate` runs every check and returns all the
:class:`Problem` s it finds, never stopping at the first; :func:`check` then raises one
:class:`~splitshield.errors.ConfigError` holding every error (one line each) and emits each warning once.

>>> check(validate(target, GaussianNoise(0.5) + CEM(), resume=True))  # doctest: +SKIP

The checks (each a function in :data:`CHECKS`):

- CEM without a noise level for its hinge (else training fails only after its first epoch);
- additive noise on an unbounded feature (a warning: training can scale the feature past the noise);
- at inference, a head or a defense whose output for one input depends on the rest of the batch
  (batch norm in train mode or without running statistics, a quantiser with one range per batch);
- with ``resume``, a defense that cannot resume from a checkpoint;
- Shredder's ``feature_shape`` and VIB's ``channels`` against the head's feature;
- a label term (InfoScissors' ``label_lam``) on a split that is not U-shaped, where it would never run.

The checks that run the head use a probe batch: ``x`` when given, else a seeded random batch of the
target's ``input_shape``; without either they are skipped. The head and the defense run in eval mode
without gradients, their train/eval flags and the global random state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .defenses import CEM, VIB, Compose, Defense, FeatureBound, GaussianNoise, LaplaceNoise, NoDefense, Shredder
from .defenses.noise import noise_std
from .errors import ConfigError
from .models.split import SplitModel, _device_of, _modes_kept

__all__ = ["CHECKS", "Problem", "check", "validate"]

#: Inputs in the random probe batch (at least two, so that a batch-wide operation shows).
PROBE_SIZE = 4


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a setting: ``str()`` is one line naming the field, the trouble and the fix."""

    severity: Literal["error", "warning"]
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Subject:
    """What the checks look at: the setting, and the head's feature on the probe batch when it ran."""

    target: SplitModel | None
    defense: Defense
    parts: list[tuple[str, Defense]]
    probe: torch.Tensor | None
    feature: torch.Tensor | None
    head_error: str | None
    for_training: bool
    resume: bool


def validate(target: SplitModel | None, defense: Defense | None = None, *, x: torch.Tensor | None = None,
             for_training: bool = False, resume: bool = False) -> list[Problem]:
    """Every problem of ``target`` protected by ``defense``, errors and warnings, in check order.

    Parameters
    ----------
    target:
        The split model; ``None`` checks the defense alone (e.g. when a spec is parsed).
    defense:
        The defense between head and tail; ``None`` for none.
    x:
        A probe batch of at least two inputs [B, C, H, W]; default a seeded random batch of
        ``target.input_shape`` (the head-running checks are skipped when neither is known).
    for_training:
        The setting is about to be trained: the inference-only checks (batch dependence) are skipped.
    resume:
        Training will continue from a checkpoint: a defense that cannot resume is an error.
    """
    defense = defense or NoDefense()
    probe = x if x is not None else _random_probe(target)
    feature, head_error = _run_head(target, probe)
    subject = Subject(target, defense, _named_parts(defense), probe, feature, head_error, for_training, resume)
    return [problem for run in CHECKS for problem in run(subject)]


def check(problems: Iterable[Problem]) -> None:
    """Warn once per distinct warning, then raise :class:`ConfigError` with one line per error, if any."""
    problems = list(dict.fromkeys(problems))  # drops repeats, keeps the order
    for problem in problems:
        if problem.severity == "warning":
            warnings.warn(str(problem), UserWarning, stacklevel=2)
    errors = [str(problem) for problem in problems if problem.severity == "error"]
    if errors:
        raise ConfigError("\n".join(errors))


# ---- the probe ------------------------------------------------------------------------------------


def _random_probe(target: SplitModel | None) -> torch.Tensor | None:
    """A seeded batch of random images of the target's input shape, or ``None`` when it is unknown.

    Their brightness rises along the batch (to 1 for the last), so that the first input, the one compared
    alone, is unlike the batch as a whole: its minimum, maximum and mean are not the batch's.
    """
    if target is None or target.input_shape is None:
        return None
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(PROBE_SIZE, *target.input_shape, generator=generator)
    brightness = torch.linspace(0.25, 1.0, PROBE_SIZE).view(-1, *(1,) * len(target.input_shape))
    return (images * brightness).to(_device_of(target))


@contextlib.contextmanager
def _inference(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode without gradients; its modes and the random state are restored after."""
    with _modes_kept(module), torch.no_grad(), torch.random.fork_rng(devices=[]):
        module.eval()
        yield


def _run_head(target: SplitModel | None, probe: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
    """(head(probe) in eval mode, None), or (None, what torch said) when the head fails on the probe."""
    if target is None or probe is None:
        return None, None
    try:
        with _inference(target.head):
            return target.head(probe), None
    except Exception as exc:  # noqa: BLE001 - any failure is reported as a problem of the head
        return None, _first_line(exc)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _named_parts(defense: Defense) -> list[tuple[str, Defense]]:
    """Each part of ``defense`` with the field that names it: ``defense.parts[1] (cem)``, or ``defense (cem)``."""
    if isinstance(defense, Compose):
        return [(f"defense.parts[{i}] ({part.name})", part) for i, part in enumerate(defense.parts)]
    return [(f"defense ({defense.name})", defense)]


# ---- 1. CEM needs a noise level --------------------------------------------------------------------


def check_cem_sigma(subject: Subject) -> Iterator[Problem]:
    """Error: a CEM with no explicit sigma and no feature noise composed before it (its hinge has no σ)."""
    before: list[Defense] = []
    for field, part in subject.parts:
        # Any positive level will do, so the feature's size (which DP noise scales with) is irrelevant here.
        noisy = any(noise_std(d, (1,)) > 0 for d in before)
        if isinstance(part, CEM) and part.lam and part.hinge_sigma is None and not noisy:
            yield Problem("error", field, "has no noise level sigma for its hinge (no feature noise is composed "
                          "before it and sigma is not given), so training would fail after its first epoch; compose a "
                          "noise defense before CEM (gaussian_noise + cem) or pass cem(sigma=...)")
        before.append(part)


# ---- 2. noise on an unbounded feature --------------------------------------------------------------

#: Modules and calls whose output lies in a fixed range whatever their input.
_BOUNDED_MODULES = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign, nn.Softmax)  # Hardtanh: ReLU6 too
_BOUNDED_CALLS = {torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.hardtanh, F.relu6, F.hardsigmoid, F.softsign,
                  F.softmax, torch.softmax, "sigmoid", "tanh", "softmax"}
#: Modules and calls that keep a bounded input bounded: looked through to the operation before them.
_RANGE_KEEPING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                          nn.MaxPool3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_RANGE_KEEPING_CALLS = {torch.flatten, operator.getitem, "flatten", "view", "reshape", "contiguous"}


def check_noise_bounded(subject: Subject) -> Iterator[Problem]:
    """Warning: Gaussian or Laplace feature noise with neither a bounded head output nor a bound before it.

    DP noise is not flagged: it clips each feature to a fixed norm first, which is a bound.
    """
    if subject.target is None:
        return
    last = _last_op(subject.target.head)
    bounded = _is_bounded(last)
    for field, part in subject.parts:
        bounded = bounded or isinstance(part, FeatureBound)
        if isinstance(part, (GaussianNoise, LaplaceNoise)) and part.on == "feature" and part.std and not bounded:
            yield Problem("warning", field, f"adds noise to an unbounded feature (target.head ends in {_op_name(last)} "
                          "and no bound is composed before the noise), so training can scale the feature up until "
                          f"the noise is negligible; compose a bound first (bound + {part.name}) or cut the model "
                          "after a sigmoid or tanh")


def _last_op(module: nn.Module) -> object:
    """The last operation of ``module`` that can change its output's range: a module, a function or a
    method name; ``None`` when there is none or it cannot be told."""
    if isinstance(module, fx.GraphModule):
        node = next(n for n in reversed(module.graph.nodes) if n.op == "output").args[0]
        while isinstance(node, fx.Node) and node.op in ("call_module", "call_function", "call_method"):
            op = module.get_submodule(node.target) if node.op == "call_module" else node.target
            if not _keeps_range(op):
                return _last_op(op) if isinstance(op, nn.Module) else op
            node = node.args[0]
        return None
    if isinstance(module, nn.Sequential):
        return next((_last_op(child) for child in reversed(module) if not _keeps_range(child)), None)
    return module


def _keeps_range(op: object) -> bool:
    return isinstance(op, _RANGE_KEEPING_MODULES) or op in _RANGE_KEEPING_CALLS


def _is_bounded(op: object) -> bool:
    return isinstance(op, _BOUNDED_MODULES) or op in _BOUNDED_CALLS


def _op_name(op: object) -> str:
    if op is None:
        return "an operation of unknown range"
    if isinstance(op, nn.Module):
        return type(op).__name__
    return getattr(op, "__name__", str(op))


# ---- 3. outputs that depend on the batch (inference only) ------------------------------------------

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_batch_norm(subject: Subject) -> Iterator[Problem]:
    """Error at inference: a batch norm of the head in train mode, or without running statistics."""
    if subject.for_training or subject.target is None:
        return
    for name, module in subject.target.head.named_modules():
        if not isinstance(module, _BATCH_NORMS):
            continue
        field = f"target.head.{name} ({type(module).__name__})"
        if module.training:
            yield Problem("error", field, "is in train mode, so it normalises with the statistics of the batch and "
                          "one input's feature depends on the others sent with it; call target.eval() before inference")
        if not module.track_running_stats:
            yield Problem("error", field, "keeps no running statistics (track_running_stats=False), so even in eval "
                          "mode one input's feature depends on the others in its batch; build it with running "
                          "statistics, or use a per-sample norm (GroupNorm, LayerNorm)")


def check_head_runs(subject: Subject) -> Iterator[Problem]:
    """Error: the head fails on the probe batch."""
    if subject.head_error is not None:
        shape = list(subject.probe.shape)
        yield Problem("error", "target.head", f"fails on a probe batch of shape {shape} (torch says: "
                      f"{subject.head_error}); pass x= a batch the head takes, or split with the right input_shape")


def check_head_batch(subject: Subject) -> Iterator[Problem]:
    """Error at inference: in eval mode, the head's output for one input changes with the rest of its batch."""
    if subject.for_training or subject.feature is None:
        return
    head = subject.target.head
    try:
        with _inference(head):
            alone = head(subject.probe[:1])
    except Exception as exc:  # noqa: BLE001 - a head that cannot take one input normalises over the batch
        yield Problem("error", "target.head", f"fails on a batch of one input (torch says: {_first_line(exc)}), "
                      "as a batch-wide operation does; use per-sample operations (a BatchNorm with running "
                      "statistics in eval mode, GroupNorm, LayerNorm)")
        return
    if not _same(subject.feature[:1], alone):
        yield Problem("error", "target.head", "in eval mode, its output for an input depends on the other inputs of "
                      "the batch (usually a batch norm using batch statistics), so the same image is sent "
                      "differently depending on its batch; use per-sample operations (a BatchNorm with running "
                      "statistics, GroupNorm, LayerNorm)")


def check_defense_batch(subject: Subject) -> Iterator[Problem]:
    """Error at inference: a deterministic defense part (or a random part's ``clean``) whose output for one
    input changes with the rest of its batch, e.g. a quantiser with one range per batch."""
    if subject.for_training or subject.feature is None:
        return
    z = subject.feature
    with _inference(subject.defense):
        for field, part in subject.parts:
            if _misfit(part, tuple(z.shape[1:])):
                return  # reported by check_defense_fits; the parts after it cannot be run
            random = _is_random(part, z)
            apply = part.clean if random else partial(part.obfuscate, training=False)
            out = apply(z)
            if not _same(out[:1], apply(z[:1])):
                what = "its deterministic part (clean)" if random else "its output"
                yield Problem("error", field, f"{what} for an input depends on the other inputs of the batch (e.g. "
                              "one quantisation range per batch), so the same image is sent differently depending "
                              "on its batch; compute it per sample (one range per input)")
            z = out


def _is_random(part: Defense, z: torch.Tensor) -> bool:
    """Whether ``part.obfuscate`` at inference draws random numbers: two seeds give two outputs."""
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append(part.obfuscate(z, training=False))
    return not torch.equal(*outputs)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding (a batch of one may take another convolution algorithm)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# ---- 4. resuming -----------------------------------------------------------------------------------


def check_resumable(subject: Subject) -> Iterator[Problem]:
    """Error with ``resume``: a defense (part) whose training state a checkpoint cannot restore."""
    if not subject.resume:
        return
    stuck = [(field, part) for field, part in subject.parts if not getattr(part, "resumable", True)]
    if not stuck and not getattr(subject.defense, "resumable", True):
        stuck = [(f"defense ({subject.defense.name})", subject.defense)]
    for field, _ in stuck:
        yield Problem("error", field, "cannot resume from a checkpoint (resumable is False: checkpoints do not hold "
                      "all its training state); train from the start (resume=False)")


# ---- 5. defense parameters against the target ------------------------------------------------------


def check_defense_fits(subject: Subject) -> Iterator[Problem]:
    """Error: Shredder's ``feature_shape`` or VIB's ``channels`` does not match the head's feature."""
    if subject.feature is None:
        return
    shape = tuple(subject.feature.shape[1:])
    for field, part in subject.parts:
        if (message := _misfit(part, shape)) is not None:
            yield Problem("error", field, message)


def _misfit(part: Defense, shape: tuple[int, ...]) -> str | None:
    """Why ``part`` cannot take a feature of ``shape`` (one sample's), or ``None`` when it can."""
    if isinstance(part, Shredder) and part.feature_shape != shape:
        return (f"feature_shape={list(part.feature_shape)} does not match the head's feature {list(shape)}; "
                f"pass shredder(feature_shape={list(shape)})")
    if isinstance(part, VIB) and (not shape or part.channels != shape[0]):
        channels = shape[0] if shape else None
        return (f"channels={part.channels} does not match the head's feature {list(shape)} ({channels} channels); "
                f"pass vib(channels={channels})")
    return None


def check_label_term(subject: Subject) -> Iterator[Problem]:
    """Error: a label term (InfoScissors' ``label_lam``) on a target that is not U-shaped, where it never runs."""
    if subject.target is None or subject.target.u_shaped:
        return
    for field, part in subject.parts:
        if getattr(part, "label_lam", 0):
            yield Problem("error", field, f"label_lam={part.label_lam} regularises the features the cloud returns to "
                          f"the device, which only a U-shaped split has (this one is cut at {subject.target.point!r}); "
                          "cut it U-shaped (first..second) or remove label_lam")


#: Every check, in the order problems are reported.
CHECKS: tuple[Callable[[Subject], Iterable[Problem]], ...] = (
    check_cem_sigma,
    check_noise_bounded,
    check_head_runs,
    check_batch_norm,
    check_head_batch,
    check_defense_batch,
    check_resumable,
    check_defense_fits,
    check_label_term,
)
