"""Authenticated latency while N connections hold half-sent headers (a slowloris attack), against quiet.

A real tail server (``python -m splitshield.runtime.server``, LeNet ``ReLU2`` cloud artifact, default
hardening unless ``--header-timeout`` / ``--max-connections`` are given) runs on 127.0.0.1. One
authenticated client sends one-image float32 frames in a loop, alternating a request on a kept-alive
connection and one on a new connection (what a starved accept queue would delay first), for ``--seconds``:

1. quiet: nothing else talks to the server;
2. loaded: a separate *holder* process keeps ``--connections`` connections (default 1000) open, each having
   sent ``POST /v1/infer HTTP/1.1`` and one header, then one more header line every second, never ending
   them and never authenticating. When the server closes one (its header timeout, or an eviction past
   ``--max-connections``) the holder reopens it at once, so that many are held all along. Once all are
   open the holder runs for one header timeout more (the steady state, where the server closes and the
   holder reopens about N / header-timeout connections a second), then the client measures.

Printed: p50 / p99 latency (ms) of each kind of request, quiet and loaded, loaded / quiet, and failed
requests (a refused or reset connection, a non-200 answer); how many connections the holder held (least
and most while measuring) and reopened; the server's log size (the rate-limited log must not grow with
the attack). Untrained weights: speed does not depend on them. The
holder, the client and the server share this machine's cores, so the loaded numbers are a pessimistic bound.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/half_open.py [--connections 1000] [--seconds 8]``
(about 40 s with the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from serve import SRC, TOKEN, start  # benchmarks/serve.py: the same server subprocess

import splitshield as ss
from splitshield.runtime.artifacts import export
from splitshield.runtime.codec import encode
from splitshield.runtime.server import ConnectionLimits

PARTIAL = b"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def raise_fd_limit(needed: int) -> None:
    """Let this process hold ``needed`` sockets (the soft open-file limit, up to the hard one)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


# -- the holder: a separate process keeping N half-open connections ----------------------------------------


