"""Tests of the deployed runtime: a real tail server on 127.0.0.1 and the edge client.

The server runs as a subprocess (``python -m splitshield.runtime.server``) on a random free port, as a
user would start it; every request goes over real loopback HTTP. Malformed frames are built by hand
from the layout documented in :mod:`splitshield.runtime.codec`, independently of the encoder.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from test_codec import craft  # the hand-built frame of the documented layout, shared

import splitshield as ss
from splitshield.errors import ConfigError
from splitshield.runtime.client import EdgeClient, ServerError, load_images, read_token
from splitshield.runtime.codec import CodecOptions, decode, encode

SRC = Path(__file__).resolve().parents[1] / "src"
TOKEN = "s3cret-token-0123456789"
FEATURE = (16, 8, 8)  # LeNet ReLU2
MAX_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m splitshield.runtime.server`` (or ``command``) on 127.0.0.1, killed on :meth:`stop`.

    With ``ca`` (the PEM authority of the ``--tls-cert`` passed in ``args``) it is reached over HTTPS.
    """

    def __init__(self, checkpoint: Path, *args: str, port: int | None = None, ready_timeout: float = 60.0,
                 command: tuple[str, ...] = ("-m", "splitshield.runtime.server"), ca: Path | None = None):
        import ssl

        self.port = port or free_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        verify = ssl.create_default_context(cafile=str(ca)) if ca else True
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, *command, str(checkpoint), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        # Output goes to a file, not a pipe: a pipe nobody reads could fill up and block the server.
        self.log = tempfile.NamedTemporaryFile(prefix="splitshield-server-", suffix=".log")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server on port {self.port} not ready after {ready_timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> str:
        """Terminate (SIGKILL if it hangs) and return everything the server printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        out = self.output()
        self.log.close()
        return out


def tiny_checkpoint(directory: Path) -> Path:
    """An untrained LeNet split at ReLU2 (feature 16x8x8), saved as a checkpoint."""
    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    return ss.save_checkpoint(directory / "lenet", target)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def cloud(checkpoint: Path) -> Path:
    """The cloud artifact of ``checkpoint`` (tail only), as deployed; its edge artifact lies beside it."""
    from splitshield.runtime.artifacts import export

    return export(checkpoint, checkpoint.with_name("edge.safetensors"), checkpoint.with_name("cloud.safetensors")).cloud


@pytest.fixture(scope="module")
def server(cloud: Path, tmp_path_factory: pytest.TempPathFactory):
    token_file = tmp_path_factory.mktemp("tok") / "token.txt"
    token_file.write_text(TOKEN + "\n")  # the trailing newline an editor adds must be stripped
    proc = ServerProcess(cloud, "--token-file", str(token_file), "--max-batch", str(MAX_BATCH))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield client


def f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


N = 2 * 16 * 8 * 8
GOOD = craft(f32([0.5] * N), (2, *FEATURE))


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


# -- endpoints and auth ------------------------------------------------------------------------------------


def test_healthz_needs_no_auth(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def test_model_document(http: httpx.Client) -> None:
    info = http.get("/v1/model").json()
    assert info["split"] == "ReLU2"
    assert info["input_shape"] == [1, 28, 28] and info["feature_shape"] == list(FEATURE)
    assert info["num_classes"] == 10 and info["max_batch"] == MAX_BATCH
    assert len(info["fingerprint"]) == 64 and "defense" not in info  # the cloud does not know the defense
    assert set(info["codec"]["encodings"]) == {"float32", "float16", "uint8", "uint4"}
    assert set(info["codec"]["compressions"]) == {"none", "zstd"}


def test_good_frame_gives_the_tails_logits(http: httpx.Client, checkpoint: Path) -> None:
    r = http.post("/v1/infer", content=GOOD, headers={"X-Request-ID": "abc"})
    assert r.status_code == 200, r.text
    target, _, _ = ss.load_checkpoint(checkpoint)
    expected = target.tail(torch.full((2, *FEATURE), 0.5))
    assert torch.allclose(torch.tensor(r.json()["logits"]), expected, atol=1e-6)
    assert r.json()["request_id"] == "abc"


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": TOKEN},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
])
@pytest.mark.parametrize("method,path", [("GET", "/v1/model"), ("POST", "/v1/infer")])
def test_auth_failures(server: ServerProcess, headers: dict[str, str], method: str, path: str) -> None:
    r = httpx.request(method, f"{server.url}{path}", headers=headers, content=GOOD if method == "POST" else None)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_route_and_method_are_json(http: httpx.Client) -> None:
    assert_error(http.get("/nope"), 404, "not_found")
    assert_error(http.get("/v1/infer"), 405, "method_not_allowed")


# -- malformed frames: every class the codec rejects -------------------------------------------------------

Q8 = (0.1, 0.0)
MALFORMED = {
    "empty body": b"",
    "shorter than a header": b"SSFT\x01",
    "bad magic": craft(f32([0.5] * N), (2, *FEATURE), magic=b"XXXX"),
    "unknown version": craft(f32([0.5] * N), (2, *FEATURE), version=9),
    "unknown encoding code": craft(f32([0.5] * N), (2, *FEATURE), encoding=7),
    "unknown compression code": craft(f32([0.5] * N), (2, *FEATURE), compression=5),
    "too many dims": craft(b"", (1,) * 9),
    "zero-sized dim": craft(b"", (0, *FEATURE)),
    "truncated payload": GOOD[:-10],
    "trailing bytes": GOOD + b"\x00\x00",
    "payload length lies": craft(f32([0.5] * N), (2, *FEATURE), payload_len=N * 4 + 4),
    "crc mismatch": GOOD[:-1] + bytes([GOOD[-1] ^ 1]),
    "payload size disagrees with shape": craft(f32([0.5] * (N - 1)), (2, *FEATURE)),
    "NaN value": craft(f32([0.5] * (N - 1) + [float("nan")]), (2, *FEATURE)),
    "inf value": craft(f32([float("inf")] + [0.5] * (N - 1)), (2, *FEATURE)),
    "float16 inf": craft(struct.pack(f"<{N}e", *([0.5] * (N - 1) + [float("inf")])), (2, *FEATURE), encoding=1),
    "invalid quantization scale": craft(bytes(N), (2, *FEATURE), encoding=2, quant=(0.0, 0.0)),
    "NaN quantization offset": craft(bytes(N), (2, *FEATURE), encoding=2, quant=(1.0, float("nan"))),
    "uint4 payload too short": craft(bytes(N // 2 - 1), (2, *FEATURE), encoding=3, quant=Q8),
    "corrupt zstd": craft(b"\x28\xb5\x2f\xfd" + b"\xff" * 40, (2, *FEATURE), compression=1),
    "zstd of the wrong size": None,  # filled below (needs zstandard)
    "zstd bomb": None,
}


def _zstd_cases() -> None:
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    MALFORMED["zstd of the wrong size"] = craft(c.compress(f32([0.5] * (N + 4))), (2, *FEATURE), compression=1)
    # 200 MiB of zeros compress to a few KB: the server must refuse before expanding it.
    honest = c.compress(bytes(4 * N))  # a first frame of exactly the size the shape needs...
    stream = c.compressobj()  # ...then 200 MiB of zeros, compressed in 1 MiB steps to spare the memory
    bomb = b"".join(stream.compress(bytes(2**20)) for _ in range(200)) + stream.flush()
    MALFORMED["zstd bomb"] = craft(honest + bomb, (2, *FEATURE), compression=1)


_zstd_cases()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_get_400_and_server_survives(http: httpx.Client, name: str) -> None:
    assert_error(http.post("/v1/infer", content=MALFORMED[name]), 400, "malformed_frame")
    assert http.post("/v1/infer", content=GOOD).status_code == 200


def test_random_garbage_never_crashes_the_server(http: httpx.Client) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        n = int(torch.randint(0, 3000, (1,), generator=g))
        body = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
        if i % 2:  # keep a valid magic/version so parsing goes deeper
            body = b"SSFT\x01" + body
        assert http.post("/v1/infer", content=body).status_code in (400, 413, 415, 422)
    assert http.post("/v1/infer", content=GOOD).status_code == 200


# -- size and shape ----------------------------------------------------------------------------------------


def test_oversize_body_declared_length(http: httpx.Client) -> None:
    info = http.get("/v1/model").json()
    assert_error(http.post("/v1/infer", content=bytes(info["max_body_bytes"] + 1)), 413, "payload_too_large")


def test_oversize_chunked_body_without_length(http: httpx.Client) -> None:
    def chunks():
        for _ in range(40):  # 40 MiB, far over the ~140 KB limit of a 32 x 16x8x8 model
            yield bytes(2**20)

    r = http.post("/v1/infer", content=chunks())
    assert_error(r, 413, "payload_too_large")


def test_largest_legal_batch_is_accepted_and_one_more_is_not(http: httpx.Client) -> None:
    z = torch.rand(MAX_BATCH, *FEATURE)
    assert http.post("/v1/infer", content=encode(z)).status_code == 200
    z = torch.rand(MAX_BATCH + 1, *FEATURE)
    # As float32 this batch is over the body limit (413); as uint8 it fits, and its shape is refused.
    assert_error(http.post("/v1/infer", content=encode(z)), 413, "payload_too_large")
    assert_error(http.post("/v1/infer", content=encode(z, CodecOptions("uint8"))), 422, "wrong_shape")


@pytest.mark.parametrize("shape", [(2, 16, 8, 7), (2, 8, 16, 8), (16, 8, 8), (2, 1024), (1, 1, 16, 8, 8), ()])
def test_wrong_feature_shape(http: httpx.Client, shape: tuple[int, ...]) -> None:
    r = http.post("/v1/infer", content=encode(torch.rand(shape)))
    assert_error(r, 422, "wrong_shape")
    if shape:
        assert "16, 8, 8" in r.json()["error"]["message"]


# -- the edge client ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding,compression,atol", [
    ("float32", "none", 1e-5), ("float32", "zstd", 1e-5), ("float16", "zstd", 2e-2), ("uint8", "none", 0.1),
    ("uint4", "zstd", None),
])
def test_edge_client_matches_local_model(server: ServerProcess, checkpoint: Path, encoding: str,
                                         compression: str, atol: float | None) -> None:
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    target, _, _ = ss.load_checkpoint(checkpoint)
    with torch.no_grad():
        local = target(x)
    with EdgeClient(checkpoint, server.url, TOKEN, codec=CodecOptions(encoding, compression), batch_size=16) as c:
        remote = c.predict(x)
        # Independent truth for a lossy codec: the tail applied to the decoded features, computed here
        # per request (quantization ranges are per frame, and the client sends batches of 16).
        z = c.features(x)
        sent = torch.cat([decode(encode(z[i : i + 16], CodecOptions(encoding, compression))) for i in range(0, 40, 16)])
    assert remote.shape == (40, 10)
    with torch.no_grad():
        assert torch.allclose(remote, target.tail(sent), atol=1e-5)
    if atol is not None:
        assert torch.allclose(remote, local, atol=atol)


def test_stream_gives_the_tails_logits_in_order(server: ServerProcess, checkpoint: Path) -> None:
    target, _, _ = ss.load_checkpoint(checkpoint)
    x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with EdgeClient(checkpoint, server.url, TOKEN, batch_size=3) as client:  # 7 frames, 4 sent ahead
        logits = client.predict_stream(x, window=4)
    with torch.no_grad():
        assert torch.allclose(logits, target(x), atol=1e-5)
    with EdgeClient(checkpoint, server.url, TOKEN) as client:
        with pytest.raises(ConfigError, match="window"):
            client.predict_stream(x, window=0)


def test_stream_answers_bad_frames_in_place_and_goes_on(server: ServerProcess) -> None:
    import json

    from websockets.sync.client import connect

    url = server.url.replace("http", "ws", 1) + "/v1/stream"
    with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        for message in ("a text message", b"garbage", GOOD, encode(torch.rand(1, 3, 3))):
            ws.send(message)
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(4)]
    assert [a["seq"] for a in answers] == [0, 1, 2, 3]
    assert [a.get("error", {}).get("code") for a in answers] == ["malformed_frame", "malformed_frame", None,
                                                                  "wrong_shape"]
    assert len(answers[2]["logits"]) == 2  # GOOD holds two feature rows


def test_stream_needs_the_token(server: ServerProcess, checkpoint: Path) -> None:
    with EdgeClient(checkpoint, server.url, TOKEN) as client:
        client._headers = {"Authorization": "Bearer nope"}  # checked the model with the right token first
        with pytest.raises(ServerError) as info:
            client.predict_stream(torch.rand(2, 1, 28, 28))
    assert info.value.code == "unauthorized" and info.value.status == 403


def test_edge_client_bad_token_raises_server_error(server: ServerProcess, checkpoint: Path) -> None:
    with EdgeClient(checkpoint, server.url, "nope") as c, pytest.raises(ServerError) as info:
        c.predict(torch.rand(2, 1, 28, 28))
    assert info.value.code == "unauthorized" and info.value.status == 401


def test_edge_client_retries_then_fails_on_dead_server(checkpoint: Path) -> None:
    port = free_port()  # nothing listens there
    with EdgeClient(checkpoint, f"http://127.0.0.1:{port}", TOKEN, retries=2, backoff=0.01, timeout=2) as c:
        start = time.monotonic()
        with pytest.raises(ServerError, match="after 3 attempts"):
            c.predict(torch.rand(2, 1, 28, 28))
    assert time.monotonic() - start < 10


def test_edge_client_rejects_a_server_with_another_model(server: ServerProcess, tmp_path: Path) -> None:
    other = ss.save_checkpoint(tmp_path / "conv1", ss.split(ss.build_model("lenet"), "conv1", input_shape=(1, 28, 28)))
    with EdgeClient(other, server.url, TOKEN) as c, pytest.raises(ConfigError, match="same checkpoint"):
        c.predict(torch.rand(2, 1, 28, 28))


def test_concurrent_clients_get_their_own_answers(server: ServerProcess, checkpoint: Path) -> None:
    target, _, _ = ss.load_checkpoint(checkpoint)
    errors: list[str] = []

    # Built before the threads start: loading a checkpoint traces the model with torch.fx, which must not
    # overlap with forward passes in other threads (the tracer patches nn.Module.__call__ globally).
    clients = [EdgeClient(checkpoint, server.url, TOKEN, codec=CodecOptions("float32", "zstd"), batch_size=4)
               for _ in range(8)]

    def worker(seed: int) -> None:
        with clients[seed] as c:
            for i in range(8):
                x = torch.rand(1 + (seed + i) % 5, 1, 28, 28, generator=torch.Generator().manual_seed(100 * seed + i))
                with torch.no_grad():
                    expected = target(x)
                if not torch.allclose(c.predict(x), expected, atol=1e-5):
                    errors.append(f"client {seed} request {i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


# -- startup and helpers -----------------------------------------------------------------------------------


def test_server_refuses_empty_or_missing_token(checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import main

    (tmp_path / "empty.txt").write_text("\n")
    # main() exits before loading anything when the token is unusable, so this runs in-process.
    assert main([str(checkpoint), "--port", "1", "--token-file", str(tmp_path / "empty.txt")]) == 2
    assert "token is empty" in capsys.readouterr().err
    assert main([str(checkpoint), "--port", "1"]) == 2
    assert "--no-auth" in capsys.readouterr().err


def test_no_auth_warns_and_serves_without_a_token(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import TailService, create_app, resolve_token

    token = resolve_token(None, no_auth=True)
    assert token is None and "warning: --no-auth" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not both"):
        resolve_token("token.txt", no_auth=True)
    r, = asgi_calls(create_app(TailService(checkpoint, allow_head_weights=True), token), ("POST", "/v1/infer", GOOD))
    assert r.status_code == 200


def test_read_token(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  abc\n")
    assert read_token(tmp_path / "t") == "abc"
    with pytest.raises(ConfigError, match="does not exist"):
        read_token(tmp_path / "missing")
    for bad in ("a b", "line1\nline2", "pässword"):
        (tmp_path / "t").write_text(bad)
        with pytest.raises(ConfigError, match="one line"):
            read_token(tmp_path / "t")


def test_load_images_converts_and_resizes(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (56, 56), 128).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x, files = load_images([tmp_path], (1, 28, 28))
    assert [f.name for f in files] == ["a.png", "b.png"] and x.shape == (2, 1, 28, 28)
    assert abs(float(x[0].mean()) - 76 / 255) < 1e-6  # PIL's L = 0.299 R: 255 * 0.299 = 76.2 -> 76
    assert torch.allclose(x[1], torch.full((1, 28, 28), 128 / 255))


# -- in-process app: options the CLI does not expose --------------------------------------------------------


def asgi_calls(app, *calls: tuple[str, str, bytes | None]) -> list[httpx.Response]:
    """Run requests concurrently against an in-process app (no socket), with the test token."""
    import asyncio

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            return await asyncio.gather(*(client.request(m, p, content=body) for m, p, body in calls))

    return asyncio.run(run())


def test_unsupported_encoding_and_timeout_in_process(checkpoint: Path) -> None:
    from splitshield.runtime.server import TailService, create_app

    service = TailService(checkpoint, max_batch=4, encodings=("float32",), allow_head_weights=True)
    app = create_app(service, TOKEN, request_timeout=0.5)
    info, = asgi_calls(app, ("GET", "/v1/model", None))
    assert info.json()["codec"]["encodings"] == ["float32"]
    r, = asgi_calls(app, ("POST", "/v1/infer", encode(torch.rand(2, *FEATURE), CodecOptions("uint8"))))
    assert_error(r, 415, "unsupported_encoding")
    frame = encode(torch.rand(2, *FEATURE))

    async def slow_body():  # a client that stops sending half-way: its request times out, the server goes on
        import asyncio

        yield frame[:100]
        await asyncio.sleep(2.0)
        yield frame[100:]

    r, = asgi_calls(app, ("POST", "/v1/infer", slow_body()))
    assert_error(r, 503, "timeout")
    r, = asgi_calls(app, ("POST", "/v1/infer", frame))
    assert r.status_code == 200


def test_create_app_refuses_empty_token(checkpoint: Path) -> None:
    from splitshield.runtime.server import TailService, create_app

    with pytest.raises(ConfigError, match="token is empty"):
        create_app(TailService(checkpoint, allow_head_weights=True), "")


def test_requests_beyond_max_in_flight_are_refused_as_overloaded(checkpoint: Path) -> None:
    from splitshield.runtime.server import TailService, create_app

    service = TailService(checkpoint, max_batch=4, allow_head_weights=True)
    forward = service.forward
    service.forward = lambda z: (time.sleep(0.5), forward(z))[1]
    frame = encode(torch.rand(1, *FEATURE))
    responses = asgi_calls(create_app(service, TOKEN, max_in_flight=2), *[("POST", "/v1/infer", frame)] * 5)
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")


# -- the command line: serve --record, infer, attack --transcript ---------------------------------------------


def test_cli_serve_infer_and_attack_the_transcript(checkpoint: Path, cloud: Path, tmp_path: Path) -> None:
    from PIL import Image
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from splitshield.cli import app
    from splitshield.runtime.transcript import read_features, read_records

    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    db, images = tmp_path / "transcript.db", tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        pixels = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(images / f"img{i}.png")
    proc = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--record", str(db),
                         command=("-m", "splitshield.cli", "serve"))
    runner = CliRunner()
    edge = cloud.with_name("edge.safetensors")
    try:
        result = runner.invoke(app, ["infer", str(edge), str(images), "--server", proc.url, "--token-file",
                                     str(tmp_path / "token.txt"), "--encoding", "uint8", "--compression", "zstd"])
        assert result.exit_code == 0, result.output
        assert all(f"img{i}.png" in result.output for i in range(3))
        streamed = runner.invoke(app, ["infer", str(edge), str(images), "--server", proc.url, "--token-file",
                                       str(tmp_path / "token.txt"), "--stream", "2", "--batch-size", "1"])
        assert streamed.exit_code == 0, streamed.output
        assert all(f"img{i}.png" in streamed.output for i in range(3))
        bad = runner.invoke(app, ["infer", str(checkpoint), str(images), "--server", proc.url])
        assert bad.exit_code == 2 and "unauthorized" in bad.output
    finally:
        proc.stop()
    # Exactly the uint8-quantized features of the three images crossed the network, then each image's float32
    # features over the stream, nothing else.
    target, _, _ = ss.load_checkpoint(checkpoint)
    x, _ = load_images([images], (1, 28, 28))
    with torch.no_grad():
        sent = torch.cat([decode(encode(target.head(x), CodecOptions("uint8", "zstd"))), target.head(x)])
    features, _ = read_features(db)
    # A stream's frames are admitted concurrently (2 ahead), so their rows may commit in either order.
    ids = [r[2] for r in read_records(db)]
    assert sorted(ids[1:]) == ["stream:0", "stream:1", "stream:2"]
    order = [0, 1, 2] + sorted(range(3, 6), key=lambda i: ids[i - 2])  # rows 1-3 hold features 3-5, one each
    assert torch.equal(features[order], sent)

    result = runner.invoke(app, ["attack", str(checkpoint), "--attack", "white_box", "--options", '{"iters": 20}',
                                 "--transcript", str(db), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = load_file(str(tmp_path / "out" / "reconstructions.safetensors"))
    assert saved["x_hat"].shape == (6, 1, 28, 28) and saved["received_at"].shape == (6,)


def test_edge_client_applies_the_checkpoints_defense_on_the_device(server: ServerProcess, tmp_path: Path) -> None:
    from splitshield.defenses import build_defense

    torch.manual_seed(0)
    target = ss.split(ss.build_model("lenet"), "ReLU2", input_shape=(1, 28, 28))
    noisy = ss.save_checkpoint(tmp_path / "noisy", target, build_defense({"name": "gaussian_noise", "sigma": 0.5}))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        clean = target.head(x)
    with EdgeClient(noisy, server.url, TOKEN, seed=7) as a, EdgeClient(noisy, server.url, TOKEN, seed=7) as b:
        sent = a.features(x)
        assert torch.equal(sent, b.features(x))  # same seed, same noise
        # What leaves the device is head(x) + N(0, 0.5^2): the residual's std is sigma.
        assert abs(float((sent - clean).std()) - 0.5) < 0.05
        assert not torch.equal(a.features(x), sent)  # a fresh draw per call


# -- unauthenticated clients cannot starve authenticated ones -------------------------------------------------


def half_open(port: int, data: bytes = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n") -> socket.socket:
    """A connection that sends the start of a request's headers and never finishes them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_half_open_connections_are_closed_after_the_header_timeout(cloud: Path, tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text(TOKEN)
    proc = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--header-timeout", "0.5",
                         "--max-header-bytes", "4096")
    try:
        huge = half_open(proc.port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        assert huge.recv(4096).startswith(b"HTTP/1.1 400")  # a head over --max-header-bytes
        start = time.monotonic()
        partial, silent = half_open(proc.port), half_open(proc.port, b"")
        crowd = [half_open(proc.port) for _ in range(30)]  # 31 identical warnings: the log keeps 10
        trickle = half_open(proc.port)
        for _ in range(3):  # a byte every 0.2 s does not extend the deadline
            time.sleep(0.2)
            trickle.sendall(b"X")
        with httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            assert http.post("/v1/infer", content=GOOD).status_code == 200  # served meanwhile
            kept_alive = http.get("/v1/model")  # after a response, a new partial request gets the same bound
            assert kept_alive.status_code == 200
        assert all(closed_by_server(s, 5.0) for s in (partial, silent, trickle, *crowd))
        assert 0.4 < time.monotonic() - start < 5.0
        after_response = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
        after_response.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert after_response.recv(4096).startswith(b"HTTP/1.1 200")
        after_response.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request never completes
        assert closed_by_server(after_response, 5.0)
    finally:
        log = proc.stop()
    assert 1 <= log.count("no complete request headers") <= 10, log


def test_an_endless_header_is_cut_at_the_size_limit_even_behind_a_pending_request(cloud: Path,
                                                                                   tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text(TOKEN)
    proc = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--max-header-bytes", "4096")
    try:
        for first in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):  # alone; behind a pipelined request
            sock = half_open(proc.port, first + b"GET /healthz HTTP/1.1\r\nX-Big: ")
            sent = 0
            try:
                while sent < 1 << 20:  # a header value that never ends, in 1 KiB pieces
                    sock.sendall(b"a" * 1024)
                    sent += 1024
                    time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert sent < 64 * 1024, sent  # cut near 4096 bytes, far from the 10 s header timeout's worth
            assert closed_by_server(sock, 5.0)
    finally:
        log = proc.stop()
    assert "--max-header-bytes" in log


def test_connections_beyond_the_limit_evict_the_longest_waiting(cloud: Path, tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text(TOKEN)
    proc = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--max-connections", "4",
                         "--header-timeout", "60")
    try:
        socks = [half_open(proc.port) for _ in range(4)]
        # Every waiting connection is younger than the grace period (1 s here): the new one is closed.
        assert closed_by_server(half_open(proc.port), 5.0)
        time.sleep(1.2)
        r = httpx.post(f"{proc.url}/v1/infer", content=GOOD, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 200  # the limit is reached, yet the authenticated request is served
        assert closed_by_server(socks[0], 5.0)  # the longest waiting made room
        assert not closed_by_server(socks[-1], 0.3)  # the newest is still open
    finally:
        log = proc.stop()
    assert "--max-connections" in log


def test_workers_serve_from_several_processes_into_one_transcript(cloud: Path, checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    from splitshield.runtime.transcript import read_records

    (tmp_path / "token.txt").write_text(TOKEN)
    proc = ServerProcess(cloud, "--token-file", str(tmp_path / "token.txt"), "--workers", "2",
                         "--record", str(tmp_path / "t.db"), ready_timeout=120)
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout.split()
        target, _, _ = ss.load_checkpoint(checkpoint)
        x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(3))

        clients = [EdgeClient(checkpoint, proc.url, TOKEN) for _ in range(6)]  # a connection each: spread over
        try:                                                                    # the workers by the kernel
            with ThreadPoolExecutor(6) as pool:
                parts = list(pool.map(lambda i: clients[i].predict(x[4 * i:4 * i + 4]), range(6)))
        finally:
            for client in clients:
                client.close()
    finally:
        proc.stop()
    assert len(children) >= 2, children  # the supervisor's worker processes (multiprocessing may add one)
    with torch.no_grad():
        assert torch.allclose(torch.cat(parts), target(x), atol=1e-5)
    assert sum(batch for _, _, _, batch in _batches(read_records(tmp_path / "t.db"))) == 24


def _batches(records: list) -> list:
    """(id, time, request id, rows) of each transcript record."""
    from splitshield.runtime.codec import read_header

    return [(i, t, r, read_header(frame).shape[0]) for i, t, r, frame in records]


def test_workers_and_transcript_rotation_are_refused_together(cloud: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import main

    (tmp_path / "token.txt").write_text(TOKEN)
    base = [str(cloud), "--token-file", str(tmp_path / "token.txt")]
    assert main([*base, "--workers", "2", "--record", str(tmp_path / "t.db"), "--record-max-mb", "1"]) == 2
    assert main([*base, "--workers", "0"]) == 2
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main([*base, "--record", str(blocked / "t.db")]) == 2  # module entry: checked before loading too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--record-max-mb" in err[0] and "--workers" in err[1] and "--record" in err[2], err


def test_rate_limit_filter_bounds_one_repeated_message() -> None:
    import logging

    from splitshield.runtime.server import RateLimitFilter

    now = [0.0]
    limit = RateLimitFilter(max_repeats=3, interval=10.0, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, args, None)

    passed = [limit.filter(record("accept() failed: %s", "Too many open files")) for _ in range(1000)]
    assert sum(passed) == 3 and passed[:3] == [True] * 3
    assert limit.filter(record("another message"))  # counted apart
    now[0] = 10.5
    first = record("accept() failed: %s", "Too many open files")
    assert limit.filter(first)
    assert first.getMessage().splitlines() == ["(suppressed 997 identical messages in the last 10 s)",
                                               "accept() failed: Too many open files"]
    crowded = RateLimitFilter(max_repeats=1, max_keys=4, clock=lambda: now[0])
    assert all(crowded.filter(record(f"message {i}")) for i in range(100))  # distinct messages, bounded memory
    assert len(crowded._windows) <= 4


def test_hardening_options_are_one_line_errors(cloud: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import ConnectionLimits, check_options, main

    (tmp_path / "token.txt").write_text(TOKEN)
    base = [str(cloud), "--token-file", str(tmp_path / "token.txt")]
    for args, expected in ((["--header-timeout", "0"], "--header-timeout"),
                           (["--keep-alive-timeout", "nan"], "--keep-alive-timeout"),
                           (["--max-connections", "0"], "--max-connections"),
                           (["--max-header-bytes", "10"], "--max-header-bytes"),
                           (["--record-max-mb", "5"], "--record PATH"),
                           (["--record", str(tmp_path / "t.db"), "--record-max-mb", "-1"], "--record-max-mb"),
                           (["--record", str(tmp_path / "t.db"), "--record-keep", "2"], "--record-keep")):
        assert main([*base, *args]) == 2  # refused before anything is loaded, so this runs in-process
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    check_options(limits=ConnectionLimits(header_timeout=0.5, max_connections=10))


def test_connection_budget_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = pytest.importorskip("resource")
    from splitshield.runtime.hardening import DEFAULT_MAX_CONNECTIONS, _connection_budget

    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 2048))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: raised.append(limits))
    assert _connection_budget(None) == 2048 - 256 < DEFAULT_MAX_CONNECTIONS  # the default shrinks to fit
    assert raised == [(2048, 2048)]  # the soft limit is raised to the hard one
    assert _connection_budget(500) == 500 and len(raised) == 1  # 500 + 256 fit the soft limit already
    with pytest.raises(ConfigError, match="--max-connections 5000 needs 5256 open files.*ulimit"):
        _connection_budget(5000)

