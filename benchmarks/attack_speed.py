"""White-box inversion speed: one batched rMLE over N images vs the reference implementations' loop.

The authors' code inverts one image at a time. splitshield inverts a batch with per-image losses
summed, which gives each image the same optimisation (tests/test_attacks.py checks this) at a fraction
of the cost. Printed as ratios measured in one run:

- loop / batched: how much faster the batched attack is than N per-image runs;
- batched / bound: the batched attack against T × (forward + backward of the head on the whole batch),
  the cost no implementation of T gradient steps can go under.

    python benchmarks/attack_speed.py [--images 100] [--iters 200] [--split ReLU2]
"""

from __future__ import annotations

import argparse
import time

import torch

import splitshield as ss
from splitshield.attacks._rmle import rmle


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--split", default="ReLU2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = ss.load_dataset("mnist-5k")
    head = ss.split(ss.build_model("lenet"), args.split, input_shape=data.image_shape).head.eval()
    x, _ = data.test.take(args.images).tensors()
    with torch.no_grad():
        z = head(x)
    settings = dict(iters=args.iters, lr=1e-2, tv=1.0, l2=0.0)

    def bound() -> None:
        probe = x.clone().requires_grad_(True)
        for _ in range(args.iters):
            (head(probe) - z).pow(2).sum().backward()

    batched = seconds(lambda: rmle(head, z, data.image_shape, **settings))
    loop = seconds(lambda: [rmle(head, z[i:i + 1], data.image_shape, **settings) for i in range(args.images)])
    floor = seconds(bound)
    print(f"LeNet head to {args.split}, {args.images} images, {args.iters} Adam steps, {args.threads} thread(s)")
    print(f"  per-image loop      {loop:8.2f} s")
    print(f"  batched rMLE        {batched:8.2f} s   loop / batched = {loop / batched:6.1f}x")
    print(f"  bound T×(fwd+bwd)   {floor:8.2f} s   batched / bound = {batched / floor:6.2f}x")


if __name__ == "__main__":
    main()
