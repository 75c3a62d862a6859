"""Hardening of the tail server: connection limits, a header timeout, bounded logs, TLS settings.

uvicorn has no header timeout, no header size limit with its httptools parser, and no eviction of idle
connections; its ``limit_concurrency`` answers 503 to *every* request once that many connections are open,
half-open ones included, which is the denial of service it should prevent. :class:`GuardedHttpToolsProtocol`
adds the three to uvicorn's httptools protocol (a C parser, where h11 is pure Python):

* a request's headers must be complete within ``header_timeout`` seconds of the connection opening (or of
  its first byte after the previous response; a byte at a time does not extend it), and be at most
  ``max_header_bytes`` long;
* idle keep-alive connections close after ``keep_alive_timeout``, and one that stops reading its answers
  (its send buffer full) after ``header_timeout``;
* at most ``max_connections`` connections are open: beyond it the one that has waited longest without a
  request in progress is closed (if it has waited at least ``min(1 s, header_timeout / 2)``, else the new
  one is, so a client always has that long to send its headers). The file-descriptor limit is raised to fit;
* a TLS handshake must finish within ``header_timeout`` too (asyncio's default is 60 s): a client that opens
  a TLS connection and never completes the handshake is not yet a connection the protocol sees.

Every log handler gets a :class:`RateLimitFilter`, so one error repeated (``Too many open files``, invalid
requests) cannot grow the log without bound. Per-address limits (one host opening thousands of
connections per second) belong in the firewall or load balancer in front.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import ConfigError

__all__ = ["DEFAULT_MAX_CONNECTIONS", "ConnectionLimits", "GuardedConfig", "GuardedHttpToolsProtocol",
           "RateLimitFilter", "check_tls", "log_config"]

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
            raise ConfigError(f"--max-header-bytes: at least 1024 bytes (default 16384), "
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


def log_config(limits: ConnectionLimits) -> dict[str, Any]:
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
    """Per-server state of :class:`GuardedHttpToolsProtocol`: the limits and the connections waiting for a request."""

    def __init__(self, limits: ConnectionLimits, max_connections: int):
        self.limits, self.max_connections = limits, max_connections
        # Connection -> when it began waiting; longest waiting first (dicts keep insertion order).
        self.waiting: dict[GuardedHttpToolsProtocol, float] = {}
        # A connection waiting less than this is not evicted: a client has time to send its headers even
        # while a flood of new connections evicts the others.
        self.grace = min(1.0, limits.header_timeout / 2)

    def __getstate__(self) -> dict[str, Any]:  # a worker process starts with no connections
        return {"limits": self.limits, "max_connections": self.max_connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limits"], state["max_connections"])




class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header timeout, a header size limit and a connection limit that
    evicts idle connections (module docstring).

    Reads its :class:`_Guard` from ``config.splitshield_guard`` (set by the server; the default limits
    without it). A connection is *waiting* from its opening, and again after each response, until a
    request's headers are complete; only waiting connections are timed out (``header_timeout``), held to
    ``max_header_bytes``, or evicted (``max_connections``).
    """

    _header_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None
    _in_head = False  # between a request's first byte and the end of its headers
    _head_bytes = 0  # bytes of the chunks that ended inside the current request head
    _parsed_head_bytes = 0  # request line, headers and trailers parsed of the current request

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "splitshield_guard", None) is None:  # used without serve(): the default limits
            config.splitshield_guard = _Guard(ConnectionLimits(), _connection_budget(None))
        self.guard: _Guard = config.splitshield_guard

    def _waiting_for_request(self) -> bool:
        """No request with complete headers is being handled or queued (pipelined) on this connection."""
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        self._arm_header_timer()
        if len(self.connections) > self.guard.max_connections:
            self._evict()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_request() and self._header_timer is None:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket: that protocol owns it now
            self._cancel_header_timer()
            self.guard.waiting.pop(self, None)
            return
        if self.transport.is_closing():
            return
        if self._in_head:  # the whole chunk was (at most) request head: an unfinished header grows in httptools
            self._head_bytes += len(data)
            if self._head_bytes > self.guard.limits.max_header_bytes:
                self._close_with_400(f"request headers over {self.guard.limits.max_header_bytes} bytes "
                                     "(--max-header-bytes)")
        elif not self._waiting_for_request():  # headers complete: no longer waiting
            self._cancel_header_timer()
            self.guard.waiting.pop(self, None)

    # Two counts bound a request head: the bytes of chunks that end inside it (above: an unfinished header
    # line), and its parsed length (a head, or chunked trailers, arriving whole within one chunk). Raising in a
    # parser callback makes uvicorn answer 400 and close.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed_head_bytes = True, 0, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.guard.limits.max_header_bytes:
            self.logger.warning("refused a request whose headers are over %d bytes (--max-header-bytes)",
                                self.guard.limits.max_header_bytes)
            raise ValueError("request headers over --max-header-bytes")

    # A client that stops reading its answers holds its connection (and its queued requests) while no
    # timeout applies to it: it gets header_timeout to read again.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.guard.limits.header_timeout, self._on_write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            self.logger.warning("closed a connection that read none of its answers within %s s (--header-timeout)",
                                self.guard.limits.header_timeout)
            self._close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_request():
            self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
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
        if self._waiting_for_request() and not self.transport.is_closing():
            self.logger.warning("closed a connection that sent no complete request headers within %s s "
                                "(--header-timeout)", self.guard.limits.header_timeout)
            self._close()

    def _evict(self) -> None:
        """Close the connection waiting longest, if it has waited past the grace period; else this new one."""
        oldest = next(iter(self.guard.waiting.items()), None)
        victim = self
        if oldest is not None and oldest[0] is not self and self.loop.time() - oldest[1] >= self.guard.grace:
            victim = oldest[0]
        self.logger.warning("%d connections open (--max-connections): closed %s", self.guard.max_connections,
                            "the new one (none had waited long)" if victim is self else
                            "the one waiting longest for a request")
        victim._close()

    def _close_with_400(self, message: str) -> None:
        self.logger.warning("closed a connection: %s", message)
        self.send_400_response(message)  # writes the answer and closes the transport
        self._close()

    def _close(self) -> None:
        self._cancel_header_timer()
        self.guard.waiting.pop(self, None)
        self.connections.discard(self)  # no longer counted, though connection_lost comes a loop turn later
        self.transport.close()


class GuardedConfig(uvicorn.Config):
    """uvicorn's configuration served through :class:`GuardedHttpToolsProtocol` with ``limits``, and a TLS
    handshake held to ``limits.header_timeout`` (asyncio's default is 60 s). Picklable: ``workers`` > 1
    sends it to each worker process, which enforces the limits on its own connections.
    """

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(app, http=GuardedHttpToolsProtocol, **kwargs)
        # Raises the file-descriptor limit to hold max_connections (a one-line ConfigError if it cannot).
        self.splitshield_guard = _Guard(limits, _connection_budget(limits.max_connections))

    def load(self) -> None:
        super().load()
        try:  # uvicorn loads the configuration on the server's running loop, just before create_server
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self.ssl is not None:  # uvicorn does not expose ssl_handshake_timeout: its create_server call gets it
            create_server, timeout = loop.create_server, self.splitshield_guard.limits.header_timeout

            def create_tls_server(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("ssl") is not None:
                    kwargs.setdefault("ssl_handshake_timeout", timeout)
                return create_server(*args, **kwargs)

            loop.create_server = create_tls_server  # type: ignore[method-assign]


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


