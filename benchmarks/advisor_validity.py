"""Is the advisor's fast leakage ranking of split points the full-budget attacks' ranking?

For every chosen split point of a trained model, ``ss.advise`` gives its fast estimates (the SSIM of a small-budget
inverse network, of a small-budget white-box rMLE and the best of the two; the CE floor; the GPZ statistic R̄²/V);
then three full-budget attacks run at the same point,
each through the one measurement pipeline (``measure_attack``): white-box rMLE, the inverse network and the
query-free shadow head, on He et al.'s protocol (the first test image of each class). A point's leakage is the
best of the three (the highest mean SSIM). The script prints every number per point and the Spearman rank
correlation ρ of each fast measure with the full-budget leakage (the CE floor enters negated: a higher floor means
less leakage; the issue asks for ρ ≥ 0.9).

    python benchmarks/advisor_validity.py --model lenet                   # LeNet / MNIST, all 13 points
    python benchmarks/advisor_validity.py --model cifar-cnn               # He et al.'s CIFAR-10 net, all points
    python benchmarks/advisor_validity.py --model cifar-cnn --checkpoint benchmarks/results/artifacts/targets/HASH
                                          # ... the engine's target of examples/he2019_cifar.yaml, not trained again
    python benchmarks/advisor_validity.py --model resnet18 --points 8     # ResNet-18 / CIFAR-10, 8 spaced points
    python benchmarks/advisor_validity.py --model resnet20 --points 8 --checkpoint TARGET
                                          # ResNet-20 / CIFAR-10, TARGET the engine's undefended target of
                                          # examples/infoscissors_ushaped.yaml (benchmarks/results/artifacts/targets/…)

``benchmarks/advisor_validity_table.py`` turns the JSON files (``--json``) into one Markdown table per model.
A point takes 10–40 minutes on the CIFAR-10 models (one thread), so a long run can be split over processes (or
machines) and joined; each process resumes from its own JSON:

    python benchmarks/advisor_validity.py --model resnet18 --points 8 --threads 1 --shard 0/2 --json r0.json
    python benchmarks/advisor_validity.py --model resnet18 --points 8 --threads 1 --shard 1/2 --json r1.json
    python benchmarks/advisor_validity.py --model resnet18 --points 8 --json all.json --merge r0.json r1.json

Give the shards a trained model first (``--checkpoint``, or one run that trains and caches it): shards started
together would each train it and write the same cache file.

The model is trained once and cached (``--cache``); data come from ``--data-dir`` (``../shared/data``: MNIST, and
CIFAR-10 as JPEG quality 75, about 30 dB from the original pixels: say so with CIFAR numbers). ``--scale`` scales
every full-budget attack's steps (0.3: a quicker run, labelled as such in the output). ``--rmle-search none`` runs
white-box rMLE at the table's setting on [0, 1] pixels (He et al.'s values at their points, a fallback elsewhere)
instead of its own setting search, which on the CIFAR network costs hours per deep point; the output says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import splitshield as ss
from splitshield.attacks.decoders import he2019_decoder, wants_dense_decoder
from splitshield.measure import attack_seed, measure_attack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

#: (dataset, epochs) per model.
MODELS = {"lenet": ("mnist", 3), "cifar-cnn": ("cifar10", 20), "resnet18": ("cifar10", 15),
          "resnet20": ("cifar10", 10)}
#: The fast measures ρ is computed for: (row key, label, sign: +1 when a higher value means more leakage).
MEASURES = (("fast_ssim", "fast SSIM, strongest of the two", 1), ("fast_black_box_ssim", "fast black-box SSIM", 1),
            ("fast_white_box_ssim", "fast white-box SSIM", 1), ("gpz_r2_norm", "GPZ R̄²/V", 1),
            ("gpz_r2", "GPZ R̄² (raw)", 1), ("ce_floor", "CE floor (negated)", -1))
#: The full budgets: the attacks' own defaults (rMLE iterations None: He et al.'s per point, else 3000).
FULL = {"rmle_iters": 3000, "decoder_steps": 3000, "shadow_steps": 3000}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (ties get their average rank)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                out[k] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def trained_model(name: str, data: ss.Dataset, epochs: int, seed: int, cache: Path,
                  checkpoint: Path | None = None) -> tuple[torch.nn.Module, float]:
    """The model trained on ``data.train`` (cached as a checkpoint), and its test accuracy; or, with
    ``checkpoint``, the undefended model trained elsewhere (its weights loaded, its accuracy measured)."""
    net = ss.build_model(name, num_classes=data.num_classes, input_shape=data.image_shape, seed=seed)
    if checkpoint is not None:
        try:
            target, defense, meta = ss.load_checkpoint(checkpoint, model=net)
        except ss.SplitShieldError as exc:
            sys.exit(f"--checkpoint {checkpoint}: {exc}")
        if defense.config().get("name", "none") != "none":
            sys.exit(f"--checkpoint {checkpoint}: a defended model ({defense.config()}); give an undefended one")
        # The seed also chose the train/holdout split: another seed's "same distribution" images would be
        # images the model was trained on.
        trained = meta.get("target_config", {})
        wanted = {"dataset": data.name, "model": name, "seed": seed}
        if any(trained.get(k, v) != v for k, v in wanted.items()):
            sys.exit(f"--checkpoint {checkpoint}: trained with {({k: trained.get(k) for k in wanted})}, "
                     f"not {wanted}; pass the matching --model/--seed")
        return net, ss.evaluate(target, None, data.test)
    path = cache / f"{name}-{data.name}-e{epochs}-seed{seed}"
    if path.with_suffix(".safetensors").is_file():
        target, _, meta = ss.load_checkpoint(path, model=net)
        return net, meta["metrics"]["test_accuracy"]
    target = ss.split(net, ss.split_points(net, data.image_shape)[-1].name, input_shape=data.image_shape)
    start = time.perf_counter()
    trainer = ss.Trainer(target, epochs=epochs, seed=seed, progress=False)
    trainer.fit(data.train)
    accuracy = trainer.evaluate(data.test)
    trainer.save(path, metrics={"test_accuracy": accuracy})
    print(f"trained {name} {epochs} epochs in {time.perf_counter() - start:.0f} s: test accuracy {accuracy:.2%}",
          flush=True)
    return net, accuracy


def full_attacks(args: argparse.Namespace) -> dict[str, dict]:
    """The three full-budget attack settings, steps scaled by ``args.scale``."""
    def steps(key: str) -> int:
        return max(1, round(FULL[key] * args.scale))

    iters = None if args.scale == 1 else steps("rmle_iters")
    common = {"aux": "same_distribution", "aux_n": None, "adaptive": True}
    rmle = {"iters": iters} if args.rmle_search == "auto" else {"iters": iters, "search": None}
    return {
        "white-box rMLE": {"name": "rmle", "threat": "white_box", **common, "params": rmle},
        "inverse network": {"name": "inverse_network", "threat": "black_box", **common,
                            "params": {"steps": steps("decoder_steps")}},
        "query-free": {"name": "shadow_head", "threat": "query_free", **common,
                       "params": {"steps": steps("shadow_steps"), "iters": iters}},
    }


def spaced(points: list[str], k: int) -> list[str]:
    """``k`` points spread evenly over ``points``, first and last included (all of them when there are fewer)."""
    if k >= len(points):
        return points
    return [points[round(i * (len(points) - 1) / (k - 1))] for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet")
    parser.add_argument("--points", type=int, default=0, help="score this many evenly spaced points (0: all)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default per model)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the full-budget attacks' steps")
    parser.add_argument("--rmle-search", choices=("auto", "none"), default="auto",
                        help="white-box rMLE's setting: its own search (auto, the default attack) or the table's "
                             "on [0, 1] pixels (none: minutes instead of CPU-hours per deep point of the CIFAR "
                             "network)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "splitshield" / "advisor-validity")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="an undefended trained checkpoint of --model to use instead of training one, e.g. the "
                             "engine's target of examples/he2019_cifar.yaml (benchmarks/results/artifacts/targets/…)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write every number to this JSON file after each point; a rerun with the same settings "
                             "keeps the points it already holds (resume a long run)")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="measure only every N-th point from the K-th (K = 0 … N-1), to run N processes side by "
                             "side, each with its own --json; then join them with --merge")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="take the points these JSON files of the same settings hold (other shards) as measured")
    args = parser.parse_args()
    shard, shards = parse_shard(args.shard)
    if args.points < 0 or args.points == 1:
        sys.exit(f"--points: 0 (every point) or at least 2 for a rank correlation, got {args.points}")
    if not 0 < args.scale < math.inf:
        sys.exit(f"--scale: a positive finite factor on the attacks' steps (1: the full budget), got {args.scale:g}")
    if shards > 1 and args.json is None:
        sys.exit("--shard: a shard needs --json FILE to keep its rows for --merge")
    if args.json is not None and args.json in args.merge:
        sys.exit(f"--merge: {args.json} is this run's own --json; name the other shards' files")
    if args.json is not None and not args.json.parent.is_dir():
        sys.exit(f"--json: the folder {args.json.parent} does not exist; create it or pass another path")
    settings = full_attacks(args)
    # The own file last: its rows win.
    sources = [*((path, "--merge") for path in args.merge), *([(args.json, "--json")] if args.json else [])]
    for path, flag in sources:  # before any training: a file of another run is refused, never overwritten
        previous_rows(path, flag, args, settings)
    torch.set_num_threads(args.threads)
    dataset, epochs = MODELS[args.model]
    epochs = args.epochs or epochs
    print("command:", " ".join(sys.argv), "| settings:", {k: str(v) for k, v in vars(args).items()}, flush=True)
    data = ss.load_dataset(dataset, data_dir=args.data_dir, seed=args.seed)
    net, accuracy = trained_model(args.model, data, epochs, args.seed, args.cache, args.checkpoint)
    legal = [p.name for p in ss.split_points(net, data.image_shape)]
    points = spaced(legal, args.points) if args.points else legal
    done: dict[str, dict] = {}
    for path, flag in sources:
        done |= previous_rows(path, flag, args, settings, accuracy, points)

    start = time.perf_counter()
    advice = ss.advise(net, data, points=points, seed=args.seed, progress=False)
    print(f"advisor: {len(points)} points in {time.perf_counter() - start:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in advice.timings.items())})", flush=True)

    label = "full budget" if args.scale == 1 else f"budget × {args.scale:g} (NOT the full budget)"
    if args.rmle_search == "none":
        label += ", rMLE at the table's setting (no own search)"
    lossy = " on JPEG-lossy CIFAR-10" if dataset == "cifar10" else ""
    print(f"\n{args.model} on {dataset} (test accuracy {accuracy:.2%}); attacks at {label}, "
          f"first test image of each class; SSIM (7×7 uniform window){lossy}")
    header = f"{'point':14} {'fast BB':>7} {'fast WB':>7} {'CE floor':>9} {'R̄²/V':>6} | " + " ".join(
        f"{k:>15}" for k in settings) + f" | {'best':>6} {'s':>5}"
    print(header)
    print("-" * len(header))
    rows, stale = [], []
    net.eval()
    for index, point in enumerate(points):
        mine = index % shards == shard
        earlier = done.get(point, {})
        if not (mine or earlier):
            continue  # another shard's
        target = ss.split(net, point, input_shape=data.image_shape)
        clock = time.perf_counter()
        ssim: dict[str, float | None] = earlier.get("attacks", {})
        decoder = decoder_kind(point, target, data.image_shape)
        if earlier and earlier["decoder"] != decoder:  # the inverse network builds another decoder now
            if mine:  # run it again
                ssim = {name: v for name, v in ssim.items() if settings[name]["name"] != "inverse_network"}
            else:  # another shard's row, kept as it is: no rank correlation from it
                stale.append(point)
                decoder = earlier["decoder"]
        for name, setting in settings.items():
            if name in ssim:
                continue
            if setting["name"] == "shadow_head" and not any(True for _ in target.head.parameters()):
                ssim[name] = None  # a head without weights (input normalisation) has no shadow to train
                continue
            result = measure_attack(target, None, data, setting, images="first_per_class",
                                    seed=attack_seed(args.seed, setting), metrics=("ssim", "psnr"))
            ssim[name] = next(v for metric, i, v in result.metrics if metric == "ssim" and i == -1)
        ssim = {name: ssim[name] for name in settings}  # in the settings' order, whichever ran again
        row = advice.row(point)
        rows.append({"point": point, "decoder": decoder, "fast_ssim": row.ssim,
                     "fast_black_box_ssim": row.black_box_ssim, "fast_white_box_ssim": row.white_box_ssim,
                     "ce_floor": row.ce_floor, "gpz_r2_norm": row.gpz_r2_norm, "gpz_r2": row.gpz_r2, "attacks": ssim,
                     "best": max(v for v in ssim.values() if v is not None),
                     "seconds": earlier.get("seconds", 0.0) + time.perf_counter() - clock})
        if args.json:
            write(args.json, args, accuracy, settings, label, rows, {}, advice, len(points))
        cells = " ".join(f"{v:15.3f}" if v is not None else f"{'–':>15}" for v in ssim.values())
        print(f"{point:14} {row.black_box_ssim:7.3f} {row.white_box_ssim:7.3f} {row.ce_floor or float('nan'):9.3g} "
              f"{row.gpz_r2_norm:6.3f} | {cells} | "
              f"{rows[-1]['best']:6.3f} {rows[-1]['seconds']:5.0f}", flush=True)

    if len(rows) < len(points) or stale:
        why = f" ({', '.join(stale)}: another shard's, with a decoder today's code no longer builds)" if stale else ""
        print(f"\n{len(rows) - len(stale)} of {len(points)} points measured{why}; join the shards' JSON files with "
              "--merge for the rank correlations.")
        return
    best = [r["best"] for r in rows]
    measures = {label: [sign * (r[key] if r[key] is not None else float("nan")) for r in rows]
                for key, label, sign in MEASURES}
    print(f"\nSpearman ρ with the full-budget best SSIM over {len(rows)} points ({label}):")
    correlations = {}
    for name, values in measures.items():
        rho = spearman(values, best)
        correlations[name] = rho
        verdict = ("no verdict at a reduced budget" if args.scale != 1
                   else "meets ρ ≥ 0.9" if rho >= 0.9 else "does NOT meet ρ ≥ 0.9")
        print(f"  {name:28} ρ = {rho:+.3f}  {verdict}")
    for name in settings:
        alone = [(r["attacks"][name], r["best"]) for r in rows if r["attacks"][name] is not None]
        rho = spearman([a for a, _ in alone], [b for _, b in alone])
        print(f"  (full-budget {name} alone vs the best, {len(alone)} points: ρ = {rho:+.3f})")
    if args.json:
        write(args.json, args, accuracy, settings, label, rows, correlations, advice, len(points))


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N), with 0 ≤ K < N; exits with a one-line error otherwise."""
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        shard, shards = -1, 0
    if not 0 <= shard < shards:
        sys.exit(f"--shard: K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes; got {text!r}")
    return shard, shards


