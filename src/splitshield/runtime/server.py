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
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import math
import sys
from collections.abc import AsyncIterator
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
from .client import read_token
from .codec import Encoding, decode, read_header
from .transcript import TranscriptWriter

__all__ = ["ERROR_CODES", "TailService", "create_app", "serve"]

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
    "internal_error": 500,
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
        Largest batch (first frame dim) accepted per request; sets the decode limits.
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
                 device: str = "cpu", *, allow_head_weights: bool = True):
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
    max_in_flight: int
    in_flight: int = 0  # touched only on the event loop thread, so no lock is needed


def _authorized(request: Request, token: bytes | None) -> bool:
    if token is None:
        return True
    given = request.headers.get("authorization", "").encode("utf-8", "replace")
    # Constant-time: the comparison's duration does not reveal how much of the token matched.
    return hmac.compare_digest(given, b"Bearer " + token)


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


def create_app(service: TailService, token: str | None, record: str | Path | None = None,
               request_timeout: float = 30.0, workers: int = 4, max_in_flight: int = 32) -> FastAPI:
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
        Threads running decode + record + forward, off the event loop.
    max_in_flight : int
        Requests handled at once; more get ``overloaded``. Bounds memory at about
        ``max_in_flight * service.max_body_bytes`` (times 2-3 for the decoded copy).
    """
    if token is not None and not token:
        raise ConfigError("token is empty: pass a secret, or token=None to disable authentication explicitly")
    if request_timeout <= 0 or workers < 1 or max_in_flight < 1:
        raise ConfigError("request_timeout must be > 0, workers >= 1 and max_in_flight >= 1")
    state = _State(service, token.encode() if token is not None else None,
                   TranscriptWriter(record) if record is not None else None, request_timeout,
                   ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitshield-tail"), max_in_flight)

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

    def handle(frame: bytes, request_id: str | None) -> list[list[float]]:
        z = service.decode(frame)
        if state.recorder is not None:
            state.recorder.append(frame, batch=z.shape[0], request_id=request_id)  # committed before we answer
        return service.forward(z).tolist()

    async def infer_within_deadline(request: Request) -> dict[str, Any]:
        frame = await _read_body(request, service.max_body_bytes)
        request_id = request.headers.get("x-request-id")
        if request_id is not None:
            request_id = request_id[:128]
        loop = asyncio.get_running_loop()
        logits = await loop.run_in_executor(state.executor, handle, frame, request_id)
        return {"logits": logits, "request_id": request_id}

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


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8080, token: str | None,
          record: str | Path | None = None, max_batch: int = 256, request_timeout: float = 30.0,
          workers: int = 4, max_in_flight: int = 32, device: str = "cpu", log_level: str = "warning",
          allow_head_weights: bool = False) -> None:
    """Load a cloud artifact and serve its tail with uvicorn until interrupted (see :func:`create_app`).

    A full checkpoint (head weights included) is refused with a :class:`~splitshield.errors.CheckpointError`
    unless ``allow_head_weights``; then a warning is printed to stderr.
    """
    import uvicorn

    if check_servable(checkpoint, allow_head_weights) == "checkpoint":
        print(f"WARNING: --allow-head-weights: serving the full checkpoint {checkpoint}; this cloud process reads "
              "the head's weights, i.e. white-box access to invert every feature it receives. Deploy the cloud "
              "artifact of `splitshield export` instead.", file=sys.stderr, flush=True)
    service = TailService(checkpoint, max_batch=max_batch, device=device, allow_head_weights=allow_head_weights)
    app = create_app(service, token, record=record, request_timeout=request_timeout, workers=workers,
                     max_in_flight=max_in_flight)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitshield.runtime.server", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="cloud artifact (splitshield export ... --cloud)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file")
    parser.add_argument("--no-auth", action="store_true", help="serve without authentication (trusted networks only)")
    parser.add_argument("--record", help="SQLite transcript recording every received frame")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--workers", type=int, default=4, help="threads running the tail")
    parser.add_argument("--max-in-flight", type=int, default=32, help="concurrent requests before 'overloaded'")
    parser.add_argument("--allow-head-weights", action="store_true",
                        help="serve a full checkpoint (the cloud then holds the head's weights)")
    args = parser.parse_args(argv)
    try:
        token = resolve_token(args.token_file, args.no_auth)
        serve(args.checkpoint, host=args.host, port=args.port, token=token, record=args.record,
              max_batch=args.max_batch, request_timeout=args.timeout, workers=args.workers,
              max_in_flight=args.max_in_flight, allow_head_weights=args.allow_head_weights)
    except SplitShieldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
