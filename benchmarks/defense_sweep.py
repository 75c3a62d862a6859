"""Defense sweep: every base defense at several strengths, with and without CEM, against adaptive attackers.

For each cell (dataset × base defense × strength × CEM λ) it trains the split model with the defense,
then reports: test accuracy (defense applied as deployed), the adaptive black-box inverse network's
MSE / SSIM / PSNR on held-out test images (decoder trained on *defended* features of the attacker's
auxiliary data), the adaptive white-box rMLE's PSNR / SSIM on the first test image of each class
(optimising through the obfuscation, re-sampled every step), and the conditional-entropy MSE floor
(``metrics.conditional_entropy_floor``) with a check that it lies below the strongest measured attack.
Its ``σ/std(z)`` column is the noise's standard deviation per element (for Shredder the learned noise's,
``Shredder.learned_std``) over the clean feature's.

Per base defense it prints the CEM gain: the relative increase of the black-box attack MSE with CEM over
the same base, strength and seed without CEM, over the pairs whose accuracies match within 1 point; and the
training-time overhead of CEM (training wall time with CEM / without).

Model: LeNet (He et al.) split at ReLU2, followed by a fixed tanh bound (``FeatureBound("tanh")``: the
ReLU feature is squashed to [0, 1), so noise σ is relative to a feature range of 1 — ALGORITHMS §F.6),
or CEM's VGG-11 sigmoid-bottleneck model (``--model vgg11-bottleneck``, no extra bound; ``-slim``: CEM's
head with a quarter-width cloud, 3.4× faster to train on a CPU thread).

The default is a reduced run of about half an hour on one CPU thread (6,000 training images, 3 epochs,
short attacks); ``--full`` runs the whole grid (both datasets, λ ∈ {0, 8, 16} on every base, full
training sets, long attacks) and takes many hours. Every output line says whether attacks were adaptive.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/defense_sweep.py > /tmp/defense_sweep.log 2>&1

``--resume`` keeps the cells already in ``--out`` and runs only the missing ones; the measured grid of the
issue notes lives in ``benchmarks/results/`` (its README has the command that extends it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from splitshield import Trainer, Victim, load_dataset, split
from splitshield.attacks import InverseNetwork, WhiteBoxInversion
from splitshield.defenses import (
    CEM,
    VIB,
    AdversarialReconstruction,
    Defense,
    Dropout,
    FeatureBound,
    GaussianNoise,
    InfoScissors,
    NoDefense,
    NoPeek,
    Shredder,
    TopKPrune,
    noise_std,
)
from splitshield.metrics import conditional_entropy_floor, mse, psnr, ssim
from splitshield.models import build_model

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

#: base name -> (strength parameter name, default strengths,
#: factory(strength, feature_shape, standardised online adversary) -> Defense)
BASES: dict[str, tuple[str, list[float], Callable[[float, tuple[int, ...], bool], Defense]]] = {
    "noise": ("sigma", [0.05, 0.1, 0.2, 0.4], lambda s, shape, std: GaussianNoise(s)),
    "dropout": ("rate", [0.2, 0.4, 0.6, 0.8], lambda s, shape, std: Dropout(s)),
    "topk": ("ratio", [0.5, 0.75, 0.9, 0.97], lambda s, shape, std: TopKPrune(s)),
    "nopeek": ("alpha", [0.5, 1.0, 2.0, 4.0], lambda s, shape, std: NoPeek(s)),
    "adversarial": ("alpha", [0.3, 1.0, 3.0, 10.0],
                    lambda s, shape, std: AdversarialReconstruction(s, width=16, standardize=std)),
    # On LeNet at ReLU2, β = 0.01 already cost MNIST 13 points and β = 0.1 left chance accuracy.
    "vib": ("beta", [1e-5, 1e-4, 3e-4, 1e-3], lambda s, shape, std: VIB(shape[0], s)),
    # Adam moves Shredder's log-scale by at most about lr per step whatever its λ, so in a short training the
    # initial Laplace scale b₀ sets the noise level: λ = 0.1 to 3 at b₀ = 0.1 all left MNIST at 97.8-98.0 %.
    "shredder": ("b0", [0.25, 0.5, 1.0, 2.0], lambda s, shape, std: Shredder(shape, lam=1.0, init_scale=s)),
    "infoscissors": ("lam", [0.1, 0.3, 1.0, 3.0], lambda s, shape, std: InfoScissors(s, width=16, standardize=std)),
}

#: Bases that train an online decoder against the model (``--adversary-raw-features`` applies to them).
ONLINE_ADVERSARY_BASES = ("adversarial", "infoscissors")

#: Noise σ for LeNet's unbounded ReLU2 feature (``--bound none``), whose std grows to 2 to 7 with the noise: the
#: defaults above are for a feature bounded to [0, 1).
UNBOUNDED_NOISE = [0.25, 0.5, 1.0, 2.0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the whole grid: both datasets, λ∈{0,8,16} everywhere, "
                   "full training sets, long attacks (many hours)")
    p.add_argument("--datasets", nargs="+", default=None, help="mnist and/or fashion-mnist (default: mnist)")
    p.add_argument("--model", default="lenet", choices=["lenet", "vgg11-bottleneck", "vgg11-bottleneck-slim"],
                   help="LeNet at ReLU2, or CEM's VGG-11 at its sigmoid bottleneck (-slim: a quarter-width cloud)")
    p.add_argument("--bound", default="tanh", choices=["tanh", "sigmoid", "standardize", "none"],
                   help="LeNet only: fix the ReLU2 feature's scale with a FeatureBound (ALGORITHMS §F.6; "
                        "standardize: per-sample zero mean, unit variance) or send it unbounded (the setting of §F.7)")
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--strengths", nargs="+", type=float, default=None,
                   help="override the strengths of every base given (default: each base's four)")
    p.add_argument("--noise-lambdas", nargs="+", type=float, default=None, help="CEM λ on the noise base")
    p.add_argument("--other-lambdas", nargs="+", type=float, default=None, help="CEM λ on the other bases")
    p.add_argument("--cem-k", type=int, default=5, help="CEM clusters per class (code: 5 for *_sgm models, 15 else)")
    p.add_argument("--cem-tau", type=float, default=0.125, help="CEM hinge threshold τ (var_threshold)")
    p.add_argument("--cem-variance", default="mean", choices=["mean", "per_dim"],
                   help="CEM's variance: pooled over dimensions (the code) or hinged per dimension (older code)")
    p.add_argument("--cem-sigma", type=float, default=0.2,
                   help="hinge σ for CEM on bases without noise (hinge τσ²); noise bases use their own σ")
    p.add_argument("--train-size", type=int, default=None, help="training images (default 6000; full or 0: all)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--tail-epochs", type=int, default=0,
                   help="then train only the cloud tail for this many epochs, the edge head and its defense "
                        "parameters frozen: the attacks see the same head, only the accuracy can change (it "
                        "separates what a defense takes from the feature from a tail lagging behind a moving head)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (CEM's code trains with 128; "
                   "CEM's per-batch blend makes its effective strength grow with the batch, see CEM's docstring)")
    p.add_argument("--test-size", type=int, default=10000, help="test images for accuracy (the whole MNIST test set: "
                   "on 2000, the binomial error alone is ±0.4 points, the size of the 1-point matching window)")
    p.add_argument("--eval-size", type=int, default=500, help="test images for the black-box attack and floor")
    p.add_argument("--aux-size", type=int, default=15000, help="attacker's auxiliary images (holdout)")
    p.add_argument("--bb-steps", type=int, default=None, help="inverse-network steps (default 1400; full 3000)")
    p.add_argument("--bb-batch", type=int, default=128, help="inverse-network batch size")
    p.add_argument("--bb-raw-features", action="store_true",
                   help="feed the inverse network raw features, not standardised ones (the attack before "
                        "standardisation became its default: weaker, and fooled by a defense that changes the "
                        "feature's scale)")
    p.add_argument("--adversary-raw-features", action="store_true",
                   help="feed the online decoder of adversarial and infoscissors raw features (the defenses "
                        "before standardisation became their default: the head can then slow it by scale alone)")
    p.add_argument("--wb-iters", type=int, default=None, help="white-box rMLE iterations (default 150; full 1000)")
    p.add_argument("--non-adaptive", action="store_true", help="attackers ignore the defense (labelled so)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/defense_sweep.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out (written with the same protocol) and run only the missing "
                        "cells, so one file can collect a whole grid over several runs; concurrent runs on this "
                        "machine share the missing cells (each claims a cell before measuring it)")
    p.add_argument("--summarize", metavar="JSON", nargs="+",
                   help="only print the CEM gain table of finished runs' JSON files (merged; a cell measured "
                        "again in a later file replaces the earlier one)")
    p.add_argument("--overhead", type=int, metavar="REPEATS", default=0,
                   help="only measure CEM's training-time overhead on the noise base (sigma 0.5, lambda 0 vs 16), "
                        "REPEATS alternating runs each, in process CPU time (robust to other load on the machine)")
    args = p.parse_args(argv)
    if args.tail_epochs < 0:
        p.error(f"--tail-epochs must be >= 0, got {args.tail_epochs}; pass 0 for no tail-only training")
    full = args.full
    args.datasets = args.datasets or (["mnist", "fashion-mnist"] if full else ["mnist"])
    args.noise_lambdas = args.noise_lambdas or [0.0, 8.0, 16.0]
    args.other_lambdas = args.other_lambdas or ([0.0, 8.0, 16.0] if full else [0.0, 16.0])
    args.train_size = args.train_size if args.train_size is not None else (0 if full else 6000)  # 0: all
    args.epochs = args.epochs or (10 if full else 3)
    args.bb_steps = args.bb_steps or (3000 if full else 1400)
    args.wb_iters = args.wb_iters or (1000 if full else 150)
    return args


def build_target(model: str, in_channels: int, bound: str = "tanh"):
    if model == "lenet":
        return split(build_model("lenet", in_channels=in_channels), "ReLU2", input_shape=(in_channels, 28, 28)), \
            NoDefense() if bound == "none" else FeatureBound(bound)
    target = split(build_model(model, in_channels=in_channels), "sigmoid",
                   input_shape=(in_channels, 28, 28))
    return target, NoDefense()


def run_cell(args, data, train, base: str, strength: float, lam: float) -> dict:
    torch.manual_seed(args.seed)
    target, bound = build_target(args.model, data.image_shape[0], args.bound)
    shape = target.feature_shape()
    base_defense = BASES[base][2](strength, shape, not args.adversary_raw_features)
    parts: list[Defense] = [] if isinstance(bound, NoDefense) else [bound]
    parts.append(base_defense)
    if lam:
        parts.append(CEM(lam=lam, sigma=_cem_sigma(args, base, lam), k=args.cem_k, tau=args.cem_tau,
                         variance=args.cem_variance, seed=args.seed))
    defense = parts[0] + parts[1] if len(parts) >= 2 else parts[0]
    for extra in parts[2:]:
        defense = defense + extra
    trainer = Trainer(target, defense, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(train)
    train_time, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.tail_epochs:
        _fit_tail_only(trainer, train, args.tail_epochs)
    test = data.test.take(args.test_size)
    acc = trainer.evaluate(test)
    adaptive = not args.non_adaptive
    aux = data.holdout.take(args.aux_size)
    x_eval, _ = data.test.take(args.eval_size).tensors()
    x10, _ = data.test.first_per_class()

    # Black-box: decoder trained on the oracle's (defended) features of the auxiliary data.
    bb_victim = Victim(target, defense, threat="black_box", aux=aux, adaptive=adaptive, seed=args.seed + 1)
    attack = InverseNetwork(steps=args.bb_steps, batch_size=args.bb_batch, standardize=not args.bb_raw_features,
                            seed=args.seed, progress=False)
    attack.fit(bb_victim)
    z_eval = bb_victim.observe(x_eval)  # what the cloud receives: always the defended feature
    x_hat = attack.invert(z_eval)
    bb = {"mse": mse(x_hat, x_eval).item(), "ssim": ssim(x_hat, x_eval).item(), "psnr": psnr(x_hat, x_eval).item()}

    # White-box rMLE through the (re-sampled) obfuscation, He et al.'s 10-image protocol.
    wb_victim = Victim(target, defense, threat="white_box", aux=aux, adaptive=adaptive, seed=args.seed + 1)
    white = WhiteBoxInversion(iters=args.wb_iters, progress=False).fit(wb_victim)
    x10_hat = white.invert(wb_victim.observe(x10))
    wb = {"mse": mse(x10_hat, x10).item(), "ssim": ssim(x10_hat, x10).item(), "psnr": psnr(x10_hat, x10).item()}
    bb10 = mse(attack.invert(bb_victim.observe(x10)), x10).item()

    # Conditional-entropy floor: clean features (deterministic part of the defense) and the fixed noise std,
    # fitted on the auxiliary images: more samples per class than pixels, so the image covariance has full rank.
    sigma = noise_std(defense, shape)
    x_fit, y_fit = aux.tensors()
    with torch.no_grad():
        target.eval()
        defense.eval()
        z_clean = defense.clean(target.head(x_fit))
    floor = conditional_entropy_floor(x_fit, z_clean, sigma, y_fit)["mse_floor"]
    strongest = min(bb["mse"], wb["mse"], bb10)
    feature_std = z_clean.std().item()
    learned = [part for part in getattr(defense, "parts", [defense]) if isinstance(part, Shredder)]
    return {**_cell_identity(args, data.name, base, strength, lam), "test_size": len(test), "accuracy": acc,
            "bb": bb, "wb": wb, "floor": floor, "strongest_mse": strongest, "floor_ok": floor <= strongest,
            "noise_std": sigma, "learned_noise_std": learned[0].learned_std() if learned else None,
            "feature_std": feature_std, "train_time": train_time, "train_cpu": train_cpu,
            "adaptive": adaptive}


def _fit_tail_only(trainer: Trainer, train, epochs: int) -> None:
    """Train ``epochs`` more epochs with every optimised parameter but the tail's frozen."""
    tail = {id(p) for p in trainer.target.tail.parameters()}
    edge = [p for group in trainer.optimizer.param_groups for p in group["params"]
            if id(p) not in tail and p.requires_grad]
    for p in edge:
        p.requires_grad_(False)
    trainer.epochs += epochs
    try:
        trainer.fit(train)
    finally:
        for p in edge:
            p.requires_grad_(True)


