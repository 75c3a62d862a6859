"""How other processes' load moves ``advise``'s head latencies, and whether its busy-machine note fires.

ResNet-18's heads at three cuts (3×32×32 images, batch 1) are timed as ``advise`` times them (``latency_ms``) with
no, one and two busy-loop processes beside this one. Each is shown as the ratio to its median idle time: the median
and the worst of ``--trials`` timings (``advise`` times each cut once, so the worst can reach a page). Beside them
the median ``cpu_share``, which ``advise`` compares with ``BUSY_SHARE`` to name the cuts timed on a busy machine.

    python benchmarks/advise_latency_load.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import splitshield as ss
from splitshield.advisor.costs import cpu_share, latency_ms
from splitshield.advisor.run import BUSY_SHARE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args  # noqa: E402

POINTS = ("layer1.0.add", "layer2.1.add", "layer4.1.add")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = ss.build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), seed=args.seed).eval()
    heads = {p: ss.split(net, p, input_shape=(3, 32, 32)).head.eval() for p in POINTS}
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    idle = None
    print(f"ResNet-18 heads at batch 1, {args.threads} threads, {args.trials} timings each: loaded / idle latency "
          f"(median, worst); advise names a cut timed with a CPU share below {BUSY_SHARE}")
    print("busy processes | CPU share | " + " | ".join(POINTS))
    for load in range(3):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            times = {p: [latency_ms(h, x) for _ in range(args.trials)] for p, h in heads.items()}
            share = statistics.median(cpu_share() for _ in range(args.trials))
        finally:
            for b in busy:
                b.kill()
                b.wait()
        idle = idle or {p: statistics.median(t) for p, t in times.items()}
        ratios = " | ".join(f"{statistics.median(t) / idle[p]:.2f}, {max(t) / idle[p]:.2f}" for p, t in times.items())
        print(f"{load} | {share:.2f} | {ratios}", flush=True)
    print("idle ms: " + ", ".join(f"{p} {ms:.3f}" for p, ms in idle.items()))


if __name__ == "__main__":
    main()
