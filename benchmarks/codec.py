"""How many bytes does a split feature cost on the wire, what does lossy coding cost in accuracy, and
does it cost the curious cloud anything in reconstruction quality?

Features: LeNet/MNIST ``conv1`` (8x24x24) and ``ReLU2`` (16x8x8), and He et al.'s CIFAR net ``ReLU22``
(128x16x16) on the CIFAR-10 copy in ``../shared/data`` (JPEG quality 75, so about 30 dB from the original
pixels). Every feature is encoded one image per frame, as a device sending one request per image would.

Columns, all measured in this run:

* bytes/feat: mean frame size per image (header included); bits/elem; ratio = float32 raw / this.
  zlib (level 9), bz2 (9) and lzma (preset 6) compress the raw float32 bytes: the lossless baselines
  of ALGORITHMS §E. zstd (level 3) is the codec's built-in compression.
* acc: test accuracy of ``tail(decode(encode(head(x))))``; Δacc against float32; flips = predictions
  that differ from float32's.
* wb/bb PSNR: white-box rMLE and black-box inverse-network reconstructions from the *decoded* features of
  the first test image of each class (dB, per-image mean). The black-box decoder is trained on decoded
  features (the server sees only those), so it adapts to the quantization; it is a small decoder
  mirroring the head (:func:`small_decoder`), Adam lr 3e-3, trained for a fixed step budget. The
  white-box rMLE inverts the head toward the decoded feature (it does not model the quantizer).
  Budgets are cut to keep the run short (see the printed settings): the PSNRs compare encodings
  under equal budgets, they are not the attacks' converged best.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/codec.py [--data-dir ../shared/data]``.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import hashlib
import lzma
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import splitshield as ss
from splitshield.attacks.base import BlackBoxView
from splitshield.attacks.decoders import he2019_decoder
from splitshield.runtime.codec import CodecOptions, decode, encode

VARIANTS = [CodecOptions(e, c) for e in ("float32", "float16", "uint8", "uint4") for c in ("none", "zstd")]
LOSSLESS: dict[str, Callable[[bytes], bytes]] = {
    "float32+zlib": lambda b: zlib.compress(b, 9),
    "float32+bz2": lambda b: bz2.compress(b, 9),
    "float32+lzma": lambda b: lzma.compress(b, preset=6),
}
VALUE_ENCODINGS = ("float32", "float16", "uint8", "uint4")  # compression never changes decoded values


def sample(images: ss.ImageSet, n: int, seed: int) -> ss.ImageSet:
    """``n`` images drawn at random: the CIFAR-10 copy is stored sorted by class, so ``take(n)`` would
    give one or two classes only."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[:n].sort().values)


def roundtrip(z: torch.Tensor, encoding: str) -> torch.Tensor:
    """What the server decodes when each row of ``z`` is sent as its own frame."""
    opts = CodecOptions(encoding)
    return torch.cat([decode(encode(z[i : i + 1], opts)) for i in range(len(z))])


def sizes(z: torch.Tensor) -> dict[str, float]:
    """Mean bytes per feature (one frame per image) for every codec variant and lossless baseline."""
    out: dict[str, float] = {}
    for opts in VARIANTS:
        name = opts.encoding + ("+zstd" if opts.compression == "zstd" else "")
        out[name] = sum(len(encode(z[i : i + 1], opts)) for i in range(len(z))) / len(z)
    for name, compress in LOSSLESS.items():
        out[name] = sum(len(compress(z[i].numpy().astype("<f4").tobytes())) for i in range(len(z))) / len(z)
    return out


@torch.no_grad()
def accuracies(target: ss.SplitModel, test: ss.ImageSet, n: int) -> dict[str, tuple[float, int]]:
    """Accuracy and flips vs float32 for each value encoding, one head pass shared by all."""
    correct = dict.fromkeys(VALUE_ENCODINGS, 0)
    flips = dict.fromkeys(VALUE_ENCODINGS, 0)
    data = sample(test, n, seed=1)
    for x, y in data.batches(250):
        z = target.head(x)
        ref = target.tail(z).argmax(1)
        for enc in VALUE_ENCODINGS:
            pred = target.tail(roundtrip(z, enc)).argmax(1)
            correct[enc] += int((pred == y).sum())
            flips[enc] += int((pred != ref).sum())
    return {enc: (correct[enc] / len(data), flips[enc]) for enc in VALUE_ENCODINGS}


def small_decoder(point: str) -> nn.Module:
    """A cheap decoder per feature, mirroring the head's layers (He et al.'s style, ALGORITHMS §A.3)."""
    if point == "conv1":  # 8x24x24 -> 1x28x28: the adjoint shape of conv1's 5x5 kernel
        return nn.ConvTranspose2d(8, 1, 5)
    if point == "ReLU2":  # 16x8x8 -> 12x12 -> 24x24 -> 28x28, undoing conv2, pool1, conv1
        return nn.Sequential(nn.ConvTranspose2d(16, 8, 5), nn.ReLU(), nn.Upsample(scale_factor=2),
                             nn.ConvTranspose2d(8, 1, 5))
    decoder = he2019_decoder(point, (128, 16, 16))
    assert decoder is not None
    return decoder


