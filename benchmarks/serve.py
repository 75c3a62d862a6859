"""Throughput and latency of the tail server over loopback HTTP, beside the two limits it cannot pass.

For each model -- LeNet cut at ``ReLU2`` (a tiny tail: the transport is the wall) and ResNet-18 at 32x32 cut
after ``layer1`` (a heavy tail: compute is the wall) -- this prints, measured in one run on this machine:

* **tail limit**: images/s of ``tail(z)`` in this process, one thread, no HTTP, at a batch of as many images
  as there are clients (with C clients each waiting for its answer, no batch can hold more than C);
* **echo limit**: requests/s of ``benchmarks/_echo_server.py``, the server's own HTTP stack (uvicorn with the
  guarded httptools protocol, bearer check, body read) answering a fixed logits body: the transport's limit;
* **served**: requests/s, p50 and p99 latency of ``python -m splitshield.runtime.server`` on the cloud
  artifact, each request one image (float32 frame), served / echo, and served / limit where the limit is
  the smaller of the echo and tail limits at that concurrency.

for 1, 4, 16 and 64 concurrent clients. The clients are ``benchmarks/_loadgen.py`` (raw keep-alive sockets in
their own process). Every server runs with ``OMP_NUM_THREADS=1``; clients and server share this machine's
cores, so the ratios are a floor for a server with cores of its own. Untrained weights: speed does not depend
on them. ``--src`` serves with another checkout's package (e.g. the previous commit's, for a before/after).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/serve.py [--seconds 4] [--json serve.json] [--markdown serve.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

import splitshield as ss
from splitshield.runtime.artifacts import export
from splitshield.runtime.codec import encode

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MODELS = {  # title: (model, split point, input shape, build options)
    "LeNet ReLU2": ("lenet", "ReLU2", (1, 28, 28), {"in_channels": 1}),
    "ResNet-18 layer1, 32x32": ("resnet18", "layer1", (3, 32, 32), {"num_classes": 10}),
}
TOKEN = "benchmark-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def tail_rate(target: ss.SplitModel, batch: int, seconds: float) -> float:
    """Images/s of the bare tail at ``batch`` (one thread, after a warm-up)."""
    z = target.head(torch.rand(batch, *target.input_shape))
    for _ in range(5):
        target.tail(z)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        target.tail(z)
        n += batch
    return n / (time.perf_counter() - start)


def start(command: list[str], src: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """Start a server command (``--port`` appended) and return it once ``/healthz`` answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *command, "--port", str(port)], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc, port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server {command} did not start: {log.read_text()[-2000:]}")


