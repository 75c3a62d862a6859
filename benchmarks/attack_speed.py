"""White-box inversion speed: one batched rMLE over N images vs the reference implementations' loop, and vs
the cost of the gradient steps themselves.

The authors' code inverts one image at a time. splitshield inverts a batch with per-image losses summed,
which gives each image the same optimisation (tests/test_attacks.py checks this) at a fraction of the cost.
For each head (frozen, as the attacker's white-box view holds it) this prints, measured in one run:

- loop / batched: how much faster the batched attack is than N per-image runs of the same attack;
- batched / bound: the batched attack against the *bound*, T × (forward + backward of the head on the whole
  batch, the feature loss, the TV prior and one Adam step on the images), timed as a bare eager loop that
  does that and nothing else (no projection onto [0, 1], no bookkeeping). No implementation of T gradient
  steps of this objective can go much under it without changing the arithmetic; the head's forward and
  backward alone are printed too, to show how much of the bound the head is.

Images: the built-in ``mnist-5k`` for LeNet; CIFAR-10 test images from ``--data-dir`` for the CIFAR network,
or, without them, uniform noise (the cost of a gradient step does not depend on the pixel values).

    python benchmarks/attack_speed.py [--images 100] [--iters 100] [--threads 1] [--heads lenet:ReLU2,cifar-cnn:ReLU22]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import DEFAULT_DATA

import splitshield as ss
from splitshield.attacks._rmle import rmle, total_variation

SETTINGS = dict(lr=1e-2, tv=1.0, l2=0.0)


def seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """The fastest of ``repeats`` timings of ``fn()`` (the least disturbed by the rest of the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def images_for(model: str, n: int, data_dir: Path) -> tuple[torch.Tensor, str]:
    """``n`` test images [n, C, H, W] in [0, 1] for ``model`` and where they came from."""
    if model == "lenet":
        return ss.load_dataset("mnist-5k").test.take(n).tensors()[0], "mnist-5k test"
    try:
        return ss.load_dataset("cifar10", data_dir=data_dir).test.take(n).tensors()[0], "CIFAR-10 test"
    except ss.SplitShieldError:
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "uniform noise"


def frozen_head(model: str, point: str, input_shape: tuple[int, ...]) -> torch.nn.Module:
    head = ss.split(ss.build_model(model), point, input_shape=input_shape).head.eval()
    return head.requires_grad_(False)


def bound(head: torch.nn.Module, z: torch.Tensor, shape: tuple[int, ...], iters: int) -> None:
    """T bare gradient steps of the rMLE objective on the whole batch (see the module docstring)."""
    x = torch.full((z.shape[0], *shape), 0.5, requires_grad=True)
    opt = torch.optim.Adam([x], lr=SETTINGS["lr"], eps=1e-3, amsgrad=True)
    for _ in range(iters):
        loss = (head(x) - z).pow(2).flatten(1).mean(1) + SETTINGS["tv"] * total_variation(x)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()


def head_only(head: torch.nn.Module, z: torch.Tensor, shape: tuple[int, ...], iters: int) -> None:
    x = torch.full((z.shape[0], *shape), 0.5, requires_grad=True)
    for _ in range(iters):
        (head(x) - z).pow(2).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="time each variant this often and keep the fastest")
    parser.add_argument("--heads", default="lenet:ReLU2,cifar-cnn:ReLU22", help="model:point pairs, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with cifar10_jpegbytes.npz")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.images} images, {args.iters} Adam steps, {args.threads} thread(s), fastest of {args.repeats}\n")
    print("| head | images | per-image loop (s) | batched (s) | bound (s) | head fwd+bwd (s) "
          "| loop / batched | batched / bound |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for pair in args.heads.split(","):
        model, point = pair.split(":")
        print(row(model, point, args))


def row(model: str, point: str, args: argparse.Namespace) -> str:
    """The table's row for the head of ``model`` up to ``point``."""
    x, source = images_for(model, args.images, args.data_dir)
    shape = tuple(x.shape[1:])
    head = frozen_head(model, point, shape)
    with torch.no_grad():
        z = head(x)
    batched = seconds(lambda: rmle(head, z, shape, iters=args.iters, **SETTINGS), args.repeats)
    floor = seconds(lambda: bound(head, z, shape, args.iters), args.repeats)
    alone = seconds(lambda: head_only(head, z, shape, args.iters), args.repeats)
    loop = seconds(lambda: [rmle(head, z[i:i + 1], shape, iters=args.iters, **SETTINGS) for i in range(len(z))])
    return (f"| {model} → {point} | {source} | {loop:.2f} | {batched:.2f} | {floor:.2f} | {alone:.2f} "
            f"| {loop / batched:.1f}× | {batched / floor:.2f}× |")

if __name__ == "__main__":
    main()