async def hold_one(host: str, port: int, stats: dict[str, int], writers: set[asyncio.StreamWriter],
                   delay: float) -> None:
    """Keep one half-open connection forever: partial headers (more come from :func:`trickle`), reopened as
    soon as the server closes it."""
    await asyncio.sleep(delay)
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats["refused"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["open"] += 1
        stats["opened"] += 1
        writers.add(writer)
        try:
            writer.write(PARTIAL)
            while await reader.read(4096):  # until the server closes it
                pass
        except OSError:
            pass
        finally:
            stats["open"] -= 1
            writers.discard(writer)
            writer.close()


async def trickle(writers: set[asyncio.StreamWriter], period: float = 1.0, slices: int = 100) -> None:
    """One more header line on every held connection each ``period`` s, spread over the period (a slice of
    the connections every ``period / slices`` s), never the blank line that would end the headers."""
    while True:
        ordered = list(writers)
        for i in range(slices):
            for writer in ordered[i::slices]:
                if not writer.is_closing():
                    writer.write(b"X-Slow: 1\r\n")
            await asyncio.sleep(period / slices)


async def hold(host: str, port: int, n: int) -> None:
    """The holder's main loop: ``n`` connections opened over about a second; one JSON stats line a 0.25 s."""
    stats = {"open": 0, "opened": 0, "refused": 0}
    writers: set[asyncio.StreamWriter] = set()
    tasks = [asyncio.create_task(hold_one(host, port, stats, writers, i / max(n, 1))) for i in range(n)]
    tasks.append(asyncio.create_task(trickle(writers)))
    try:
        while True:
            print(json.dumps(stats), flush=True)
            await asyncio.sleep(0.25)
    finally:
        for t in tasks:
            t.cancel()


class Holder:
    """Runs this script in ``--hold`` mode and follows the stats it prints."""

    def __init__(self, port: int, n: int):
        cmd = [sys.executable, __file__, "--hold", str(port), "--connections", str(n)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
        self.stats: dict[str, int] = {"open": 0, "opened": 0, "refused": 0}
        self.samples: list[int] = []
        self.sampling = False
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stats = json.loads(line)
            if self.sampling:
                self.samples.append(self.stats["open"])

    def wait_open(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.stats["open"] < n and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.stats["open"] < n:
            raise RuntimeError(f"the holder opened only {self.stats['open']} of {n} connections: {self.stats}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- the server and the measuring client --------------------------------------------------------------------


def measure(url: str, frame: bytes, seconds: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Latencies (s) of authenticated requests for ``seconds``, kept-alive and on a new connection alternated,
    and the number of failed requests of each kind."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    latencies: dict[str, list[float]] = {"kept-alive": [], "new connection": []}
    failed = dict.fromkeys(latencies, 0)
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # every request on a new TCP connection
    with httpx.Client(base_url=url, headers=headers, timeout=30) as kept, \
            httpx.Client(base_url=url, headers=headers, timeout=30, limits=no_reuse) as fresh:
        with contextlib.suppress(httpx.TransportError):
            kept.post("/v1/infer", content=frame)  # connect outside the measurement
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for kind, client in zip(latencies, (kept, fresh), strict=True):
                t0 = time.perf_counter()
                try:
                    ok = client.post("/v1/infer", content=frame).status_code == 200
                except httpx.TransportError:
                    ok = False
                if ok:
                    latencies[kind].append(time.perf_counter() - t0)
                else:
                    failed[kind] += 1
    return latencies, failed


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) in ms."""
    ordered = sorted(values) or [float("nan")]
    return 1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def tiny_cloud(directory: Path) -> tuple[Path, bytes]:
    """The cloud artifact of an untrained LeNet split at ReLU2, and one image's feature frame."""
    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28)).eval()
    checkpoint = ss.save_checkpoint(directory / "lenet", target)
    cloud = export(checkpoint, directory / "edge.safetensors", directory / "cloud.safetensors").cloud
    with torch.no_grad():
        return cloud, encode(target.head(torch.rand(1, 1, 28, 28)))


def report(quiet: tuple[dict[str, list[float]], dict[str, int]],
           loaded: tuple[dict[str, list[float]], dict[str, int]]) -> None:
    print(f"{'request':>16}{'n quiet':>9}{'p50 ms':>9}{'p99 ms':>9}{'n loaded':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'p99 loaded/quiet':>18}{'failed q/l':>12}")
    for kind in quiet[0]:
        (q50, q99), (l50, l99) = percentiles(quiet[0][kind]), percentiles(loaded[0][kind])
        print(f"{kind:>16}{len(quiet[0][kind]):>9}{q50:>9.2f}{q99:>9.2f}{len(loaded[0][kind]):>10}{l50:>9.2f}"
              f"{l99:>9.2f}{l99 / q99:>18.2f}{f'{quiet[1][kind]}/{loaded[1][kind]}':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="half-open connections held")
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time, quiet and loaded each")
    parser.add_argument("--header-timeout", type=float, help="the server's --header-timeout (default: its own)")
    parser.add_argument("--max-connections", type=int, help="the server's --max-connections (default: its own)")
    parser.add_argument("--hold", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the holder process
    args = parser.parse_args()
    raise_fd_limit(args.connections + 256)
    if args.hold is not None:
        asyncio.run(hold("127.0.0.1", args.hold, args.connections))
        return
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in (("header_timeout", args.header_timeout),
                                                           ("max_connections", args.max_connections)) if v is not None]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "token.txt").write_text(TOKEN)
        cloud, frame = tiny_cloud(directory)
        log = directory / "server.log"
        proc, port = start(["-m", "splitshield.runtime.server", str(cloud), "--token-file",
                            str(directory / "token.txt"), *extra], SRC, log)
        url = f"http://127.0.0.1:{port}"
        holder = None
        try:
            print(f"server {url} {' '.join(extra) or '(default limits)'}; {args.connections} half-open connections; "
                  f"{args.seconds:.0f} s per phase", flush=True)
            quiet = measure(url, frame, args.seconds)
            log_quiet = log.stat().st_size
            holder = Holder(int(url.rsplit(":", 1)[1]), args.connections)
            holder.wait_open(args.connections, timeout=60)
            time.sleep((args.header_timeout or ConnectionLimits().header_timeout) + 1)  # into the steady state
            holder.sampling = True
            opened_before = holder.stats["opened"]
            loaded = measure(url, frame, args.seconds)
            holder.sampling = False
            held = holder.samples or [holder.stats["open"]]
            report(quiet, loaded)
            print(f"held {min(held)}-{max(held)} half-open connections while measuring; the server closed and the "
                  f"holder reopened {holder.stats['opened'] - opened_before}; refused {holder.stats['refused']}")
            print(f"server log: {log_quiet} bytes after the quiet phase, {log.stat().st_size} after the loaded one")
        finally:
            if holder is not None:
                holder.stop()
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
