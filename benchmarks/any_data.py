"""The README's snippet on data of other shapes: does the whole path (load, build, split, train, attack)
work, and what does each attack recover?

Three datasets are made from the built-in digits and written as npz files, so they are read back through
``load_dataset("npz:…")`` as a user's data would be:

- ``digits-8x8``: grey 8×8 on a 0..16 scale (the layout of scikit-learn's digits), loaded with
  ``value_range=(0, 16)``; torchvision's resnet18 built for grey images, cut at ``layer1``;
- ``digits-20x20``: grey 20×20; LeNet built for it, cut at ``ReLU2``;
- ``colour-24x40``: non-square RGB, each digit stretched to 24×40 and tinted with a random colour on a
  random background; torchvision's resnet18 cut at ``layer1``.

Each target is trained ``--epochs`` epochs; the three He et al. attacks run with the attacker's auxiliary
set being the disjoint holdout (same distribution) and the cloud's traffic 1,000 other test images,
evaluated on the first test images of each class.

    python benchmarks/any_data.py [--epochs 3] [--steps 1500] [--out /tmp/any-data]

Prints one table per dataset: accuracy, then PSNR / SSIM / seconds per attack.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import splitshield as ss
from splitshield.attacks.base import TRAFFIC_IMAGES


def write_npz(path: Path, data: ss.Dataset, shape: tuple[int, int, int], scale: int = 255,
              tint: bool = False) -> None:
    """``data``'s train+holdout and test images conformed to ``shape`` and stored as npz on ``0..scale``."""
    g = torch.Generator().manual_seed(0)
    arrays = {}
    for part, images in (("train", [data.train, data.holdout]), ("test", [data.test])):
        x = torch.cat([ss.conform(s, shape).images for s in images]).float() / 255
        y = torch.cat([s.labels for s in images])
        if tint:  # a coloured digit on a coloured background
            ink, paper = torch.rand(2, len(x), 3, 1, 1, generator=g)
            x = x * ink + (1 - x) * paper * 0.5
        arrays[f"x_{part}"] = (x * scale).round().to(torch.uint8).numpy()
        arrays[f"y_{part}"] = y.numpy()
    np.savez_compressed(path, **arrays)


def attack_table(name: str, data: ss.Dataset, model_name: str, point: str, epochs: int, steps: int) -> None:
    start = time.perf_counter()
    model = ss.build_model(model_name, num_classes=data.num_classes, input_shape=data.image_shape)
    target = ss.split(model, at=point, input_shape=data.image_shape)
    trainer = ss.Trainer(target, epochs=epochs, seed=0, progress=False)
    trainer.fit(data.train)
    accuracy = trainer.evaluate(data.test)
    print(f"\n### {name}: {model_name} cut at {point}, images {data.image_shape}, feature {target.feature_shape()}")
    seconds = time.perf_counter() - start
    print(f"accuracy {100 * accuracy:.1f} % on {len(data.test)} test images; trained in {seconds:.0f} s")
    evaluated, traffic = ss.data.evaluation_split(data.test, "first_per_class", TRAFFIC_IMAGES)
    x, _ = evaluated.tensors()
    print(f"\n| attack ({len(x)} test images) | PSNR dB | SSIM | seconds |\n|---|---:|---:|---:|")
    attacks = {"white_box": ss.WhiteBoxInversion(progress=False),
               "black_box": ss.InverseNetwork(steps=steps, progress=False),
               "query_free": ss.QueryFreeInversion(steps=steps, progress=False)}
    for threat, attack in attacks.items():
        start = time.perf_counter()
        victim = ss.Victim(target, threat=threat, aux=data.aux("same_distribution"),
                           traffic=traffic)
        x_hat = attack.fit(victim).invert(victim.observe(x))
        print(f"| {threat} | {ss.metrics.psnr(x_hat, x):.1f} | {ss.metrics.ssim(x_hat, x):.3f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500, help="inverse-network and shadow-head steps")
    parser.add_argument("--out", type=Path, default=Path("/tmp/any-data"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    digits = ss.load_dataset("mnist-5k")
    cases = [("digits-8x8", (1, 8, 8), 16, False, {"value_range": (0, 16)}, "resnet18", "layer1"),
             ("digits-20x20", (1, 20, 20), 255, False, {}, "lenet", "ReLU2"),
             ("colour-24x40", (3, 24, 40), 255, True, {}, "resnet18", "layer1")]
    for name, shape, scale, tint, options, model_name, point in cases:
        path = args.out / f"{name}.npz"
        write_npz(path, digits, shape, scale, tint)
        data = ss.load_dataset(f"npz:{path}", **options)
        attack_table(name, data, model_name, point, args.epochs, args.steps)


if __name__ == "__main__":
    main()
