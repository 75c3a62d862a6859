"""Shared by the benchmark scripts: where the real data lies, and a trained LeNet on full MNIST."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import splitshield as ss

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with mnist.npz (../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")


def add_lenet_attack_args(parser: argparse.ArgumentParser, *, images_help: str, points_help: str) -> None:
    """The arguments of a benchmark that attacks a LeNet it trains: images, epochs, points, a noise defense."""
    parser.add_argument("--images", type=int, default=100, help=images_help)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--points", default=None, help=f"comma-separated split points (default: {points_help})")
    parser.add_argument("--sigma", type=float, default=0.0, help="Gaussian noise on the feature (0: no defense)")


def trained_lenet(data: ss.Dataset, epochs: int, seed: int, device: str) -> tuple[torch.nn.Module, float, float]:
    """LeNet trained on ``data.train``; returns (model, test accuracy, seconds)."""
    model = ss.build_model("lenet", seed=seed).to(device)
    target = ss.split(model, "ReLU2", input_shape=data.image_shape)
    start = time.perf_counter()
    trainer = ss.Trainer(target, epochs=epochs, lr_halve_every=3, seed=seed, device=device, progress=False)
    trainer.fit(data.train)
    return model, trainer.evaluate(data.test), time.perf_counter() - start