def decoder_kind(point: str, target: ss.SplitModel, image_shape: tuple[int, int, int]) -> str:
    """The decoder the inverse network builds at ``point``: He et al.'s hand-made one, the dense or the
    convolutional one (:func:`~splitshield.attacks.decoders.build_decoder`)."""
    feature = target.feature_shape(image_shape)  # in eval mode: a 1×1 map after BatchNorm would not run in train
    if he2019_decoder(point, feature) is not None:
        return "he2019"
    return "dense" if wants_dense_decoder(feature, image_shape) else "conv"


def write(path: Path, args: argparse.Namespace, accuracy: float, settings: dict, label: str, rows: list[dict],
          correlations: dict[str, float], advice: ss.Advice, planned: int) -> None:
    """Replace ``path`` in one step, so that a killed run or a shard reading it never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"model": args.model, "seed": args.seed, "accuracy": accuracy, "settings": settings,
                                   "budget": label, "points": planned, "rows": rows, "spearman": correlations,
                                   "fast_attacks": advice.meta["fast_attacks"], "advisor_timings": advice.timings},
                                  indent=2))
    os.replace(partial, path)


def previous_rows(path: Path, flag: str, args: argparse.Namespace, settings: dict, accuracy: float | None = None,
                  points: list[str] | None = None) -> dict[str, dict]:
    """Per point of an earlier run in ``path`` (given by ``flag``, ``--json`` or ``--merge``): its full-budget SSIMs
    (``attacks``), the seconds they took (``seconds``) and the inverse network's decoder (``decoder``); nothing until
    ``accuracy`` is known. Exits with a one-line error when the file holds a run of another model, seed, attack
    settings or test accuracy, or (the own ``--json``, which is rewritten) points outside ``points``, so that no
    earlier run is overwritten or mixed in."""
    if not path.is_file():
        if flag == "--merge":
            sys.exit(f"--merge: {path} does not exist; name the JSON files the other shards wrote")
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        sys.exit(f"{flag}: {path} is not a complete JSON file ({exc}); restore it, or delete it to start afresh")
    ours = {"model": args.model, "seed": args.seed, "settings": json.loads(json.dumps(settings)),
            "accuracy": accuracy}
    words = {"model": "model", "seed": "seed", "settings": "attack settings", "accuracy": "test accuracy"}
    other = [words[key] for key, value in ours.items() if value is not None and old.get(key) != value]
    if other:
        fix = ("merge only the shards of this run" if flag == "--merge"
               else "pass another --json file, or delete this one to start afresh")
        set_by = ", set by --scale and --rmle-search" if "attack settings" in other else ""
        sys.exit(f"{flag}: {path} holds another run (different {', '.join(other)}{set_by}); {fix}")
    if accuracy is None:
        return {}
    outside = [row["point"] for row in old["rows"] if row["point"] not in (points or [])]
    if flag == "--json" and outside:
        sys.exit(f"--json: {path} holds points this run does not plan ({', '.join(outside)}); pass the same "
                 "--points as before, or another --json file")
    print(f"resuming: {len(old['rows'])} points from {path}", flush=True)
    return {row["point"]: {"attacks": row["attacks"], "seconds": row["seconds"], "decoder": row["decoder"]}
            for row in old["rows"]}


if __name__ == "__main__":
    main()
