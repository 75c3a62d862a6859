"""White-box rMLE tuned to the model (``search="auto"``) vs the table's settings and the best fixed setting.

For LeNet and two small custom CNNs, each trained one epoch on the built-in digits (mnist-5k), at every
cut: PSNR/SSIM of the first N test images inverted with

- table: ``search=None``, He et al.'s values for the cut's name on [0, 1] pixels, else the fallback (λ_TV = 1,
  lr 1e-2);
- best fixed: every (λ_TV, lr) of the auto search's grid run alone, the best by mean PSNR on the private
  images (hindsight: the ground truth picks it, which no attacker can do);
- auto: ``search="auto"``, the default (λ_TV, λ_l2 and lr chosen on the attacker's aux images).

Every run has the same number of Adam steps. Printed as a table, with the auto attack's time over one run's.

    python benchmarks/rmle_auto.py [--images 50] [--iters 300] [--models lenet,cnn_a,cnn_b] [--sigma 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import splitshield as ss
from splitshield import metrics
from splitshield.attacks.whitebox import search_grid


def cnn_a() -> nn.Module:
    """conv-relu-conv-relu-pool, 8/16 channels, padded: every cut before the pool keeps 28×28."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 14 * 14, 10))


def cnn_b() -> nn.Module:
    """Two conv-relu-pool blocks (8/16 channels, unpadded) and two dense layers."""
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 10))


MODELS = {"lenet": lambda: ss.build_model("lenet"), "cnn_a": cnn_a, "cnn_b": cnn_b}


def trained(name: str, data: ss.Dataset, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]()
    last = ss.split_points(model, data.image_shape)[-2].name
    ss.Trainer(ss.split(model, last, input_shape=data.image_shape), epochs=1, seed=seed, progress=False).fit(data.train)
    return model.eval()


def score(attack: ss.WhiteBoxInversion, victim: ss.Victim, z: torch.Tensor,
          x: torch.Tensor) -> tuple[float, float, float]:
    """(mean PSNR in dB, each image's capped at 100 as exact inversions tie, SSIM, seconds of fit + invert) of
    ``attack`` on the features ``z`` of ``x``."""
    start = time.perf_counter()
    x_hat = attack.fit(victim).invert(z)
    seconds = time.perf_counter() - start
    psnr = metrics.psnr(x_hat, x, reduction="none").clamp(max=100).mean()
    return float(psnr), float(metrics.ssim(x_hat, x)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--models", default="lenet,cnn_a,cnn_b")
    parser.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise defense (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = ss.load_dataset("mnist-5k")
    x, _ = data.test.take(args.images).tensors()
    defense = ss.defenses.GaussianNoise(sigma=args.sigma) if args.sigma else None
    print(f"{args.images} test images, {args.iters} Adam steps per run, defense: "
          f"{'none' if defense is None else f'Gaussian noise σ={args.sigma}'}, {args.threads} thread(s)")
    print(f"{'model':6} {'cut':9} {'table PSNR/SSIM':>16} {'best fixed (λ_TV, lr)':>30} {'auto PSNR/SSIM':>15}"
          f" {'auto-best':>9} {'auto λ_TV':>9} {'time auto/one':>13}")
    for name in args.models.split(","):
        model = trained(name, data, args.seed)
        for point in ss.split_points(model, data.image_shape):
            target = ss.split(model, point.name, input_shape=data.image_shape)
            victim = ss.Victim(target, defense, threat="white_box", aux=data.holdout)
            z = victim.observe(x)

            def run(attack: ss.WhiteBoxInversion, victim: ss.Victim = victim, z: torch.Tensor = z) -> tuple:
                return score(attack, victim, z, x)

            common = dict(iters=args.iters, seed=args.seed, progress=False)
            table = run(ss.WhiteBoxInversion(search=None, **common))
            priors, lrs = search_grid(point.name, None, None, None)
            fixed = {(t, w, r): run(ss.WhiteBoxInversion(tv=t, l2=w, lr=r, search=None, **common))
                     for t, w in priors for r in lrs}
            best = max(fixed, key=lambda k: fixed[k][0])
            attack = ss.WhiteBoxInversion(search="auto", **common)
            auto = run(attack)
            one = sum(f[2] for f in fixed.values()) / len(fixed)
            print(f"{name:6} {point.name:9} {table[0]:7.1f} / {table[1]:.3f} "
                  f"{fixed[best][0]:7.1f} / {fixed[best][1]:.3f} ({best[0]:g}, {best[2]:g})".ljust(63)
                  + f" {auto[0]:6.1f} / {auto[1]:.3f} {auto[0] - fixed[best][0]:+9.1f} {attack.tv_:9g}"
                  f" {auto[2] / one:12.1f}x", flush=True)


if __name__ == "__main__":
    main()
