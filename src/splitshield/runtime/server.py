"""The cloud side of a deployed split model: an HTTP server that runs only the tail.

Endpoints (JSON unless stated)::

    GET  /healthz     {"status": "ok"}; no auth, for load balancers and readiness probes
    GET  /v1/model    split point, input/feature shapes, classes, the model's fingerprint, accepted codec
                      options, limits
    POST /v1/infer    body: one codec frame [B, *feature_shape] (application/octet-stream)
                      -> {"logits": [[...] * K] * B, "request_id": ...}

Every ``/v1`` request needs ``Authorization: Bearer <token>`` (compared in constant time). Errors are
``{"error": {"code": CODE, "message": ...}}`` with one of the stable codes in :data:`ERROR_CODES`.
Frames are decoded by :func:`~splitshield.runtime.codec.decode` with limits derived from the model's
feature size, so a hostile client can neither crash the server nor make it allocate more than one
maximal batch; nothing is ever unpickled. With ``record=`` every accepted frame is committed to a
:class:`~splitshield.runtime.transcript.TranscriptWriter` before the response is sent.

The server is given the *cloud artifact* of a checkpoint (:func:`~splitshield.runtime.artifacts.export`):
the tail's tensors only, so the cloud never holds the head's weights nor the defense. :func:`serve`
refuses a full checkpoint unless ``allow_head_weights`` (then it warns loudly).

Run it with ``splitshield serve cloud.safetensors --token-file secret.txt`` or
``python -m splitshield.runtime.server cloud.safetensors --token-file secret.txt``.

Hardening (:func:`serve`, details in :mod:`.hardening`)
--------------------------------------------------------
* **TLS**: ``tls_cert``/``tls_key`` (PEM) are handed to uvicorn (``ssl_certfile``/``ssl_keyfile``); without
  them the bearer token and the features travel in clear.
* **Connections that never send a request** cannot starve the others (:class:`ConnectionLimits`): header
  timeout (TLS handshake included), header size limit, keep-alive timeout, and eviction of the longest-idle
  connection beyond ``max_connections``.
* **Bounded logs** (:class:`RateLimitFilter`) and a **bounded transcript** (``record_max_mb`` rotates it,
  :class:`~splitshield.runtime.transcript.TranscriptWriter`).

Speed
-----
``POST /v1/infer`` is answered by a plain ASGI handler in front of the FastAPI app (which serves the other
routes): FastAPI's request and response machinery costs more per request than the transport itself. An
uncompressed frame up to :data:`INLINE_DECODE_BYTES` is decoded on the event loop (a thread hop costs more
than decoding it); larger or compressed frames, and every frame when recording, go to a worker thread.
``workers`` > 1 runs that many server processes on one port (uvicorn's supervisor), each with its own
tail, batcher and connection limits; they append to one transcript (SQLite serialises the writers).

Streaming
---------
``/v1/stream`` is a WebSocket (same bearer token, in the upgrade request's ``Authorization`` header; refused
with 403 without it) for clients that send many frames: each binary message is one codec frame, answered by
one text message ``{"logits": [[...] * K] * B, "seq": n}`` (or ``{"error": {"code", "message"}, "seq": n}``;
the stream goes on), in the order sent, ``n`` counting the stream's frames from 0. A client may send up to
:data:`STREAM_WINDOW` frames before reading an answer; frames of every stream and request join the same
dynamic batches. It spares each frame an HTTP request's parsing and response (``benchmarks/serve.py``
compares the two). Frames count toward ``max_in_flight``, each has ``request_timeout``, messages are capped
at the largest legal frame, and each is recorded as ``/v1/infer`` frames are (request id ``stream:n``).

Dynamic batching
----------------
Concurrent ``/v1/infer`` requests are run through the tail together (:class:`~.batcher.DynamicBatcher`,
as Triton's dynamic batcher): each request is decoded and recorded on its own (one transcript row per
request, as without batching), then queued; a batch takes queued requests until ``max_batch`` feature
rows or until the oldest has waited ``max_delay_ms`` (0: run what is queued at once), runs the tail once,
and each request gets its own rows of logits. One batch runs at a time, on the event loop's thread. A failing
tail call fails only the requests of its batch (``internal_error``). The default delay is 0: the requests
that are ready (e.g. those that arrived while the last batch ran) still run together, and a lone request
does not wait for company that is not coming.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocket
from uvicorn.supervisors import Multiprocess

from .._fs import check_writable
from ..errors import CodecError, ConfigError, SplitShieldError
from .artifacts import check_servable, load_cloud
from .batcher import DynamicBatcher, check_batching
from .client import read_token
from .codec import Encoding, FrameHeader, decode, frame_compression
from .hardening import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectionLimits,
    GuardedConfig,
    RateLimitFilter,
    check_tls,
    log_config,
)
from .transcript import TranscriptWriter

__all__ = ["ERROR_CODES", "ConnectionLimits", "RateLimitFilter", "TailApp", "TailService", "check_options",
           "create_app", "serve"]

#: HTTP status of each error code the server can answer with. Codes are part of the API: never rename.
ERROR_CODES: dict[str, int] = {
    "malformed_frame": 400,  # the body is not a valid codec frame (truncated, bad CRC, NaN, ...)
    "unauthorized": 401,  # missing or wrong bearer token
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,  # body over max_body_bytes
    "unsupported_encoding": 415,  # a valid frame in an encoding/compression this server does not accept
    "wrong_shape": 422,  # a valid frame whose shape is not [B, *feature_shape] with 1 <= B <= max_batch
    "timeout": 503,  # reading the body or running the tail took longer than request_timeout
    "overloaded": 503,  # max_in_flight requests are already being handled; retry later
    "internal_error": 500,  # a bug, or the tail failed on the batch this request was run in
}
_ZSTD_SLACK = 1 / 128  # zstd's worst-case expansion is about 1/256 of the input, plus a small constant


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with :data:`ERROR_CODES` [code]."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _error(code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == "unauthorized" else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=ERROR_CODES[code], headers=headers)


def _zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


class TailService:
    """The tail of a split model behind a hostile-input-safe ``frame -> logits`` call.

    Parameters
    ----------
    checkpoint : str or Path
        A cloud artifact from :func:`~splitshield.runtime.artifacts.export` (the tail's tensors only), or a
        full checkpoint (``NAME.safetensors`` + ``NAME.json``) whose head is read and dropped.
    max_batch : int
        Largest batch (first frame dim) accepted per request; sets the decode limits. The server's dynamic
        batches hold at most this many rows too.
    encodings : sequence of str, optional
        Codec encodings accepted (default: all).
    device : str
        Where the tail runs.
    allow_head_weights : bool
        Accept a full checkpoint (in-process use and tests; its head is dropped after loading). ``False``
        refuses it, as :func:`serve` does by default.

    Attributes
    ----------
    fingerprint : str
        The split model's fingerprint (what it covers: :mod:`splitshield.runtime.artifacts`).
    head_weights : bool
        Loaded from a full checkpoint: this process has read the head's weights.
    """

    def __init__(self, checkpoint: str | Path, max_batch: int = 256, encodings: tuple[str, ...] | None = None,
                 device: str = "cpu", *, allow_head_weights: bool = False):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive int, got {max_batch!r}")
        # Only the tail is kept: a cloud artifact has no head weights, and a checkpoint's head is dropped.
        cloud = load_cloud(checkpoint, device=device, allow_head_weights=allow_head_weights)
        self.tail, self.point, self.input_shape = cloud.tail, cloud.point, cloud.input_shape
        self.feature_shape, self.num_classes, self.model_spec = cloud.feature_shape, cloud.num_classes, cloud.model_spec
        self.fingerprint, self.head_weights = cloud.fingerprint, cloud.head_weights
        self.device, self.max_batch = device, max_batch
        known = get_args(Encoding)
        self.encodings = tuple(encodings or known)
        unknown = set(self.encodings) - set(known)
        if unknown:
            raise ConfigError(f"unknown encodings {sorted(unknown)}; allowed: {', '.join(known)}")
        self.compressions = ("none", "zstd") if _zstd_available() else ("none",)
        self.max_elements = max_batch * math.prod(self.feature_shape)
        # The largest legal frame: float32 payload (+ zstd's worst-case expansion) and a header.
        self.max_body_bytes = 4 * self.max_elements + math.ceil(4 * self.max_elements * _ZSTD_SLACK) + 1024

    def info(self) -> dict[str, Any]:
        """The ``GET /v1/model`` document."""
        return {
            "split": self.point,
            "input_shape": list(self.input_shape),
            "feature_shape": list(self.feature_shape),
            "num_classes": self.num_classes,
            "model_spec": self.model_spec,
            "fingerprint": self.fingerprint,
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "codec": {"version": 1, "encodings": list(self.encodings), "compressions": list(self.compressions)},
        }

    def decode(self, frame: bytes) -> torch.Tensor:
        """Validate a frame and return its features ``[B, *feature_shape]``; raises :class:`ApiError`."""
        try:
            return decode(frame, max_elements=self.max_elements, max_bytes=self.max_body_bytes, accept=self._accept)
        except CodecError as exc:
            raise ApiError("malformed_frame", str(exc)) from None

    def _accept(self, header: FrameHeader) -> None:
        """Refuse a well-formed frame this tail does not serve (its encoding or shape), before decoding it."""
        if header.encoding not in self.encodings or header.compression not in self.compressions:
            raise ApiError("unsupported_encoding",
                           f"frame is {header.encoding}/{header.compression}; this server accepts encodings "
                           f"{list(self.encodings)} and compressions {list(self.compressions)}")
        shape = header.shape
        if len(shape) != len(self.feature_shape) + 1 or shape[1:] != self.feature_shape or shape[0] > self.max_batch:
            raise ApiError("wrong_shape",
                           f"frame shape {list(shape)}; this model needs [B, {', '.join(map(str, self.feature_shape))}]"
                           f" with 1 <= B <= {self.max_batch} (split point {self.point!r})")

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` of the tail on decoded features ``z``."""
        return self.tail(z.to(self.device)).float().cpu()


@dataclass
class _State:
    service: TailService
    token: bytes | None
    recorder: TranscriptWriter | None
    request_timeout: float
    executor: ThreadPoolExecutor
    batcher: DynamicBatcher
    max_in_flight: int
    in_flight: int = 0  # touched only on the event loop thread, so no lock is needed

    def close(self) -> None:
        """Finish the admitting threads' work and close the transcript."""
        self.executor.shutdown(wait=True)
        if self.recorder is not None:
            self.recorder.close()


def _authorized(request: Request, token: bytes | None) -> bool:
    if token is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # The scheme name is case-insensitive (RFC 9110 section 11.1): "bearer" and "BEARER" are "Bearer".
    # Constant-time: the comparison's duration does not reveal how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip(" ").encode("utf-8", "replace"), token)


async def read_frame(request: Request, service: TailService) -> tuple[bytes, str | None]:
    """An ``/v1/infer`` request's body (a codec frame, at most ``service.max_body_bytes``) and its
    ``X-Request-ID`` (at most 128 characters; ``None`` without one)."""
    frame = await _read_body(request, service.max_body_bytes)
    request_id = request.headers.get("x-request-id")
    return frame, None if request_id is None else request_id[:128]


async def run_batch(submit: Callable[[torch.Tensor], Awaitable[torch.Tensor]], z: torch.Tensor) -> torch.Tensor:
    """``await submit(z)`` (a dynamic batcher's), its failure an ``internal_error`` :class:`ApiError`."""
    try:
        return await submit(z)
    except Exception as exc:
        raise ApiError("internal_error", f"the tail failed on the batch this request was run in "
                                         f"({type(exc).__name__})") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError("malformed_frame", f"invalid Content-Length {declared[:40]!r}")
        if int(declared) > limit:
            raise ApiError("payload_too_large", f"body of {declared} bytes is over this model's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds chunked bodies that declare no length
        size += len(chunk)
        if size > limit:
            raise ApiError("payload_too_large", f"body is over this model's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def add_error_handlers(api: FastAPI) -> None:
    """Answer every error of ``api`` as ``{"error": {"code", "message"}}`` with a code of :data:`ERROR_CODES`."""

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.code, exc.message)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "malformed_frame")
        return _error(code, str(exc.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error("malformed_frame", str(exc.errors())[:500])

    @api.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Last line of defense: a bug must cost one request, never the process.
        return _error("internal_error", f"{type(exc).__name__} while handling the request")


def _recorder(record: str | Path | None, max_mb: float | None, keep: int | None) -> TranscriptWriter | None:
    if record is None:
        return None
    max_bytes = None if max_mb is None else max(1, int(max_mb * 2**20))
    return TranscriptWriter(record, max_bytes=max_bytes, keep=keep)


def create_app(service: TailService, token: str | None, record: str | Path | None = None,
               request_timeout: float = 30.0, threads: int = 4, max_in_flight: int = 32,
               record_max_mb: float | None = None, record_keep: int | None = None,
               max_delay_ms: float = 0.0) -> TailApp:
    """Build the ASGI app.

    Parameters
    ----------
    service : TailService
        The tail to serve.
    token : str or None
        Bearer token; ``None`` disables authentication (only for trusted networks).
    record : str or Path, optional
        SQLite transcript to append every accepted frame to (see :mod:`.transcript`).
    request_timeout : float
        Seconds allowed for reading the body, decoding, recording and waiting for a batch; a request whose
        batch is running when its deadline passes is answered when the batch ends (:mod:`.batcher`).
    threads : int
        Threads decoding large frames and recording, off the event loop (the tail runs on the loop's thread,
        :mod:`.batcher`).
    max_in_flight : int
        Requests handled at once; more get ``overloaded``. Bounds memory at about
        ``max_in_flight * service.max_body_bytes`` (times 2-3 for the decoded copy).
    record_max_mb, record_keep : float, int, optional
        Rotate the transcript past this many MiB, keeping that many rotated files
        (:class:`~splitshield.runtime.transcript.TranscriptWriter`).
    max_delay_ms : float
        Dynamic batching: how long a queued request may wait for others to fill a batch of
        ``service.max_batch`` rows (module docstring); 0 runs what is queued at once.
    """
    if token is not None and not token:
        raise ConfigError("token is empty: pass a secret, or token=None to disable authentication explicitly")
    if request_timeout <= 0 or threads < 1 or max_in_flight < 1:
        raise ConfigError("request_timeout must be > 0, threads >= 1 and max_in_flight >= 1")
    check_batching(service.max_batch, max_delay_ms)
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="splitshield-admit")
    # forward is looked up per batch (lambda), so a replaced service.forward is used.
    batcher = DynamicBatcher(lambda z: service.forward(z), service.max_batch, max_delay_ms)
    state = _State(service, token.encode() if token is not None else None,
                   _recorder(record, record_max_mb, record_keep), request_timeout, executor, batcher, max_in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    api = FastAPI(title="splitshield tail server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_error_handlers(api)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(request: Request) -> dict[str, Any]:
        if not _authorized(request, state.token):
            raise ApiError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
        return service.info()

    return TailApp(api, state)


_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11

#: Frames one ``/v1/stream`` connection may have sent and not yet been answered (at most ``max_in_flight``);
#: the server stops reading the stream beyond it (backpressure), so a stream holds at most this many frames.
STREAM_WINDOW = 64

#: Uncompressed frames up to this size are decoded on the event loop (module docstring, "Speed").
INLINE_DECODE_BYTES = 256 * 1024


class TailApp:
    """The server's ASGI app: ``/v1/infer`` and ``/v1/stream`` are answered here, every other request by the
    FastAPI app ``api``.

    ``POST /v1/infer`` takes a codec frame ``[B, *feature_shape]`` and answers ``{"logits": [[...] * K] * B,
    "request_id": ...}``; errors are the JSON of :func:`_error`, as FastAPI's. ``/v1/stream`` is a WebSocket
    carrying many frames (module docstring, "Streaming").
    """

    def __init__(self, api: FastAPI, state: _State):
        self.api, self.state = api, state

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/v1/stream":
            await self._stream(WebSocket(scope, receive, send))
            return
        if scope["type"] != "http" or scope["path"] != "/v1/infer":
            await self.api(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise ApiError("method_not_allowed", "Method Not Allowed: /v1/infer takes POST")
            request = Request(scope, receive)
            if not _authorized(request, self.state.token):
                raise ApiError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
            body = await self._admitted(lambda: self._infer(request))
        except ApiError as exc:
            await _error(exc.code, exc.message)(scope, receive, send)
        except Exception as exc:  # a bug must cost one request, never the process
            await _error("internal_error", f"{type(exc).__name__} while handling the request")(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    async def _admitted(self, work: Callable[[], Awaitable[bytes]]) -> bytes:
        """Run ``work()`` as one of at most ``max_in_flight`` requests (or stream frames), within the deadline."""
        state = self.state
        if state.in_flight >= state.max_in_flight:
            raise ApiError("overloaded", f"{state.max_in_flight} requests are in flight; retry later")
        state.in_flight += 1
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(work(), state.request_timeout)
            async with _timeout(state.request_timeout):  # no task per request, unlike wait_for
                return await work()
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"request took longer than {state.request_timeout} s") from None
        finally:
            state.in_flight -= 1

    async def _infer(self, request: Request) -> bytes:
        frame, request_id = await read_frame(request, self.state.service)
        logits = await self._logits(frame, request_id)
        # allow_nan=False: non-finite logits are an internal error, never invalid JSON.
        return json.dumps({"logits": logits.tolist(), "request_id": request_id}, allow_nan=False).encode()

    async def _logits(self, frame: bytes, request_id: str | None) -> torch.Tensor:
        """Decode (and record) one frame and run it through the tail in a dynamic batch: logits ``[B, K]``."""
        state = self.state
        # A zstd frame may expand far beyond its size; a malformed prefix fails in decode, at once.
        if state.recorder is None and len(frame) <= INLINE_DECODE_BYTES and frame_compression(frame) != "zstd":
            z = state.service.decode(frame)
        else:
            z = await asyncio.get_running_loop().run_in_executor(state.executor, self._admit, frame, request_id)
        return await run_batch(state.batcher.submit, z)

    def _admit(self, frame: bytes, request_id: str | None) -> torch.Tensor:
        z = self.state.service.decode(frame)
        if self.state.recorder is not None:  # committed before we answer
            self.state.recorder.append(frame, batch=z.shape[0], request_id=request_id)
        return z

    async def _stream(self, ws: WebSocket) -> None:
        """``/v1/stream``: binary messages in (codec frames), one text message out per frame, in order."""
        if not _authorized(ws, self.state.token):
            await ws.close(code=1008, reason="missing or wrong bearer token")  # before accept: HTTP 403
            return
        await ws.accept()
        window = asyncio.Semaphore(min(STREAM_WINDOW, self.state.max_in_flight))
        answers: asyncio.Queue[asyncio.Task[str] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send_in_order(ws, answers, window))
        seq = 0
        try:
            while not sender.done():
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await window.acquire()  # at most that many frames of this stream are unanswered
                answers.put_nowait(asyncio.create_task(self._stream_answer(message, seq)))
                seq += 1
        finally:
            answers.put_nowait(None)
            await asyncio.gather(sender, return_exceptions=True)

    async def _stream_answer(self, message: dict[str, Any], seq: int) -> str:
        frame = message.get("bytes")
        try:
            if frame is None:
                raise ApiError("malformed_frame", "send each codec frame as a binary WebSocket message")
            logits = await self._admitted(lambda: self._logits(frame, f"stream:{seq}"))
            return json.dumps({"logits": logits.tolist(), "seq": seq}, allow_nan=False)
        except ApiError as exc:
            return json.dumps({"error": {"code": exc.code, "message": exc.message}, "seq": seq})
        except Exception as exc:  # a bug must cost one frame, never the process
            return json.dumps({"error": {"code": "internal_error", "message": f"{type(exc).__name__} while "
                                         "handling the frame"}, "seq": seq})

    @staticmethod
    async def _send_in_order(ws: WebSocket, answers: asyncio.Queue[asyncio.Task[str] | None],
                             window: asyncio.Semaphore) -> None:
        while (task := await answers.get()) is not None:
            try:
                await ws.send_text(await task)
            except Exception:  # the client went away: drop the rest of its answers, unblock the reader
                while not answers.empty():
                    if (task := answers.get_nowait()) is not None:
                        task.cancel()
                for _ in range(STREAM_WINDOW):
                    window.release()
                return
            window.release()


def check_options(tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  limits: ConnectionLimits | None = None, record: str | Path | None = None,
                  record_max_mb: float | None = None, record_keep: int | None = None, max_batch: int = 256,
                  max_delay_ms: float = 0.0, workers: int = 1) -> None:
    """Check :func:`serve`'s hardening, batching and recording options before anything is loaded; one-line
    :class:`ConfigError`. A ``record`` path is checked to be writable (creating its folder)."""
    check_tls(tls_cert, tls_key)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError(f"--workers: a number of server processes in 1..64, got {workers!r}")
    if record is not None:
        check_writable(Path(record), "--record")
    if workers > 1 and record_max_mb is not None:
        raise ConfigError("--record-max-mb rotates one process's transcript: with --workers > 1 the processes "
                          "share the file; drop --record-max-mb or serve with --workers 1")
    check_batching(max_batch, max_delay_ms)
    (limits or ConnectionLimits()).check()
    if record_max_mb is not None:
        if record is None:
            raise ConfigError("--record-max-mb bounds the transcript: give --record PATH too")
        if not (math.isfinite(record_max_mb) and record_max_mb > 0):
            raise ConfigError(f"--record-max-mb: a size in MiB > 0, got {record_max_mb}")
    if record_keep is not None and (record_max_mb is None or record_keep < 0):
        raise ConfigError(f"--record-keep: a count >= 0 of rotated transcripts, with --record-max-mb; "
                          f"got {record_keep}")


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (as uvicorn binds it), or a one-line :class:`ConfigError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port: a TCP port 0..65535 (0: any free port), got {port!r}")
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto is TCP; without it each
    # response on a kept-alive connection waits ~40 ms (Nagle against the client's delayed ACK).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:  # in use, a privileged port, an unknown host
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                          "choose another port or host") from None
    return sock


def _address(sock: socket.socket) -> str:
    """``host:port`` of a listening socket, ``[host]:port`` for IPv6; the port the system chose for port 0."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def uvicorn_config(app: Any, *, host: str, port: int, limits: ConnectionLimits, tls_cert: str | Path | None = None,
                   tls_key: str | Path | None = None, workers: int = 1, log_level: str = "warning",
                   max_message_bytes: int = 2**24) -> GuardedConfig:
    """The uvicorn configuration :func:`serve` runs ``app`` with: the guarded httptools protocol with ``limits``,
    rate-limited logs, TLS, WebSocket messages of at most ``max_message_bytes`` (``benchmarks/serve.py`` serves
    its echo app with it, so both share one stack)."""
    return GuardedConfig(
        app, limits=limits, host=host, port=port, log_level=log_level, log_config=log_config(limits),
        loop="asyncio", workers=workers, ws="websockets-sansio", ws_max_size=max_message_bytes,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works (call_later)
        ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
    )


class _WorkerApp:
    """The app of one ``serve(workers=N)`` process: pickled to each worker without its state, and built there
    (its own tail, batcher, threads and transcript connection) on the first ASGI call, the lifespan startup."""

    def __init__(self, checkpoint: str | Path, service_options: dict[str, Any], app_options: dict[str, Any]):
        self.checkpoint, self.service_options, self.app_options = checkpoint, service_options, app_options
        self._app: TailApp | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_app": None}

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if self._app is None:
            try:
                self._app = create_app(TailService(self.checkpoint, **self.service_options), **self.app_options)
            except Exception as exc:  # e.g. the artifact changed on disk since serve() checked it
                if scope["type"] == "lifespan":  # uvicorn then stops this worker instead of serving errors
                    await receive()
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                raise
        await self._app(scope, receive, send)


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8080, token: str | None,
          record: str | Path | None = None, max_batch: int = 256, request_timeout: float = 30.0,
          threads: int = 4, workers: int = 1, max_in_flight: int = 32, device: str = "cpu",
          log_level: str = "warning", allow_head_weights: bool = False, tls_cert: str | Path | None = None,
          tls_key: str | Path | None = None, limits: ConnectionLimits | None = None,
          record_max_mb: float | None = None, record_keep: int | None = None, max_delay_ms: float = 0.0) -> None:
    """Load a cloud artifact and serve its tail with uvicorn until interrupted (see :func:`create_app`).

    A full checkpoint (head weights included) is refused with a :class:`~splitshield.errors.CheckpointError`
    unless ``allow_head_weights``; then a warning is printed to stderr. ``tls_cert``/``tls_key`` serve HTTPS
    (uvicorn's TLS); ``limits`` bound what a client may hold (:class:`ConnectionLimits`, per process).
    ``workers`` > 1 runs that many processes on the one port under uvicorn's supervisor (module docstring).
    """
    limits = limits or ConnectionLimits()
    check_options(tls_cert, tls_key, limits, record, record_max_mb, record_keep, max_batch, max_delay_ms, workers)
    if check_servable(checkpoint, allow_head_weights) == "checkpoint":
        print(f"WARNING: --allow-head-weights: serving the full checkpoint {checkpoint}; this cloud process reads "
              "the head's weights, i.e. white-box access to invert every feature it receives. Deploy the cloud "
              "artifact of `splitshield export` instead.", file=sys.stderr, flush=True)
    service_options = {"max_batch": max_batch, "device": device, "allow_head_weights": allow_head_weights}
    # Loaded here in every case: a bad artifact fails in one line before the port is bound.
    service = TailService(checkpoint, **service_options)
    app_options = {"token": token, "record": record, "request_timeout": request_timeout, "threads": threads,
                   "max_in_flight": max_in_flight, "record_max_mb": record_max_mb, "record_keep": record_keep,
                   "max_delay_ms": max_delay_ms}
    app: Any = create_app(service, **app_options)  # one-line errors here, before any worker starts
    if workers > 1:
        app.state.close()
        app = _WorkerApp(checkpoint, service_options, app_options)
    config = uvicorn_config(app, host=host, port=port, limits=limits, tls_cert=tls_cert, tls_key=tls_key,
                            workers=workers, log_level=log_level, max_message_bytes=service.max_body_bytes)
    sock = listen(host, port, config.backlog)
    # Printed once the port is bound and listening: whoever reads the address can connect at once.
    print(f"serving the tail of {checkpoint} on {'https' if tls_cert else 'http'}://{_address(sock)}"
          + (f" with {workers} worker processes" if workers > 1 else "")
          + (f"; recording every received frame to {record}" if record else ""), flush=True)
    if workers > 1:
        del service, app  # each worker loads its own
        Multiprocess(config, sockets=[sock]).run()
        return
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)  # uvicorn has logged why (as uvicorn.run exits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitshield.runtime.server", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="cloud artifact (splitshield export ... --cloud)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file")
    parser.add_argument("--no-auth", action="store_true", help="serve without authentication (trusted networks only)")
    parser.add_argument("--record", help="SQLite transcript recording every received frame")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="feature rows per request, and per dynamic batch of requests, at most")
    parser.add_argument("--max-delay-ms", type=float, default=0.0,
                        help="ms a queued request may wait for others to fill a batch (0: no waiting)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads per process decoding large frames and recording")
    parser.add_argument("--workers", type=int, default=1, help="server processes on the one port")
    parser.add_argument("--max-in-flight", type=int, default=32, help="concurrent requests before 'overloaded'")
    parser.add_argument("--allow-head-weights", action="store_true",
                        help="serve a full checkpoint (the cloud then holds the head's weights)")
    _add_hardening_args(parser)
    args = parser.parse_args(argv)
    try:
        token = resolve_token(args.token_file, args.no_auth)
        limits = ConnectionLimits(header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                                  max_connections=args.max_connections, max_header_bytes=args.max_header_bytes)
        serve(args.checkpoint, host=args.host, port=args.port, token=token, record=args.record,
              max_batch=args.max_batch, request_timeout=args.timeout, threads=args.threads, workers=args.workers,
              max_in_flight=args.max_in_flight, allow_head_weights=args.allow_head_weights,
              tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits, record_max_mb=args.record_max_mb,
              record_keep=args.record_keep, max_delay_ms=args.max_delay_ms)
    except SplitShieldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_hardening_args(parser: argparse.ArgumentParser) -> None:
    """The TLS, connection-limit and transcript-size options of the module entry point (as `splitshield serve`)."""
    default = ConnectionLimits()
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--header-timeout", type=float, default=default.header_timeout,
                        help="seconds a request's headers may take before the connection is closed")
    parser.add_argument("--keep-alive-timeout", type=float, default=default.keep_alive_timeout,
                        help="seconds an idle keep-alive connection is kept")
    parser.add_argument("--max-connections", type=int, default=None,
                        help=f"open connections at most (default {DEFAULT_MAX_CONNECTIONS}, or what the open-file "
                             "limit holds); beyond it the longest-waiting idle connection is closed")
    parser.add_argument("--max-header-bytes", type=int, default=default.max_header_bytes,
                        help="largest request head accepted")
    parser.add_argument("--record-max-mb", type=float, help="rotate the transcript past this size (MiB)")
    parser.add_argument("--record-keep", type=int, help="rotated transcripts kept (default: all)")


def resolve_token(token_file: str | Path | None, no_auth: bool) -> str | None:
    """The server's token from ``--token-file``, or ``None`` with a warning when ``--no-auth`` is given."""
    if no_auth:
        if token_file is not None:
            raise ConfigError("give either --token-file or --no-auth, not both")
        print("warning: --no-auth: anyone who can reach this port can use the model", file=sys.stderr)
        return None
    if token_file is None:
        raise ConfigError("--token-file is required (or pass --no-auth explicitly to serve without authentication)")
    return read_token(token_file)


if __name__ == "__main__":
    sys.exit(main())