def _cell_identity(args: argparse.Namespace, dataset: str, base: str, strength: float, lam: float) -> dict:
    """The fields of a row that say which cell it is (see :func:`_cell_key`)."""
    return {"dataset": dataset, "model": args.model, "bound": _bound_label(args), "epochs": args.epochs,
            "tail_epochs": args.tail_epochs,
            "batch_size": args.batch_size, "bb_raw_features": args.bb_raw_features, "base": base,
            "param": BASES[base][0], "strength": strength, "seed": args.seed, "lam": lam, "cem_k": args.cem_k,
            "cem_tau": args.cem_tau, "cem_variance": args.cem_variance, "cem_sigma": _cem_sigma(args, base, lam),
            "adversary_raw_features": args.adversary_raw_features if base in ONLINE_ADVERSARY_BASES else None}


def _cem_sigma(args: argparse.Namespace, base: str, lam: float) -> float | None:
    """CEM's explicit hinge σ: only bases without noise need one (a noise base's CEM reads its σ)."""
    return args.cem_sigma if lam and base != "noise" else None


def _bound_label(args: argparse.Namespace) -> str:
    """The feature bound a row records: the LeNet bound, or the VGG model's own sigmoid."""
    return args.bound if args.model == "lenet" else "sigmoid"


def _cem_variant(row: dict) -> tuple[float, int, float, str]:
    """(λ, k, τ, variance) of a row's CEM; rows written before these were recorded used the defaults."""
    return row["lam"], row.get("cem_k", 5), row.get("cem_tau", 0.125), row.get("cem_variance", "mean")


