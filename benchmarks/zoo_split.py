"""Does ``split`` keep its promise on every torchvision classifier, in both modes?

For each classifier of ``torchvision.models.list_models()`` (randomly initialised, 10 classes, auxiliary
heads off) the model is built in train mode, as a fresh model is, and cut at ``--points`` evenly spaced
legal points. Each cut is checked with :func:`splitshield.models.check_split`: ``torch.equal`` of
``tail(head(x))`` and ``model(x)`` in eval mode, and in train mode from the same RNG seed (dropout and
stochastic depth draw the same masks). Models run at 64×64 where they take it, else at 224×224 (a model
that takes neither is a row of zeros and counts as not exact).

    python benchmarks/zoo_split.py [--points 5] [--models resnet18,swin_t] [--threads 2]

Prints one row per model (legal points, cuts checked, passes per mode, seconds) and a summary line.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import splitshield as ss
from splitshield.errors import ConfigError, SplitError


def spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over range(n), first and last included (all of them when n <= k)."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(n, k))})


def check_model(name: str, points: int) -> dict:
    start = time.perf_counter()
    for size in (64, 224):
        shape = (3, size, size)
        try:
            model = ss.build_model(name, input_shape=shape, seed=0)
            legal = ss.split_points(model, shape)
            break
        except (ConfigError, SplitError):  # too small for this model: try the next size
            continue
    else:
        return {"model": name, "size": 0, "points": 0, "checked": 0, "eval": 0, "train": 0,
                "seconds": time.perf_counter() - start}
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    checked = [ss.check_split(model, ss.split(model, legal[i].name), x) for i in spaced(len(legal) - 1, points)]
    return {"model": name, "size": shape[1], "points": len(legal), "checked": len(checked),
            "eval": sum(c["eval"] for c in checked), "train": sum(c["train"] for c in checked),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=5, help="cuts checked per model")
    parser.add_argument("--models", default="", help="comma-separated names (default: every classifier)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", FutureWarning)  # torchvision's notes on GoogLeNet/Inception init
    names = args.models.split(",") if args.models else sorted(torchvision.models.list_models(module=torchvision.models))
    print("| model | input | legal points | cuts checked | eval equal | train equal | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        row = check_model(name, args.points)
        rows.append(row)
        print(f"| {row['model']} | {row['size']}² | {row['points']} | {row['checked']} | {row['eval']} | "
              f"{row['train']} | {row['seconds']:.1f} |", flush=True)
    cuts = sum(r["checked"] for r in rows)
    ok = [r["model"] for r in rows if r["checked"] and r["eval"] == r["train"] == r["checked"]]
    print(f"\n{len(ok)} of {len(rows)} models exact in both modes; {sum(r['eval'] for r in rows)}/{cuts} cuts "
          f"equal in eval mode, {sum(r['train'] for r in rows)}/{cuts} in train mode; "
          f"{sum(r['points'] for r in rows)} legal points; {sum(r['seconds'] for r in rows):.0f} s")
    failed = sorted(set(r["model"] for r in rows) - set(ok))
    if failed:
        print("not exact:", ", ".join(failed))


if __name__ == "__main__":
    main()
