"""UnSplit (threat ``architecture_only``) on LeNet/MNIST at every split point: PSNR/SSIM and time per point.

LeNet is trained by the engine's Trainer on full MNIST (``_common.trained_lenet``). At each cut the attack
runs through the engine's own pipeline (:func:`splitshield.measure.measure_attack`, the spec seed's attacker
stream) on the first N test images, one point after another. The trivial baseline beside it reconstructs
every image as the mean training image.

    OMP_NUM_THREADS=1 python benchmarks/unsplit_lenet.py [--images 100] [--epochs 2] [--rounds 50] [--restarts 4]
        [--points conv1,ReLU2] [--sigma 0.5] [--non-adaptive]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_common_args, add_lenet_attack_args, trained_lenet

import splitshield as ss
from splitshield import metrics
from splitshield.measure import attack_seed, measure_attack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_lenet_attack_args(parser, images_help="test images inverted", points_help="every one")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--non-adaptive", action="store_true", help="the attacker ignores the defense")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = ss.load_dataset("mnist", data_dir=args.data_dir)
    model, accuracy, seconds = trained_lenet(data, args.epochs, args.seed, args.device)
    print(f"LeNet, {args.epochs} epochs on {len(data.train)} MNIST images: test accuracy {accuracy:.2%} "
          f"({seconds:.0f} s)")
    x = data.test.take(args.images).tensors()[0]
    mean_image = data.train.tensors()[0].mean(0, keepdim=True).expand_as(x)
    print(f"baseline (the mean training image) on {args.images} test images: "
          f"PSNR {float(metrics.psnr(mean_image, x)):.2f} dB, SSIM {float(metrics.ssim(mean_image, x)):.3f}")
    defense = ss.defenses.GaussianNoise(sigma=args.sigma) if args.sigma > 0 else None
    setting = {"name": "unsplit", "threat": "architecture_only", "aux": "same_distribution", "aux_n": None,
               "adaptive": not args.non_adaptive, "params": {"rounds": args.rounds, "restarts": args.restarts}}
    points = args.points.split(",") if args.points else [p.name for p in ss.split_points(model, data.image_shape)]
    print(f"UnSplit: {args.restarts} restarts x {args.rounds} rounds of 20 input + 20 clone steps; "
          f"{'no defense' if defense is None else f'feature noise sigma {args.sigma}'}, "
          f"{'non-adaptive' if args.non_adaptive else 'adaptive'}")
    print(f"| {'point':9} | {'feature':11} | {'PSNR (dB)':>9} | {'SSIM':>6} | {'seconds':>7} |")
    print(f"|{'-' * 11}|{'-' * 13}|{'-' * 11}|{'-' * 8}|{'-' * 9}|")
    for point in points:
        target = ss.split(model, point, input_shape=data.image_shape)
        start = time.perf_counter()
        result = measure_attack(target, defense, data, setting, images=args.images,
                                seed=attack_seed(args.seed, setting), metrics=("psnr", "ssim"), device=args.device)
        mean = {name: value for name, i, value in result.metrics if i == -1}
        shape = "x".join(map(str, target.feature_shape()))
        print(f"| {point:9} | {shape:11} | {mean['psnr']:9.2f} | {mean['ssim']:6.3f} | "
              f"{time.perf_counter() - start:7.0f} |", flush=True)


if __name__ == "__main__":
    main()