#: The strength parameter a base swept before rows recorded theirs (``param``), where it is not today's.
_FORMER_PARAMS = {"shredder": "lam"}


def _setting(row: dict) -> str:
    """Dataset, model, feature bound, training protocol (epochs, tail-only epochs, batch size), black-box
    attack (``raw-bb``: rows written before the inverse network standardised its input), for the bases
    with an online decoder, that decoder (``raw-adv``: rows written before it standardised its input),
    and a strength parameter other than today's (``shredder-lam``): the rows whose numbers are comparable."""
    raw = "/raw-bb" if row.get("bb_raw_features", True) else ""
    if row["base"] in ONLINE_ADVERSARY_BASES and row.get("adversary_raw_features", True):
        raw += "/raw-adv"
    param = row.get("param", _FORMER_PARAMS.get(row["base"], BASES[row["base"]][0]))
    if param != BASES[row["base"]][0]:
        raw += f"/{row['base']}-{param}"
    tail = f"+t{row['tail_epochs']}" if row.get("tail_epochs") else ""
    return f"{row['dataset']}/{row['model']}/{row['bound']}/e{row['epochs']}{tail}b{row.get('batch_size', 64)}{raw}"


def _cell_key(row: dict) -> tuple:
    """What identifies a cell: its protocol, base, strength, seed and CEM variant (with its hinge σ)."""
    return (_setting(row), row["base"], row["strength"], row["seed"], *_cem_variant(row), row.get("cem_sigma"))


