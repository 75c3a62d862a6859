"""A light HTTP/1.1 load generator for ``benchmarks/serve.py``: raw keep-alive sockets on one asyncio loop.

Run as its own process so the clients' CPU is not the server's GIL: ``python _loadgen.py HOST PORT TOKEN
FRAME CLIENTS SECONDS [WINDOW]`` posts the bytes of the file FRAME to ``/v1/infer`` from CLIENTS connections, each
sending its next request when the previous answer has arrived, for SECONDS after a warm-up request each, and
prints one JSON line: ``{"requests", "seconds", "p50_ms", "p99_ms", "errors"}``. A generator in Python with
an HTTP library would spend more CPU per request than the server under test does. With WINDOW, each client
instead opens a ``/v1/stream`` WebSocket and keeps WINDOW frames sent ahead of their answers (latency: from a
frame's send to its answer).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head[9:12]), await reader.readexactly(length)


async def _client(host: str, port: int, request: bytes, start: asyncio.Event, stop_at: list[float],
                  latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        status, body = await _exchange(reader, writer, request)  # connect and warm up outside the measurement
        await start.wait()
        while status == 200 and time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            status, body = await _exchange(reader, writer, request)
            latencies.append(time.perf_counter() - t0)
        if status != 200:
            errors.append(f"{status}: {body[:200].decode('latin-1')}")
    finally:
        writer.close()


async def _streamer(url: str, token: str, frame: bytes, window: int, start: asyncio.Event, stop_at: list[float],
                    latencies: list[float], errors: list[str]) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None,
                       compression=None) as ws:
        await ws.send(frame)
        await ws.recv()  # warm up outside the measurement
        await start.wait()
        sent: deque[float] = deque()
        for _ in range(window):
            sent.append(time.perf_counter())
            await ws.send(frame)
        while sent:
            answer = await ws.recv()
            latencies.append(time.perf_counter() - sent.popleft())
            if '"error"' in answer:
                errors.append(answer[:200])
                return
            if time.perf_counter() < stop_at[0]:
                sent.append(time.perf_counter())
                await ws.send(frame)


async def run(host: str, port: int, token: str, frame: bytes, clients: int, seconds: float,
              window: int | None = None) -> dict[str, object]:
    request = (f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/octet-stream\r\nContent-Length: {len(frame)}\r\n\r\n").encode() + frame
    latencies: list[float] = []
    errors: list[str] = []
    start, stop_at = asyncio.Event(), [float("inf")]
    if window is None:
        tasks = [asyncio.create_task(_client(host, port, request, start, stop_at, latencies, errors))
                 for _ in range(clients)]
    else:
        tasks = [asyncio.create_task(_streamer(f"ws://{host}:{port}/v1/stream", token, frame, window, start, stop_at,
                                               latencies, errors)) for _ in range(clients)]
    await asyncio.sleep(0.3)
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = (lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else None
    return {"requests": len(latencies), "seconds": elapsed, "p50_ms": pick and pick(0.5),
            "p99_ms": pick and pick(0.99), "errors": errors[:3]}


if __name__ == "__main__":
    host, port, token, frame_path, clients, seconds = sys.argv[1:7]
    window = int(sys.argv[7]) if len(sys.argv) > 7 else None
    with open(frame_path, "rb") as f:
        frame = f.read()
    print(json.dumps(asyncio.run(run(host, int(port), token, frame, int(clients), float(seconds), window))))
