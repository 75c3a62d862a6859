"""Inverse-network decoders side by side: which decoder and optimiser invert LeNet's ``ReLU2`` best.

Trains LeNet on full MNIST, takes the features of the attacker's held-out images (optionally with
Gaussian noise σ, as a noise-aware attacker), and trains each decoder for the same number of steps on
the same batches. Prints the PSNR / MSE on test images and each variant's time as a ratio to the first.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/decoders.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import splitshield as ss
from splitshield.attacks.decoders import build_decoder
from splitshield.metrics import mse, psnr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, trained_lenet  # noqa: E402


def train_decoder(decoder: nn.Module, z: torch.Tensor, x: torch.Tensor, steps: int, batch: int, lr: float,
                  eps: float, seed: int) -> float:
    """Adam + cosine schedule on MSE; returns the seconds spent."""
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, eps=eps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.01)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(z), (batch,), generator=g)
        loss = (decoder(z[idx]) - x[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=3, help="LeNet training epochs")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise on the features (noise-aware attacker)")
    p.add_argument("--eval", type=int, default=1000, help="test images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = ss.load_dataset("mnist", data_dir=args.data_dir, seed=args.seed)
    model, accuracy, _ = trained_lenet(data, args.epochs, args.seed, args.device)
    target = ss.split(model, "ReLU2", input_shape=data.image_shape).eval()
    x_aux, _ = data.holdout.tensors()
    x_test, _ = data.test.take(args.eval).tensors()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        z_aux, z_test = target.head(x_aux), target.head(x_test)
        z_aux = z_aux + args.sigma * torch.randn_like(z_aux)
        z_test = z_test + args.sigma * torch.randn_like(z_test)
    shape, image = tuple(z_aux.shape[1:]), tuple(data.image_shape)
    print(f"LeNet {100 * accuracy:.2f}% test accuracy; ReLU2 feature {list(shape)}, σ = {args.sigma}; "
          f"{len(x_aux)} attacker images, {args.steps} steps of {args.batch}, PSNR on {len(x_test)} test images")
    variants = [
        ("convolutional, Adam eps 1e-3 lr 3e-3 (the previous default)", "conv", 3e-3, 1e-3),
        ("convolutional, Adam eps 1e-8 lr 1e-3", "conv", 1e-3, 1e-8),
        ("dense, Adam eps 1e-3 lr 3e-3", "dense", 3e-3, 1e-3),
        ("dense, Adam eps 1e-8 lr 1e-3 (the default)", "auto", 1e-3, 1e-8),
    ]
    base_time = None
    print(f"{'decoder':<62} {'PSNR dB':>8} {'MSE':>8} {'time ratio':>10}")
    for name, kind, lr, eps in variants:
        torch.manual_seed(args.seed)
        decoder = build_decoder(shape, image, kind=kind)
        seconds = train_decoder(decoder, z_aux, x_aux, args.steps, args.batch, lr, eps, args.seed)
        base_time = base_time or seconds
        with torch.no_grad():
            x_hat = decoder(z_test).clamp(0, 1)
        print(f"{name:<62} {psnr(x_hat, x_test).item():>8.2f} {mse(x_hat, x_test).item():>8.4f} "
              f"{seconds / base_time:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