#: Settings that change a cell's numbers without being part of its key: a resumed file must share them.
PROTOCOL = ("model", "bound", "train_size", "epochs", "batch_size", "test_size", "eval_size", "aux_size",
            "bb_steps", "bb_batch", "bb_raw_features", "wb_iters", "non_adaptive")


def resumed_rows(args: argparse.Namespace) -> list[dict]:
    """The rows of ``args.out`` for ``--resume`` (none if the file does not exist yet); exits with a one-line
    message if that file was written with another protocol."""
    path = Path(args.out)
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        settings, rows = saved["settings"], saved["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        sys.exit(f"--resume: {path} is not a defense_sweep result file ({exc}); pass another --out")
    for key in PROTOCOL:
        if settings.get(key) != getattr(args, key):
            sys.exit(f"--resume: {path} was written with {key}={settings.get(key)!r}, this run has "
                     f"{getattr(args, key)!r}; pass the same {key} or another --out")
    return rows


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder``, held by one process at a time (POSIX ``flock``)."""
    import fcntl  # POSIX only, like the rest of the benchmarks' tooling

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _claims_path(args: argparse.Namespace) -> Path:
    return Path(args.out).with_name(Path(args.out).name + ".claims")


def _process_id(pid: int) -> str | None:
    """``"pid:start time"`` of a running process, or ``None`` if it has ended (or is a zombie). The start time
    (Linux ``/proc``) tells a claim's process from a later one that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) "
    return None if fields[0] in ("Z", "X") else f"{pid}:{fields[19]}"


def _me() -> str:
    return _process_id(os.getpid()) or str(os.getpid())


def _live_claims(args: argparse.Namespace) -> dict[str, str]:
    """``cell key (JSON) -> "pid:start time"`` of the cells being measured by processes still running on this
    machine (call under the folder lock)."""
    path = _claims_path(args)
    try:
        claims = json.loads(path.read_text()) if path.exists() else {}
        return {key: owner for key, owner in claims.items() if _process_id(int(owner.split(":")[0])) == owner}
    except (ValueError, AttributeError) as exc:
        sys.exit(f"--resume: {path} is not a claims file ({exc}); delete it when no sweep is running")


def _write_claims(args: argparse.Namespace, claims: dict[str, str]) -> None:
    path = _claims_path(args)
    if not claims:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(claims, indent=1))
    partial.replace(path)