def attack_psnr(target: ss.SplitModel, data: ss.Dataset, wb_iters: int, bb_steps: int, n_aux: int,
                seed: int) -> dict[str, tuple[float, float]]:
    """(white-box, black-box) PSNR in dB on the decoded features of the first test image per class."""
    x, _ = data.test.first_per_class()
    with torch.no_grad():
        z = target.head(x)
    aux = sample(data.aux("same_distribution"), n_aux, seed)
    view = ss.Victim(target, threat="black_box", aux=aux).view()
    assert isinstance(view, BlackBoxView)
    answers: dict[bytes, torch.Tensor] = {}

    def oracle(q: torch.Tensor) -> torch.Tensor:
        # The head is deterministic: remember its answers so each encoding's decoder training does
        # not recompute the same clean aux features (the expensive part for the CIFAR net).
        key = hashlib.sha1(q.numpy().tobytes()).digest()
        if key not in answers:
            answers[key] = view.query(q)
        return answers[key]

    out = {}
    for enc in VALUE_ENCODINGS:
        z_dec = roundtrip(z, enc)
        torch.manual_seed(seed)
        wb = ss.WhiteBoxInversion(iters=wb_iters, progress=False).fit(ss.Victim(target, threat="white_box"))
        psnr_wb = float(ss.metrics.psnr(wb.invert(z_dec), x))
        coded = dataclasses.replace(view, query=lambda q, e=enc: roundtrip(oracle(q), e))
        torch.manual_seed(seed)
        bb = ss.InverseNetwork(small_decoder(target.point), steps=bb_steps, lr=3e-3, seed=seed,
                               progress=False).fit(coded)
        psnr_bb = float(ss.metrics.psnr(bb.invert(z_dec), x))
        out[enc] = (psnr_wb, psnr_bb)
    return out


def report(title: str, target: ss.SplitModel, data: ss.Dataset, args: argparse.Namespace, n_size: int,
           wb_iters: int, bb_steps: int) -> None:
    t0 = time.perf_counter()
    x, _ = sample(data.test, n_size, seed=2).tensors()
    with torch.no_grad():
        z = target.head(x)
    size = sizes(z)
    acc = accuracies(target, data.test, args.n_test)
    att = attack_psnr(target, data, wb_iters, bb_steps, args.n_aux, args.seed)
    numel = z[0].numel()
    raw = size["float32"]
    print(f"\n## {title}: feature {tuple(z.shape[1:])} = {numel} elements; input image "
          f"{x[0].numel()} bytes as uint8")
    print(f"sizes over {n_size} test images; accuracy over {min(args.n_test, len(data.test))} test images; "
          f"attacks on 10 images (wb {wb_iters} iters, bb {bb_steps} steps on {args.n_aux} aux images)")
    print(f"{'encoding':<14}{'bytes/feat':>11}{'bits/elem':>10}{'ratio':>7}{'acc':>8}{'Δacc(pt)':>9}{'flips':>6}"
          f"{'wb PSNR':>9}{'bb PSNR':>9}")
    for name, nbytes in size.items():
        enc = name.split("+")[0]
        row = f"{name:<14}{nbytes:>11.1f}{8 * nbytes / numel:>10.3f}{raw / nbytes:>7.2f}"
        if name in VALUE_ENCODINGS:
            a, f = acc[name]
            row += f"{100 * a:>8.2f}{100 * (a - acc['float32'][0]):>+9.2f}{f:>6d}"
            row += f"{att[name][0]:>9.2f}{att[name][1]:>9.2f}"
        else:
            row += f"{'(as ' + enc + ')':>23}"
        print(row, flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


def train(target: ss.SplitModel, data: ss.ImageSet, epochs: int, seed: int) -> float:
    t0 = time.perf_counter()
    ss.Trainer(target, epochs=epochs, seed=seed, progress=False).fit(data)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--n-test", type=int, default=2000, help="test images for accuracy")
    parser.add_argument("--n-aux", type=int, default=1000, help="auxiliary images for the black-box decoder")
    parser.add_argument("--bb-steps-mnist", type=int, default=1500)
    parser.add_argument("--bb-steps-cifar", type=int, default=300)
    parser.add_argument("--wb-iters-mnist", type=int, default=1500)
    parser.add_argument("--wb-iters-cifar", type=int, default=150)
    parser.add_argument("--cifar-train", type=int, default=10000, help="random training images for the CIFAR net")
    parser.add_argument("--cifar-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    mnist = ss.load_dataset("mnist", data_dir=args.data_dir, seed=args.seed)
    model = ss.build_model("lenet")
    lenet = ss.split(model, "ReLU2", input_shape=(1, 28, 28))
    secs = train(lenet, mnist.train, 1, args.seed)
    print(f"LeNet trained 1 epoch on {len(mnist.train)} MNIST images in {secs:.0f} s; "
          f"float32 test accuracy {100 * ss.evaluate(lenet, None, mnist.test):.2f}%")
    for point in ("conv1", "ReLU2"):
        # The halves share parameters with ``model``, so cutting it again reuses the trained weights.
        target = ss.split(model, point, input_shape=(1, 28, 28))
        report(f"LeNet/MNIST {point}", target, mnist, args, 1000, args.wb_iters_mnist, args.bb_steps_mnist)

    cifar = ss.load_dataset("cifar10", data_dir=args.data_dir, seed=args.seed)
    cnn = ss.split(ss.build_model("cifar-cnn", in_channels=3), "ReLU22", input_shape=(3, 32, 32))
    sub = sample(cifar.train, args.cifar_train, args.seed)
    secs = train(cnn, sub, args.cifar_epochs, args.seed)
    acc = ss.evaluate(cnn, None, sample(cifar.test, args.n_test, seed=1))
    print(f"\nCIFAR net trained {args.cifar_epochs} epochs on a random {len(sub)}-image subset in {secs:.0f} s "
          f"(briefly: far from converged); float32 accuracy {100 * acc:.2f}% on {args.n_test} random test images")
    report("CIFAR-10 net ReLU22", cnn, cifar, args, 200, args.wb_iters_cifar, args.bb_steps_cifar)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
