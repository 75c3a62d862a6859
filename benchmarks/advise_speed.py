"""How long ``splitshield advise`` takes, and where the time goes.

The issue's two cases, on CIFAR-10 images (3×32×32):

    python benchmarks/advise_speed.py --case resnet18        # all 23 points with the fast attacks: ≤ 10 minutes
    python benchmarks/advise_speed.py --case mobilenet_v2    # all 73 points, --no-attack: ≤ 2 minutes

Timing does not depend on the weights' values, so the model is used as built (randomly initialised) unless
``--checkpoint`` names a trained one; every stage runs as with a trained model (``trained=True``). Loading the
data (decoding CIFAR-10's JPEG bytes) is timed apart: ``advise`` receives the loaded dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import splitshield as ss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

#: case -> (attack, limit in seconds) from the issue.
CASES = {"resnet18": (True, 600), "mobilenet_v2": (False, 120)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--case", choices=sorted(CASES), default="resnet18")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained weights (default: as built)")
    parser.add_argument("--points", type=int, default=0, help="only the first N points (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attack, limit = CASES[args.case]
    clock = time.perf_counter()
    data = ss.load_dataset("cifar10", data_dir=args.data_dir, seed=args.seed)
    loading = time.perf_counter() - clock
    net = ss.build_model(args.case, num_classes=10, input_shape=data.image_shape, seed=args.seed)
    if args.checkpoint is not None:
        ss.load_checkpoint(args.checkpoint, model=net)
    points = [p.name for p in ss.split_points(net, data.image_shape)]
    points = points[: args.points] if args.points else points
    clock = time.perf_counter()
    advice = ss.advise(net, data, points=points, attack=attack, seed=args.seed, device=args.device)
    seconds = time.perf_counter() - clock
    stages = ", ".join(f"{stage} {s:.0f} s ({s / seconds:.0%})" for stage, s in advice.timings.items())
    every = len(points) == len(ss.split_points(net, data.image_shape))
    verdict = f"{'within' if seconds <= limit else 'OVER'} the issue's {limit} s" if every else "a subset of the points"
    print(f"{args.case}: {len(points)} points, attack={attack}, {args.threads} threads: {seconds:.0f} s ({verdict}); "
          f"data loading {loading:.0f} s apart")
    print(f"  stages: {stages}")
    slowest = sorted(zip(advice.points, advice["head_ms_b32"], strict=True), key=lambda p: -p[1])[:3]
    print("  slowest heads (ms per image at batch 32): " + ", ".join(f"{p} {ms:.3g}" for p, ms in slowest))


if __name__ == "__main__":
    main()