def claim_cell(args: argparse.Namespace, key: tuple) -> bool:
    """Whether this process should measure the cell ``key``. With ``--resume``: only if ``args.out`` does not
    hold it yet and no other running process on this machine is measuring it; it is then claimed for this one
    (in ``<out>.claims``) until :func:`save_rows` writes it. So several sweeps given the same grid share it."""
    if not args.resume:
        return True
    token = json.dumps(list(key))
    with _folder_lock(Path(args.out).parent):
        if key in {_cell_key(r) for r in resumed_rows(args)}:
            return False
        claims = _live_claims(args)
        if claims.get(token, _me()) != _me():
            print(f"skipped (being measured by process {claims[token].split(':')[0]}): {token}", flush=True)
            return False
        _write_claims(args, {**claims, token: _me()})
    return True


def save_rows(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Write ``rows`` and their CEM gains to ``args.out`` (atomically) and return the rows the file then holds.
    With ``--resume`` they are merged, under a lock on the folder, into the rows the file holds at that
    moment (a row of ``rows`` replaces the file's row of the same cell), so that several processes can fill
    one file, and this process's claims on them are released."""
    path = Path(args.out)
    with _folder_lock(path.parent):
        if args.resume:
            rows = list({_cell_key(r): r for r in [*resumed_rows(args), *rows]}.values())
        saved = {"settings": vars(args), "rows": rows, "gains": cem_gains(rows)}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(saved, indent=1))
        partial.replace(path)
        if args.resume and _claims_path(args).exists():
            written = {json.dumps(list(_cell_key(r))) for r in rows}
            _write_claims(args, {k: owner for k, owner in _live_claims(args).items()
                                 if not (owner == _me() and k in written)})
    return rows


def cem_gains(rows: list[dict]) -> list[dict]:
    """Per (dataset, base, CEM variant with λ>0): relative black-box MSE increases over the no-CEM rows."""
    out = []
    reference = {(_setting(r), r["base"], r["strength"], r["seed"]): r for r in rows if not r["lam"]}
    for setting in sorted({_setting(r) for r in rows}):
        for base in BASES:
            mine = [r for r in rows if (_setting(r), r["base"]) == (setting, base)]
            curve = sorted((r["accuracy"], r["bb"]["mse"]) for r in mine if not r["lam"])
            for variant in sorted({_cem_variant(r) for r in mine if r["lam"]}):
                matched, every, ratios, interpolated = [], [], [], []
                for r in (r for r in mine if _cem_variant(r) == variant):
                    if (ref_mse := _mse_at_accuracy(curve, r["accuracy"])) is not None:
                        interpolated.append(r["bb"]["mse"] / ref_mse - 1)
                    ref = reference.get((setting, base, r["strength"], r["seed"]))
                    if ref is None:
                        continue
                    gain = r["bb"]["mse"] / ref["bb"]["mse"] - 1
                    every.append(gain)
                    ratios.append(r["train_time"] / ref["train_time"])
                    if abs(r["accuracy"] - ref["accuracy"]) <= 0.01:
                        matched.append(gain)
                lam, k, tau, variance = variant
                out.append({"dataset": setting, "base": base, "lam": lam, "k": k, "tau": tau, "variance": variance,
                            "matched": matched,
                            "all": every, "curve_matched": interpolated,
                            "time_ratio": sum(ratios) / len(ratios) if ratios else math.nan})
    return out


def _mse_at_accuracy(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    """The no-CEM attack MSE at ``accuracy``, linearly interpolated along the base's (accuracy, MSE) points.

    ``None`` outside the measured accuracy range (extended by 1 point at each end).
    """
    if not curve or not curve[0][0] - 0.01 <= accuracy <= curve[-1][0] + 0.01:
        return None
    if accuracy <= curve[0][0]:
        return curve[0][1]
    for (a0, m0), (a1, m1) in zip(curve, curve[1:], strict=False):
        if a0 <= accuracy <= a1:
            return m0 if a1 == a0 else m0 + (m1 - m0) * (accuracy - a0) / (a1 - a0)
    return curve[-1][1]


def print_gains(rows: list[dict], label: str) -> None:
    """Print the CEM gain table."""
    print(f"\n== CEM gain ({label}): relative increase of black-box MSE with CEM ==")
    print("same-strength = vs the same base & strength without CEM, over pairs whose accuracies differ by <= 1 point "
          "(and over all pairs); curve = vs the no-CEM (accuracy, MSE) curve interpolated at the CEM point's "
          "accuracy. Paper: +12.9% to +48.2% on average; our target on the noise base: >= +48.2%")
    print(f"{'dataset/model/bound/protocol':<38} {'base':<12} {'lam':>4} {'k':>3} {'tau':>6} {'var':>7} {'matched':>8} "
          f"{'same-str(matched)':>17} {'same-str(all)':>13} {'curve(n)':>14} {'CEM time ratio':>14}")
    gains = cem_gains(rows)

    def mean(values: list[float]) -> str:
        return f"{100 * sum(values) / len(values):+.1f}%" if values else "n/a"

    for g in gains:
        curve = f"{mean(g['curve_matched'])} ({len(g['curve_matched'])})"
        print(f"{g['dataset']:<38} {g['base']:<12} {g['lam']:>4g} {g['k']:>3} {g['tau']:>6g} {g['variance']:>7} "
              f"{len(g['matched']):>3}/{len(g['all']):<4} "
              f"{mean(g['matched']):>17} {mean(g['all']):>13} {curve:>14} {g['time_ratio']:>14.2f}")


def measure_overhead(args: argparse.Namespace) -> None:
    """CPU seconds to train LeNet with Gaussian noise σ = 0.5 (with the sweep's bound), without CEM and with
    CEM (λ = 16) clustering the epoch's own features (the default) or a fresh pass (the authors' code)."""
    print("command:", shlex.join([sys.executable, *sys.argv]))
    data = load_dataset(args.datasets[0], data_dir=DATA_DIR, seed=args.seed)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))
    train = data.train.subset(order[: args.train_size]) if args.train_size else data.train
    cpu: dict[str, list[float]] = {"none": [], "epoch": [], "refresh": []}
    for _ in range(args.overhead):
        for mode in cpu:
            torch.manual_seed(args.seed)
            target, bound = build_target(args.model, data.image_shape[0], args.bound)
            defense = bound + GaussianNoise(0.5)
            if mode != "none":
                defense = defense + CEM(lam=16, cluster_features=mode, seed=args.seed)
            trainer = Trainer(target, defense, epochs=args.epochs, seed=args.seed, progress=False)
            c0 = time.process_time()
            trainer.fit(train)
            cpu[mode].append(time.process_time() - c0)
    mean = {mode: sum(times) / len(times) for mode, times in cpu.items()}
    print(f"training CPU time, {len(train)} images x {args.epochs} epochs, {args.threads} thread(s), "
          f"{args.overhead} alternating runs each:")
    for mode, times in cpu.items():
        print(f"  {'without CEM' if mode == 'none' else 'CEM, ' + mode + ' features':<24} {mean[mode]:7.1f} s "
              f"{[round(t, 1) for t in times]}  ratio {mean[mode] / mean['none']:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        rows = []
        for path in args.summarize:
            saved = json.loads(Path(path).read_text())
            settings = saved["settings"]  # rows written before the model and bound were recorded per row
            defaults = {"model": settings["model"], "bound": settings.get("bound", "tanh"), "seed": settings["seed"],
                        "epochs": settings["epochs"]}
            rows += [{**defaults, **row} for row in saved["rows"]]
        # A cell measured again in a later file replaces the earlier measurement.
        rows = list({_cell_key(r): r for r in rows}.values())
        adaptive = all(r["adaptive"] for r in rows)
        print_gains(rows, "ADAPTIVE attackers" if adaptive else "NON-ADAPTIVE attackers (some or all rows)")
        return
    if not Path(args.out).parent.is_dir():
        sys.exit(f"--out: folder {Path(args.out).parent} does not exist; create it or pass another --out")
    torch.set_num_threads(args.threads)
    if args.overhead:
        measure_overhead(args)
        return
    label = "ADAPTIVE attackers" if not args.non_adaptive else "NON-ADAPTIVE attackers (they ignore the defense)"
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("settings:", json.dumps({k: v for k, v in vars(args).items()}, sort_keys=True))
    print(f"attacks: {label}; black-box = inverse network (the attack's default decoder and optimiser, "
          f"{'raw' if args.bb_raw_features else 'standardised'} features, {args.bb_steps} steps of {args.bb_batch}, "
          f"aux = {args.aux_size} holdout images), white-box = rMLE ({args.wb_iters} iters, first test image per "
          f"class); SSIM = 7x7 uniform (He et al.); model = {args.model}"
          + (f" at ReLU2, bound: {args.bound}" if args.model == "lenet" else " at the sigmoid bottleneck"), flush=True)
    if args.resume and (kept := resumed_rows(args)):
        print(f"resuming {args.out}: {len(kept)} cells already measured are kept and skipped", flush=True)
    # Only this run's own rows are saved (merged into the file under its lock): a row another process wrote
    # meanwhile is never overwritten by a copy this one read at its start.
    rows: list[dict] = []
    started = time.perf_counter()
    for name in args.datasets:
        data = load_dataset(name, data_dir=DATA_DIR, seed=args.seed)
        train = data.train
        if args.train_size:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
            train = train.subset(order[: args.train_size])
        print(f"\n== {name}: train {len(train)}, test acc on {min(args.test_size, len(data.test))}, "
              f"attack eval on {args.eval_size} test images; {label} ==", flush=True)
        header = (f"{'base':<12} {'param':>12} {'lam':>4} {'acc%':>6} {'bbMSE':>7} {'bbSSIM':>6} {'bbPSNR':>6} "
                  f"{'wbPSNR':>6} {'wbSSIM':>6} {'floor':>8} {'floor<=atk':>10} {'σ/std(z)':>8} {'train s':>7}")
        print(header, flush=True)
        for base in args.bases:
            param, strengths, _ = BASES[base]
            if base == "noise" and args.model == "lenet" and args.bound == "none":
                strengths = UNBOUNDED_NOISE
            strengths = args.strengths or strengths
            lams = args.noise_lambdas if base == "noise" else args.other_lambdas
            for strength in strengths:
                for lam in lams:
                    key = _cell_key(_cell_identity(args, data.name, base, strength, lam))
                    if not claim_cell(args, key):
                        continue
                    r = run_cell(args, data, train, base, strength, lam)
                    rows.append(r)
                    noise = r["noise_std"] or r["learned_noise_std"] or 0.0
                    rel = noise / r["feature_std"] if r["feature_std"] else 0.0
                    ok = ("yes" if r["floor_ok"] else "VIOLATED") if r["noise_std"] else "n/a(no σ)"
                    print(f"{base:<12} {param + '=' + format(strength, 'g'):>12} {lam:>4g} {100 * r['accuracy']:>6.2f} "
                          f"{r['bb']['mse']:>7.4f} {r['bb']['ssim']:>6.3f} {r['bb']['psnr']:>6.2f} "
                          f"{r['wb']['psnr']:>6.2f} {r['wb']['ssim']:>6.3f} {r['floor']:>8.2e} {ok:>10} "
                          f"{rel:>8.2f} {r['train_time']:>7.1f}", flush=True)
                    save_rows(args, rows)
    rows = save_rows(args, rows)
    print_gains(rows, label)
    violations = [r for r in rows if r["noise_std"] and not r["floor_ok"]]
    print(f"\nconditional-entropy floor violated in {len(violations)} of "
          f"{sum(1 for r in rows if r['noise_std'])} cells with fixed noise")
    print(f"total wall time {time.perf_counter() - started:.0f} s; rows in {args.out}")


if __name__ == "__main__":
    main()
