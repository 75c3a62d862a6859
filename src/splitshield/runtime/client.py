"""The edge side of a deployed split model: head + defense on the device, features over HTTP.

>>> client = EdgeClient("edge.safetensors", "http://127.0.0.1:8080", token="...")  # doctest: +SKIP
>>> logits = client.predict(images)                                                 # doctest: +SKIP

Only the codec frame of ``defense.send(head, x)`` (``obfuscate(head(perturb(x)))``) leaves the device; the server
(:mod:`splitshield.runtime.server`) runs the tail and answers with logits. Before its first request the
client checks that the server's model has its fingerprint (:mod:`splitshield.runtime.artifacts`).
"""

from __future__ import annotations

import ssl
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, SplitShieldError
from ..validate import check, validate
from .artifacts import load_edge
from .codec import CodecOptions, WireFormat, encode

__all__ = ["EdgeClient", "ServerError", "load_images", "read_token", "tls_context"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MODE_NAMES = {"L": "grey", "RGB": "RGB"}  # Pillow's image modes, as warnings name them (others as Pillow does)


class ServerError(SplitShieldError):
    """The server refused a request or could not be reached; ``code`` is its stable error code."""

    def __init__(self, message: str, code: str = "unreachable", status: int | None = None):
        super().__init__(message)
        self.code, self.status = code, status


def read_token(path: str | Path | None, allow_empty: bool = False) -> str:
    """Read a bearer token from a file, stripping surrounding whitespace (the trailing newline).

    Raises
    ------
    ConfigError
        If the file is missing, or the token is empty and ``allow_empty`` is false.
    """
    if path is None:
        token = ""
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--token-file {path} does not exist: write the shared secret into it")
        token = path.read_text(encoding="utf-8").strip()
    if not token and not allow_empty:
        raise ConfigError("the bearer token is empty: put a secret in --token-file (or pass --no-auth to serve)")
    if not token.isascii() or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError("the bearer token must be one line of printable ASCII characters without spaces")
    return token


def load_images(paths: list[str | Path], input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[Path]]:
    """Read image files (or every image in given folders, sorted) as a float batch in [0, 1].

    Images are converted to grey or RGB to match ``input_shape`` (C, H, W) and resized to (H, W)
    with bilinear filtering when their size differs; each image converted or resized gives one
    :class:`UserWarning` naming it and what was done.

    Returns
    -------
    images : torch.Tensor
        ``[N, C, H, W]`` float32 in [0, 1].
    files : list of Path
        The file behind each row, in order.
    """
    from PIL import Image, UnidentifiedImageError

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"image path {p} does not exist")
    if not files:
        raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    c, h, w = input_shape
    if c not in (1, 3):
        raise ConfigError(f"the model takes {c}-channel images; only grey (1) or RGB (3) files can be read")
    mode = "L" if c == 1 else "RGB"
    batch = torch.empty(len(files), c, h, w)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                changes = [f"converted {_MODE_NAMES.get(im.mode, im.mode)} to {_MODE_NAMES[mode]}"
                           ] if im.mode != mode else []
                if im.size != (w, h):  # PIL sizes are (W, H)
                    changes.append(f"resized {im.height}×{im.width} to {h}×{w} (H×W)")
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"cannot read image {f}: {exc}") from None
        if changes:
            warnings.warn(f"image {f}: {' and '.join(changes)} for the model's {c}×{h}×{w} input",
                          UserWarning, stacklevel=2)
        batch[i] = data.view(h, w, c).permute(2, 0, 1).float() / 255.0
    return batch, files


def tls_context(server_url: str, ca: str | Path | None) -> ssl.SSLContext | bool:
    """What the HTTP client verifies the server with: a context trusting ``ca`` (``--ca``), else the system's."""
    if ca is None:
        return True
    if not server_url.lower().startswith("https://"):
        raise ConfigError(f"--ca is for an https:// server, but the server URL is {server_url}: use https://")
    if not Path(ca).is_file():
        raise ConfigError(f"--ca {ca} does not exist: give the PEM certificate of the server's certificate authority")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--ca {ca}: not a PEM certificate ({exc})") from None


