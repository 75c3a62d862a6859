"""Throughput and latency of the tail server over loopback HTTP, against the bare tail forward.

For each model (LeNet ``ReLU2``: a tiny tail where HTTP dominates; the CIFAR net ``ReLU22``: a 128 KB
feature and a heavier tail) a real server subprocess (``python -m splitshield.runtime.server``, 4 worker
threads, ``OMP_NUM_THREADS=1``) is started on 127.0.0.1, and 1, 4 and 16 client threads (one keep-alive
``httpx.Client`` each) send one-image float32 frames for a fixed time. Printed side by side:

* limit req/s: ``tail(z)`` on one image, in this process, one thread, no HTTP and no codec;
* served req/s, p50 and p99 latency (ms) per concurrency, and served / limit, for each ``--max-delay-ms``
  of the server's dynamic batcher (one server per value; 0: run what is queued, no waiting).

Untrained weights: speed does not depend on them. The clients run on the same machine (2 cores here),
so they compete with the server for CPU: the ratios are a floor for a server with its own cores.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/serve.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import splitshield as ss
from splitshield.runtime.artifacts import export
from splitshield.runtime.codec import encode

SRC = Path(__file__).resolve().parents[1] / "src"
MODELS = {"LeNet ReLU2": ("lenet", "ReLU2", (1, 28, 28)), "CIFAR net ReLU22": ("cifar-cnn", "ReLU22", (3, 32, 32))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def bare_tail_rate(target: ss.SplitModel, seconds: float) -> float:
    z = target.head(torch.rand(1, *target.input_shape))
    for _ in range(20):  # warm-up
        target.tail(z)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        target.tail(z)
        n += 1
    return n / (time.perf_counter() - start)


def start_server(checkpoint: Path, token_file: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """A server subprocess (``python -m splitshield.runtime.server`` with ``extra`` options) and its URL, once
    it answers ``/healthz``."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitshield.runtime.server", str(checkpoint), "--port", str(port),
                             "--token-file", str(token_file), *extra],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()}")


def load(url: str, token: str, frame: bytes, clients: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with ``clients`` threads sending ``frame`` for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            http.post("/v1/infer", content=frame)  # connect + warm-up outside the measurement
            barrier.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                r = http.post("/v1/infer", content=frame)
                latencies[i].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.text[:200])
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"server errors: {errors[:3]}")
    flat = sorted(x for lat in latencies for x in lat)
    p99 = flat[min(len(flat) - 1, int(0.99 * len(flat)))]
    return len(flat) / elapsed, 1000 * statistics.median(flat), 1000 * p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-delay-ms", type=float, nargs="+", default=[0.0, 2.0],
                        help="the server's dynamic-batching delays to compare (one server each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    token = "benchmark-token"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "token.txt").write_text(token)
        for title, (name, point, shape) in MODELS.items():
            target = ss.split(ss.build_model(name, in_channels=shape[0]), point, input_shape=shape).eval()
            checkpoint = ss.save_checkpoint(Path(tmp) / name, target)
            # What a deployment serves: the tail alone (the cloud never holds the head).
            cloud = Path(tmp) / f"{name}-cloud.safetensors"
            export(checkpoint, Path(tmp) / f"{name}-edge.safetensors", cloud)
            limit = bare_tail_rate(target, 3.0)
            with torch.no_grad():
                frame = encode(target.head(torch.rand(1, *shape)))
            print(f"\n## {title}: feature {target.feature_shape()}, frame {len(frame)} bytes (float32); "
                  f"bare tail limit {limit:.0f} req/s (1 thread, batch 1)")
            print(f"{'delay ms':>9}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'served/limit':>14}")
            for delay in args.max_delay_ms:
                proc, url = start_server(cloud, Path(tmp) / "token.txt", Path(tmp) / f"{name}.log",
                                         ["--max-delay-ms", str(delay)])
                try:
                    for clients in args.clients:
                        rate, p50, p99 = load(url, token, frame, clients, args.seconds)
                        print(f"{delay:>9g}{clients:>8}{rate:>9.0f}{p50:>9.2f}{p99:>9.2f}{rate / limit:>14.3f}",
                              flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=10)


if __name__ == "__main__":
    main()
