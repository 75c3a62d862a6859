"""Learned-prior inversion (``prior_inversion``) vs white-box rMLE on LeNet/MNIST at the deep cuts: PSNR/SSIM, time.

LeNet is trained by the engine's Trainer on MNIST (``_common.trained_lenet``; full MNIST from ``--data-dir`` or
``$SPLITSHIELD_DATA`` when its ``mnist.npz`` is there, else the built-in mnist-5k). At each cut from ``ReLU2`` on
(``ss.split_points``, without ``flatten``, a reshape of ``pool2``, and the model's output), both attacks are
fitted by the engine (:func:`splitshield.measure.fit_attack`: the attacker's holdout as aux data, the spec seed's
attacker stream) under the white-box threat, at their defaults: rMLE with its ``search="auto"``; the prior
attack with its VAE, latent search and refinement. Both invert the features of the first N test images; the
table gives mean PSNR/SSIM, fit + invert seconds, the differences (prior − rMLE), and what the prior attack
chose on its held-out aux images (its latent images alone, or refined with (λ_TV, lr)) with its latent images'
own scores. The ALGORITHMS §G.5 target: at the deep cuts, ≥ 2 dB PSNR and ≥ 0.1 SSIM over rMLE.

    OMP_NUM_THREADS=1 python benchmarks/prior_inversion.py [--images 100] [--epochs 2] [--points ReLU2,fc2act]
        [--sigma 0.5] [--skip-rmle]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import add_common_args, add_lenet_attack_args, trained_lenet
from torch import nn

import splitshield as ss
from splitshield import metrics
from splitshield.measure import attack_seed, fit_attack


def load_mnist(data_dir: Path) -> ss.Dataset:
    """Full MNIST from ``$SPLITSHIELD_DATA`` or ``data_dir`` when there, else the built-in mnist-5k."""
    for root in (os.environ.get("SPLITSHIELD_DATA"), data_dir):
        if root and (Path(root) / "mnist.npz").is_file():
            return ss.load_dataset("mnist", data_dir=root)
    print(f"no mnist.npz under $SPLITSHIELD_DATA or {data_dir}: using the built-in mnist-5k")
    return ss.load_dataset("mnist-5k")


def deep_points(model: nn.Module, image_shape: tuple[int, int, int]) -> list[str]:
    """The split points from ``ReLU2`` on, without reshapes (``flatten``) and the model's output."""
    names = [p.name for p in ss.split_points(model, image_shape)][:-1]
    modules = dict(model.named_children())
    return [n for n in names[names.index("ReLU2"):] if not isinstance(modules.get(n), nn.Flatten)]


def run(name: str, target: ss.SplitModel, defense, data: ss.Dataset, images: int, seed: int, device: str):
    """Fit the attack ``name`` at its defaults, invert the first ``images`` test images' features: (attack, the
    images, per-image PSNR, per-image SSIM, seconds)."""
    setting = {"name": name, "threat": "white_box", "aux": "same_distribution", "aux_n": None, "adaptive": True,
               "params": {}}
    start = time.perf_counter()
    fitted = fit_attack(target, defense, data, setting, images=images, seed=attack_seed(seed, setting))
    x = fitted.evaluated.tensors(device)[0]
    x_hat = fitted.attack.invert(fitted.victim.observe(x)).detach().cpu()
    seconds = time.perf_counter() - start
    x = x.cpu()
    return (fitted.attack, x, metrics.psnr(x_hat, x, reduction="none"), metrics.ssim(x_hat, x, reduction="none"),
            seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_lenet_attack_args(parser, images_help="test images inverted (the issue's target: 1000)",
                          points_help="the deep cuts")
    parser.add_argument("--skip-rmle", action="store_true", help="run the prior attack alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_mnist(args.data_dir)
    model, accuracy, seconds = trained_lenet(data, args.epochs, args.seed, args.device)
    print(f"LeNet, {args.epochs} epochs on {len(data.train)} {data.name} images: test accuracy {accuracy:.2%} "
          f"({seconds:.0f} s); {len(data.holdout)} aux images; {args.images} test images inverted; "
          f"{torch.get_num_threads()} thread(s)")
    defense = ss.defenses.GaussianNoise(sigma=args.sigma) if args.sigma > 0 else None
    print(f"defense: {'none' if defense is None else f'feature noise sigma {args.sigma} (adaptive attacker)'}\n")
    points = args.points.split(",") if args.points else deep_points(model, data.image_shape)
    print("| point | feature | rMLE PSNR | rMLE SSIM | rMLE s | prior PSNR | prior SSIM | prior s | ΔPSNR | ΔSSIM "
          "| prior kept | latent PSNR | latent SSIM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for point in points:
        target = ss.split(model, point, input_shape=data.image_shape)
        shape = "x".join(map(str, target.feature_shape()))
        prior, x, p_psnr, p_ssim, p_s = run("prior_inversion", target, defense, data, args.images, args.seed,
                                            args.device)
        lat_psnr = float(metrics.psnr(prior.latent_images_.cpu(), x))
        lat_ssim = float(metrics.ssim(prior.latent_images_.cpu(), x))
        kept = f"refined ({prior.refine_tv_:g}, {prior.refine_lr_:g})" if prior.keep_refined_ else "latent"
        if args.skip_rmle:
            r_cells, deltas = "– | – | –", "– | –"
        else:
            _, _, r_psnr, r_ssim, r_s = run("rmle", target, defense, data, args.images, args.seed, args.device)
            r_cells = f"{float(r_psnr.mean()):.2f} | {float(r_ssim.mean()):.3f} | {r_s:.0f}"
            deltas = (f"{float(p_psnr.mean() - r_psnr.mean()):+.2f} | {float(p_ssim.mean() - r_ssim.mean()):+.3f}")
        print(f"| {point} | {shape} | {r_cells} | {float(p_psnr.mean()):.2f} | {float(p_ssim.mean()):.3f} | "
              f"{p_s:.0f} | {deltas} | {kept} | {lat_psnr:.2f} | {lat_ssim:.3f} |", flush=True)


if __name__ == "__main__":
    main()