def _tls_failure(exc: BaseException) -> str | None:
    """A one-line reason when a transport error comes from TLS and will recur (an unverifiable certificate, a
    handshake the server does not speak); ``None`` for other errors, and for a connection closed mid-handshake
    (worth a retry)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"TLS: the server's certificate cannot be verified ({seen.verify_message}): pass --ca with the "
                    "certificate of the authority that signed it (EdgeClient(ca=...))")
        if isinstance(seen, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
            return None
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen}): does the server serve https (--tls-cert/--tls-key)?"
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:  # when the chain of causes is lost on the way up
        return f"TLS: the server's certificate cannot be verified ({text}): pass --ca with its authority's certificate"
    return None


class EdgeClient:
    """Runs the head and its defense locally and the tail on a remote server.

    Parameters
    ----------
    checkpoint : str or Path
        The edge artifact (head + defense) exported with the cloud artifact the server hosts
        (:func:`~splitshield.runtime.artifacts.export`), or that full checkpoint (its tail is dropped).
    server_url : str
        Base URL, e.g. ``http://127.0.0.1:8080``.
    token : str
        Bearer token shared with the server (``""`` for a server started with ``--no-auth``).
    codec : CodecOptions or WireFormat
        How features are encoded on the wire (default float32, uncompressed).
    timeout : float
        Seconds per HTTP request (connect, read, write each).
    retries : int
        Extra attempts after a connection error, a timeout or a 503, with exponential backoff from
        ``backoff`` seconds. A retried request keeps its ``X-Request-ID``, so the server's
        transcript shows duplicates as such.
    batch_size : int
        Images per request; lowered to the server's ``max_batch`` if larger.
    seed : int
        Seeds the defense's random draws (noise) on the device (CPU random stream).
    ca : str or Path, optional
        PEM file of the certificate authority (or the self-signed certificate) that signed an ``https://``
        server's certificate; default: the system's trusted authorities. A server whose certificate it
        cannot verify is refused at once (no retries).
    """

    def __init__(self, checkpoint: str | Path, server_url: str, token: str = "", *,
                 codec: CodecOptions | WireFormat | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2, batch_size: int = 64, seed: int = 0, device: str = "cpu",
                 ca: str | Path | None = None):
        import httpx

        if retries < 0 or batch_size < 1 or timeout <= 0:
            raise ConfigError("retries must be >= 0, batch_size >= 1 and timeout > 0")
        verify = tls_context(server_url, ca)
        edge = load_edge(checkpoint, device=device)  # the head and defense only; no tail in this process
        check(validate(edge.target, edge.defense))  # every problem of the head and defense, before any request
        self.head, self.defense = edge.target.head.eval(), edge.defense.eval()
        self.point, self.input_shape, self.feature_shape = edge.point, edge.input_shape, edge.feature_shape
        self.fingerprint = edge.fingerprint
        self.codec = codec.options if isinstance(codec, WireFormat) else codec or CodecOptions()
        self.retries, self.backoff, self.batch_size, self.device = retries, backoff, batch_size, device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=server_url.rstrip("/"), headers=headers, timeout=timeout, verify=verify)
        self._verify, self._headers, self._timeout = verify, headers, timeout
        self._checked = False

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                if (tls := _tls_failure(exc)) is not None:  # a certificate will not verify on a retry either
                    raise ServerError(f"{method} {self._http.base_url}{path}: {tls}", code="tls") from None
                if last:
                    raise ServerError(f"{method} {self._http.base_url}{path} failed after "
                                      f"{attempt + 1} attempts: {type(exc).__name__}: {exc}") from None
            else:
                # 503 = the server is overloaded or timed out: transient, worth another try.
                if response.status_code != 503 or last:
                    break
            time.sleep(self.backoff * 2**attempt)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            message = err.get("message", response.text[:200])
            raise ServerError(
                f"server answered {response.status_code} {err.get('code', '')}: {message}",
                code=err.get("code", "http_error"), status=response.status_code,
            )
        return body

    def model_info(self) -> dict[str, Any]:
        """The server's ``GET /v1/model``: split point, shapes, fingerprint and accepted codec options."""
        return self._request("GET", "/v1/model")

    def _check_server(self) -> None:
        if self._checked:
            return
        info = self.model_info()
        if info.get("split") != self.point or tuple(info.get("feature_shape", ())) != self.feature_shape:
            raise ConfigError(
                f"server hosts split {info.get('split')!r} with feature shape {info.get('feature_shape')}, "
                f"this device sends {self.point!r} {list(self.feature_shape)}: use the same checkpoint on both"
            )
        if info.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"server's model has fingerprint {info.get('fingerprint') or '(none reported)'}, this device's "
                f"{self.fingerprint}: the edge and cloud artifacts come from different checkpoints; export both "
                "from one checkpoint (splitshield export CKPT --edge edge.safetensors --cloud cloud.safetensors)"
            )
        codec = info.get("codec", {})
        if self.codec.encoding not in codec.get("encodings", []) or self.codec.compression not in codec.get(
                "compressions", []):
            raise ConfigError(f"server does not accept {self.codec.encoding}/{self.codec.compression}; it accepts "
                              f"encodings {codec.get('encodings')} and compressions {codec.get('compressions')}")
        self.batch_size = min(self.batch_size, int(info.get("max_batch", self.batch_size)))
        self._checked = True

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What leaves the device: ``defense.send(head, x)``, ``[N, *feature_shape]``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"images: expected [N, {', '.join(map(str, self.input_shape))}] in [0, 1], got {got}")
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        state = torch.random.get_rng_state()
        torch.random.set_rng_state(self._generator.get_state())
        try:
            return self.defense.send(self.head, x)
        finally:
            self._generator.set_state(torch.random.get_rng_state())
            torch.random.set_rng_state(state)

    def frame(self, z: torch.Tensor) -> bytes:
        """The codec frame :meth:`send` posts for features ``z`` ``[B, *feature_shape]``."""
        return encode(z, self.codec)

    def send(self, z: torch.Tensor, request_id: str | None = None) -> torch.Tensor:
        """Send one batch of features ``[B, *feature_shape]``; returns the tail's logits ``[B, K]``.

        The first call checks that the server hosts this device's model (split, shapes, fingerprint)."""
        self._check_server()
        body = self._request(
            "POST", "/v1/infer", content=self.frame(z),
            headers={"Content-Type": "application/octet-stream", "X-Request-ID": request_id or uuid.uuid4().hex},
        )
        return torch.tensor(body["logits"], dtype=torch.float32)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` for images ``[N, C, H, W]`` (float in [0, 1] or uint8), in batches."""
        z = self.features(images)
        return torch.cat([self.send(z[i : i + self.batch_size]) for i in range(0, len(z), self.batch_size)])

    def predict_stream(self, images: torch.Tensor, window: int = 16) -> torch.Tensor:
        """As :meth:`predict`, over the server's ``/v1/stream`` WebSocket: one connection, one frame per
        ``batch_size`` images, up to ``window`` frames sent ahead of their answers (no HTTP request per frame).

        Raises :class:`ServerError` with the server's code if a frame is refused (no retry: a stream is not
        resumed)."""
        import json

        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window: a positive number of frames sent ahead, got {window!r}")
        self._check_server()
        z = self.features(images)
        frames = [self.frame(z[i : i + self.batch_size]) for i in range(0, len(z), self.batch_size)]
        url = str(self._http.base_url).replace("http", "ws", 1) + "/v1/stream"
        tls = self._verify if isinstance(self._verify, ssl.SSLContext) else None
        logits: list[torch.Tensor] = []
        try:
            with connect(url, additional_headers=self._headers, ssl=tls, open_timeout=self._timeout,
                         max_size=None) as ws:
                sent = 0
                while len(logits) < len(frames):
                    while sent < len(frames) and sent - len(logits) < window:
                        ws.send(frames[sent])
                        sent += 1
                    answer = json.loads(ws.recv(timeout=self._timeout))
                    if "error" in answer:
                        raise ServerError(f"frame {answer.get('seq')}: {answer['error']['code']}: "
                                          f"{answer['error']['message']}", code=answer["error"]["code"])
                    logits.append(torch.tensor(answer["logits"], dtype=torch.float32))
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ServerError(f"{url}: the server refused the stream with HTTP {status}"
                              + (" (missing or wrong bearer token)" if status == 403 else ""),
                              code="unauthorized" if status == 403 else "http_error", status=status) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ServerError(f"{url}: {type(exc).__name__}: {exc}") from None
        return torch.cat(logits)
