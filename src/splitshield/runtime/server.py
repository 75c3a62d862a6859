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

Hardening (:func:`serve`)
-------------------------
* **TLS**: ``tls_cert``/``tls_key`` (PEM) are handed to uvicorn (``ssl_certfile``/``ssl_keyfile``); without
  them the bearer token and the features travel in clear.
* **Connections that never send a request** cannot starve the others (:class:`ConnectionLimits`): a
  request's headers must be complete within ``header_timeout`` seconds of the connection opening (or of
  its first byte after the previous response), idle keep-alive connections close after
  ``keep_alive_timeout``, headers are capped at ``max_header_bytes`` (h11's incomplete-event limit), and
  at most ``max_connections`` connections are open: beyond it the one that has waited longest without
  a request in progress is closed (if it has waited at least ``min(1 s, header_timeout / 2)``, else the
  new one is, so a client always has that long to send its headers). The file-descriptor limit is raised
  to fit. uvicorn has no header timeout nor such an eviction, so :class:`GuardedH11Protocol` adds them to
  its h11 protocol; uvicorn's ``limit_concurrency`` is not used: it answers 503 to *every* request once
  that many connections are open, half-open ones included, which is the denial of service it should
  prevent.
* **Bounded logs**: every log handler gets a :class:`RateLimitFilter` (at most ``log_repeats`` identical
  messages per ``log_interval`` seconds), so one error repeated (``Too many open files``, invalid
  requests) cannot grow the log without bound.
* **Bounded transcript**: ``record_max_mb`` rotates the transcript into numbered files
  (:class:`~splitshield.runtime.transcript.TranscriptWriter`).

Dynamic batching
----------------
Concurrent ``/v1/infer`` requests are run through the tail together (:class:`~.batcher.DynamicBatcher`,
as Triton's dynamic batcher): each request is decoded and recorded on its own (one transcript row per
request, as without batching), then queued; a batch takes queued requests until ``max_batch`` feature
rows or until the oldest has waited ``max_delay_ms`` (0: run what is queued at once), runs the tail once,
and each request gets its own rows of logits. Up to ``workers`` batches run at once. A failing tail call
fails only the requests of its batch (``internal_error``). The default delay is 0: requests queue up
anyway while every batch slot is busy, and on the benchmark (``benchmarks/serve.py``) a 2 ms delay halved
one client's throughput without raising 16 clients'.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hmac
import logging
import math
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CodecError, ConfigError, SplitShieldError
from .artifacts import check_servable, load_cloud
from .batcher import DynamicBatcher, check_batching
from .client import read_token
from .codec import Encoding, decode, read_header
from .transcript import TranscriptWriter

__all__ = ["ERROR_CODES", "ConnectionLimits", "RateLimitFilter", "TailService", "check_options", "create_app",
           "serve"]

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
            header = read_header(frame)
        except CodecError as exc:
            raise ApiError("malformed_frame", str(exc)) from None
        if header.encoding not in self.encodings or header.compression not in self.compressions:
            raise ApiError("unsupported_encoding",
                           f"frame is {header.encoding}/{header.compression}; this server accepts encodings "
                           f"{list(self.encodings)} and compressions {list(self.compressions)}")
        shape = header.shape
        if len(shape) != len(self.feature_shape) + 1 or shape[1:] != self.feature_shape or shape[0] > self.max_batch:
            raise ApiError("wrong_shape",
                           f"frame shape {list(shape)}; this model needs [B, {', '.join(map(str, self.feature_shape))}]"
                           f" with 1 <= B <= {self.max_batch} (split point {self.point!r})")
        try:
            return decode(frame, max_elements=self.max_elements, max_bytes=self.max_body_bytes)
        except CodecError as exc:
            raise ApiError("malformed_frame", str(exc)) from None

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


def _authorized(request: Request, token: bytes | None) -> bool:
    if token is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # The scheme name is case-insensitive (RFC 9110 section 11.1): "bearer" and "BEARER" are "Bearer".
    # Constant-time: the comparison's duration does not reveal how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip(" ").encode("utf-8", "replace"), token)


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


def _recorder(record: str | Path | None, max_mb: float | None, keep: int | None) -> TranscriptWriter | None:
    if record is None:
        return None
    max_bytes = None if max_mb is None else max(1, int(max_mb * 2**20))
    return TranscriptWriter(record, max_bytes=max_bytes, keep=keep)


def create_app(service: TailService, token: str | None, record: str | Path | None = None,
               request_timeout: float = 30.0, workers: int = 4, max_in_flight: int = 32,
               record_max_mb: float | None = None, record_keep: int | None = None,
               max_delay_ms: float = 0.0) -> FastAPI:
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
        Seconds allowed for reading the body plus decoding, recording and the tail forward.
    workers : int
        Threads running decode + record and the tail's batches, off the event loop; also the number of
        batches that may run at once.
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
    if request_timeout <= 0 or workers < 1 or max_in_flight < 1:
        raise ConfigError("request_timeout must be > 0, workers >= 1 and max_in_flight >= 1")
    check_batching(service.max_batch, max_delay_ms)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitshield-tail")
    # forward is looked up per batch (lambda), so a replaced service.forward is used.
    batcher = DynamicBatcher(lambda z: service.forward(z), service.max_batch, max_delay_ms, executor, instances=workers)
    state = _State(service, token.encode() if token is not None else None,
                   _recorder(record, record_max_mb, record_keep), request_timeout, executor, batcher, max_in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.executor.shutdown(wait=True)
        if state.recorder is not None:
            state.recorder.close()

    app = FastAPI(title="splitshield tail server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.splitshield = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "malformed_frame")
        return _error(code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error("malformed_frame", str(exc.errors())[:500])

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Last line of defense: a bug must cost one request, never the process.
        return _error("internal_error", f"{type(exc).__name__} while handling the request")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model(request: Request) -> dict[str, Any]:
        if not _authorized(request, state.token):
            raise ApiError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
        return service.info()

    def admit(frame: bytes, request_id: str | None) -> torch.Tensor:
        z = service.decode(frame)
        if state.recorder is not None:
            state.recorder.append(frame, batch=z.shape[0], request_id=request_id)  # committed before we answer
        return z

    async def infer_within_deadline(request: Request) -> dict[str, Any]:
        frame = await _read_body(request, service.max_body_bytes)
        request_id = request.headers.get("x-request-id")
        if request_id is not None:
            request_id = request_id[:128]
        loop = asyncio.get_running_loop()
        z = await loop.run_in_executor(state.executor, admit, frame, request_id)
        try:
            logits = await state.batcher.submit(z)
        except Exception as exc:
            raise ApiError("internal_error", f"the tail failed on the batch this request was run in "
                                             f"({type(exc).__name__})") from None
        return {"logits": logits.tolist(), "request_id": request_id}

    @app.post("/v1/infer")
    async def infer(request: Request) -> dict[str, Any]:
        if not _authorized(request, state.token):
            raise ApiError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
        if state.in_flight >= state.max_in_flight:
            raise ApiError("overloaded", f"{state.max_in_flight} requests are in flight; retry later")
        state.in_flight += 1
        try:
            return await asyncio.wait_for(infer_within_deadline(request), state.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"request took longer than {state.request_timeout} s") from None
        finally:
            state.in_flight -= 1

    return app


# ---- hardening: TLS, connection limits, bounded logs -------------------------------------------------------

DEFAULT_MAX_CONNECTIONS = 4096
_FD_RESERVE = 256  # descriptors kept for the listening socket, the model's files, the transcript, threads, ...


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client, authenticated or not, may hold on the server (the module's "Hardening" section).

    Attributes
    ----------
    header_timeout : float
        Seconds a request's headers may take, counted from the connection's opening or from its first
        byte after the previous response (a client trickling bytes gains nothing); then it is closed.
    keep_alive_timeout : float
        Seconds an idle keep-alive connection is kept open between requests.
    max_connections : int or None
        Connections open at once; one more closes the connection that has waited longest without a
        request in progress (a request being handled is never cut), or the new one if every waiting
        connection has waited less than ``min(1 s, header_timeout / 2)``. ``None``: 4096, or what the
        process's file-descriptor hard limit can hold.
    max_header_bytes : int
        Largest request head (request line + headers); a larger one gets 400.
    log_repeats, log_interval
        At most ``log_repeats`` identical log messages per ``log_interval`` seconds (:class:`RateLimitFilter`).
    """

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int | None = None
    max_header_bytes: int = 16384
    log_repeats: int = 10
    log_interval: float = 60.0

    def check(self) -> None:
        """Raise a one-line :class:`ConfigError` naming the option at fault."""
        for option, value in (("--header-timeout", self.header_timeout),
                              ("--keep-alive-timeout", self.keep_alive_timeout), ("log_interval", self.log_interval)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{option}: a number of seconds > 0, got {value!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int) or self.max_connections < 1):
            raise ConfigError(f"--max-connections: a positive number of connections, got {self.max_connections!r}")
        if not isinstance(self.max_header_bytes, int) or self.max_header_bytes < 1024:
            raise ConfigError(f"--max-header-bytes: at least 1024 bytes (h11's default is 16384), "
                              f"got {self.max_header_bytes!r}")
        if not isinstance(self.log_repeats, int) or self.log_repeats < 1:
            raise ConfigError(f"log_repeats: a positive count, got {self.log_repeats!r}")


class RateLimitFilter(logging.Filter):
    """Let through at most ``max_repeats`` records of one message per ``interval`` seconds.

    A message is the record's logger, level and unformatted text (``record.msg``), so lines that differ
    only in their arguments (a client's address) count as one. The first record of a message after an
    interval in which some of its records were dropped is prefixed with one line
    ``(suppressed K identical messages in the last T s)``; drops at the very end of a flood are not
    announced. Thread-safe; at most ``max_keys`` messages are tracked (older windows are forgotten).
    """

    def __init__(self, max_repeats: int = 10, interval: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.max_repeats, self.interval, self.max_keys, self.clock = max_repeats, interval, max_keys, clock
        self._windows: dict[tuple[str, int, str], list[float]] = {}  # message -> [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval:
                if window is None and len(self._windows) >= self.max_keys:
                    self._forget(now)
                if window is not None and window[2]:
                    record.msg = (f"(suppressed {int(window[2])} identical messages in the last "
                                  f"{now - window[0]:.0f} s)\n{record.msg}")
                window = self._windows[key] = [now, 0, 0]
            if window[1] >= self.max_repeats:
                window[2] += 1
                return False
            window[1] += 1
            return True

    def _forget(self, now: float) -> None:
        """Drop finished windows; all of them if every one is still running."""
        for key in [k for k, w in self._windows.items() if now - w[0] >= self.interval]:
            del self._windows[key]
        if len(self._windows) >= self.max_keys:
            self._windows.clear()


def _log_config(limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn's logging configuration with a :class:`RateLimitFilter` on every handler; the root logger (where
    asyncio reports e.g. ``accept()`` failing for lack of file descriptors) writes through the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"rate_limit": {"()": RateLimitFilter, "max_repeats": limits.log_repeats,
                                        "interval": limits.log_interval}}
    for handler in config["handlers"].values():
        handler["filters"] = ["rate_limit"]
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config


def _connection_budget(requested: int | None) -> int:
    """The connection limit to enforce; raises the file-descriptor soft limit to hold it (and a reserve)."""
    try:
        import resource
    except ImportError:  # no RLIMIT_NOFILE to manage (Windows)
        return requested or DEFAULT_MAX_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    wanted = requested or DEFAULT_MAX_CONNECTIONS
    if hard != unlimited and hard < wanted + _FD_RESERVE:
        if requested is not None:
            raise ConfigError(f"--max-connections {requested} needs {requested + _FD_RESERVE} open files, but this "
                              f"process may open at most {hard} (ulimit -Hn): lower --max-connections or raise it")
        wanted = max(1, hard - _FD_RESERVE)
    need = wanted + _FD_RESERVE
    if soft != unlimited and soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        except (ValueError, OSError):
            if requested is not None:
                raise ConfigError(f"--max-connections {requested}: cannot raise the open-file limit to {need} "
                                  f"(it is {soft}): lower --max-connections or raise ulimit -n") from None
            wanted = max(1, soft - _FD_RESERVE)
    return wanted


class _Guard:
    """Per-server state of :class:`GuardedH11Protocol`: the limits and the connections waiting for a request."""

    def __init__(self, limits: ConnectionLimits, max_connections: int):
        self.limits, self.max_connections = limits, max_connections
        # Connection -> when it began waiting; longest waiting first (dicts keep insertion order).
        self.waiting: dict[GuardedH11Protocol, float] = {}
        # A connection waiting less than this is not evicted: a client has time to send its headers even
        # while a flood of new connections evicts the others.
        self.grace = min(1.0, limits.header_timeout / 2)

    def __getstate__(self) -> dict[str, Any]:  # a worker process starts with no connections
        return {"limits": self.limits, "max_connections": self.max_connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limits"], state["max_connections"])


try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # the "serve" extra is missing; serve() says so
    H11Protocol = asyncio.Protocol  # type: ignore[assignment, misc]


class GuardedH11Protocol(H11Protocol):  # type: ignore[misc, valid-type]
    """uvicorn's h11 protocol plus a header timeout and a connection limit that evicts idle connections.

    Reads its :class:`_Guard` from ``config.splitshield_guard`` (set by :func:`serve`; the default limits
    without it). A connection is *waiting* from its opening, and again after each response, until a
    request's headers are complete; only waiting connections are timed out (``header_timeout``) or evicted
    (``max_connections``).
    """

    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "splitshield_guard", None) is None:  # used without serve(): the default limits
            config.splitshield_guard = _Guard(ConnectionLimits(), _connection_budget(None))
        self.guard: _Guard = config.splitshield_guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        self._arm_header_timer()
        if len(self.connections) > self.guard.max_connections:
            self._evict()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # headers complete (or rejected): no longer waiting
            self._cancel_header_timer()
            self.guard.waiting.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self.guard.waiting.pop(self, None)
        super().connection_lost(exc)

    def _wait(self) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = self.loop.time()  # to the end: the most recent waiter

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.guard.limits.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.warning("closed a connection that sent no complete request headers within %s s "
                                "(--header-timeout)", self.guard.limits.header_timeout)
            self._close()

    def _evict(self) -> None:
        """Close the connection waiting longest, if it has waited past the grace period; else this new one."""
        oldest = next(iter(self.guard.waiting.items()), None)
        victim = self
        if oldest is not None and oldest[0] is not self and self.loop.time() - oldest[1] >= self.guard.grace:
            victim = oldest[0]
        self.logger.warning("%d connections open (--max-connections): closed the one waiting longest for a request",
                            self.guard.max_connections)
        victim._close()

    def _close(self) -> None:
        self._cancel_header_timer()
        self.guard.waiting.pop(self, None)
        self.connections.discard(self)  # no longer counted, though connection_lost comes a loop turn later
        self.transport.close()


def check_tls(cert: str | Path | None, key: str | Path | None) -> None:
    """Refuse a TLS setting uvicorn could not load, in one line (``--tls-cert`` / ``--tls-key``)."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both (the PEM certificate chain and its "
                          "private key) or neither")
    if cert is None or key is None:
        return
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist: give a PEM file")
    try:  # the password callback makes an encrypted key fail here instead of prompting on the terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate with its matching, unencrypted "
                          f"private key ({exc})") from None


def check_options(tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  limits: ConnectionLimits | None = None, record: str | Path | None = None,
                  record_max_mb: float | None = None, record_keep: int | None = None, max_batch: int = 256,
                  max_delay_ms: float = 0.0) -> None:
    """Check :func:`serve`'s hardening and batching options before anything is loaded; one-line
    :class:`ConfigError`."""
    check_tls(tls_cert, tls_key)
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


def _listen(host: str, port: int, backlog: int) -> socket.socket:
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


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8080, token: str | None,
          record: str | Path | None = None, max_batch: int = 256, request_timeout: float = 30.0,
          workers: int = 4, max_in_flight: int = 32, device: str = "cpu", log_level: str = "warning",
          allow_head_weights: bool = False, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          limits: ConnectionLimits | None = None, record_max_mb: float | None = None,
          record_keep: int | None = None, max_delay_ms: float = 0.0) -> None:
    """Load a cloud artifact and serve its tail with uvicorn until interrupted (see :func:`create_app`).

    A full checkpoint (head weights included) is refused with a :class:`~splitshield.errors.CheckpointError`
    unless ``allow_head_weights``; then a warning is printed to stderr. ``tls_cert``/``tls_key`` serve HTTPS
    (uvicorn's TLS); ``limits`` bound what a client may hold (:class:`ConnectionLimits`).
    """
    import uvicorn

    limits = limits or ConnectionLimits()
    check_options(tls_cert, tls_key, limits, record, record_max_mb, record_keep, max_batch, max_delay_ms)
    if check_servable(checkpoint, allow_head_weights) == "checkpoint":
        print(f"WARNING: --allow-head-weights: serving the full checkpoint {checkpoint}; this cloud process reads "
              "the head's weights, i.e. white-box access to invert every feature it receives. Deploy the cloud "
              "artifact of `splitshield export` instead.", file=sys.stderr, flush=True)
    max_connections = _connection_budget(limits.max_connections)
    service = TailService(checkpoint, max_batch=max_batch, device=device, allow_head_weights=allow_head_weights)
    app = create_app(service, token, record=record, request_timeout=request_timeout, workers=workers,
                     max_in_flight=max_in_flight, record_max_mb=record_max_mb, record_keep=record_keep,
                     max_delay_ms=max_delay_ms)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=_log_config(limits), http=GuardedH11Protocol,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works (call_later)
        h11_max_incomplete_event_size=limits.max_header_bytes,
        ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
    )
    config.splitshield_guard = _Guard(limits, max_connections)  # type: ignore[attr-defined]
    server = uvicorn.Server(config)
    sock = _listen(host, port, config.backlog)
    # Printed once the port is bound and listening: whoever reads the address can connect at once.
    print(f"serving the tail of {checkpoint} on {'https' if tls_cert else 'http'}://{_address(sock)}"
          + (f"; recording every received frame to {record}" if record else ""), flush=True)
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
    parser.add_argument("--workers", type=int, default=4, help="threads running the tail")
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
              max_batch=args.max_batch, request_timeout=args.timeout, workers=args.workers,
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