def load(port: int, frame: Path, clients: int, seconds: float, window: int | None = None) -> dict[str, float]:
    """Requests/s, p50 and p99 ms of ``clients`` keep-alive connections (``_loadgen.py`` in its own process);
    with ``window``, frames/s of as many ``/v1/stream`` WebSockets, each ``window`` frames ahead."""
    out = subprocess.run([sys.executable, str(HERE / "_loadgen.py"), "127.0.0.1", str(port), TOKEN, str(frame),
                          str(clients), str(seconds), *([str(window)] if window else [])],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["errors"] or not result["requests"]:
        raise RuntimeError(f"{clients} clients got errors: {result['errors']}")
    return {"rate": result["requests"] / result["seconds"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]}


def measure(title: str, spec: tuple, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    name, point, shape, options = spec
    target = ss.split(ss.build_model(name, **options), point, input_shape=shape).eval()
    checkpoint = ss.save_checkpoint(tmp / name, target)
    cloud = tmp / f"{name}-cloud.safetensors"  # what a deployment serves: the tail alone
    export(checkpoint, tmp / f"{name}-edge.safetensors", cloud)
    frame = tmp / f"{name}.frame"
    with torch.no_grad():
        frame.write_bytes(encode(target.head(torch.rand(1, *shape))))
        classes = target.tail(target.head(torch.rand(1, *shape))).shape[1]
    print(f"\n## {title}: feature {target.feature_shape()}, frame {frame.stat().st_size} bytes (float32, 1 image)")
    rows: dict[int, dict[str, float]] = {clients: {"tail": tail_rate(target, clients, 2.0)} for clients in args.clients}
    # A stream of C clients x W frames ahead can batch up to C x W frames (the server's max_batch, 256).
    tail_limits = {clients: tail_rate(target, min(256, clients * args.window), 2.0) for clients in args.clients}
    proc, port = start([str(HERE / "_echo_server.py"), TOKEN, str(classes)], SRC, tmp / "echo.log")
    try:
        for clients in args.clients:
            rows[clients]["echo"] = load(port, frame, clients, args.seconds)["rate"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    served = ["-m", "splitshield.runtime.server", str(cloud), "--token-file", str(tmp / "token.txt"),
              "--max-in-flight", str(max(args.clients) * args.window), *args.server_options]
    proc, port = start(served, args.src, tmp / f"{name}.log")
    try:
        for clients in args.clients:
            rows[clients].update(load(port, frame, clients, args.seconds))
            stream = load(port, frame, clients, args.seconds, args.window)
            rows[clients].update({f"stream_{k}": v for k, v in stream.items()})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{'':>20}{'/v1/infer (one HTTP request per image)':^58}  "
          f"{f'/v1/stream (window {args.window})':^44}")
    print(f"{'clients':>8}{'tail img/s':>12}{'echo req/s':>12}{'served':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'/echo':>8}{'/limit':>8}  {'served':>9}{'p50 ms':>9}{'p99 ms':>9}{'/echo':>8}{'/limit':>8}")
    for clients, row in rows.items():
        limit = min(row["echo"], row["tail"])
        row["served_over_echo"], row["served_over_limit"] = row["rate"] / row["echo"], row["rate"] / limit
        stream_limit = min(row["echo"], tail_limits[clients])
        row["stream_over_echo"], row["stream_over_limit"] = row["stream_rate"] / row["echo"], \
            row["stream_rate"] / stream_limit
        print(f"{clients:>8}{row['tail']:>12.0f}{row['echo']:>12.0f}{row['rate']:>9.0f}{row['p50_ms']:>9.2f}"
              f"{row['p99_ms']:>9.2f}{row['served_over_echo']:>8.3f}{row['served_over_limit']:>8.3f}  "
              f"{row['stream_rate']:>9.0f}{row['stream_p50_ms']:>9.2f}{row['stream_p99_ms']:>9.2f}"
              f"{row['stream_over_echo']:>8.3f}{row['stream_over_limit']:>8.3f}", flush=True)
    return {"clients": rows}


def markdown(results: dict[str, dict], window: int) -> str:
    """The figures as Markdown tables, one per model."""
    lines = [f"# Tail server throughput (`benchmarks/serve.py`, one image per request or stream frame; "
             f"stream window {window})", ""]
    for title, result in results.items():
        lines += [f"## {title}", "",
                  "| clients | tail limit img/s | echo req/s | /v1/infer img/s | p50 ms | p99 ms | / echo | / limit "
                  "| /v1/stream img/s | p50 ms | p99 ms | / echo |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for clients, r in result["clients"].items():
            lines.append(f"| {clients} | {r['tail']:,.0f} | {r['echo']:,.0f} | {r['rate']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['served_over_echo']:.2f} | {r['served_over_limit']:.2f} | "
                         f"{r['stream_rate']:,.0f} | {r['stream_p50_ms']:.2f} | {r['stream_p99_ms']:.2f} | "
                         f"{r['stream_over_echo']:.2f} |")
        lines.append("")
    lines.append("limit = min(echo, tail limit): the bare tail at a batch of as many images as clients (one thread).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measurement time per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--window", type=int, default=8, help="frames each /v1/stream client sends ahead")
    parser.add_argument("--src", type=Path, default=SRC, help="the package the served server runs (a src folder)")
    parser.add_argument("--server-options", nargs=argparse.REMAINDER, default=[],
                        help="passed to the server, e.g. --server-options --workers 2 (last on the line)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--markdown", type=Path, help="also write them as Markdown tables here")
    parser.add_argument("--render", type=Path, help="measure nothing: write --markdown from this --json file")
    args = parser.parse_args()
    if args.render:
        stored = json.loads(args.render.read_text())
        args.markdown.write_text(markdown(stored["results"], stored["window"]))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"server: {args.src} {' '.join(args.server_options)}; {os.cpu_count()} cores; {args.seconds} s per point")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "token.txt").write_text(TOKEN)
        results = {title: measure(title, MODELS[title], args, Path(tmp)) for title in args.models}
    if args.json:
        args.json.write_text(json.dumps({"window": args.window, "results": results}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(results, args.window))


if __name__ == "__main__":
    main()
