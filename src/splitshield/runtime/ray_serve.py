"""The tail server on Ray Serve: the same HTTP API as ``splitshield serve``, scaled out over replicas.

Needs ``pip install 'splitshield[ray]'`` (``ray[serve]`` 2.53 or newer: the batching counts feature rows,
``serve.batch(batch_size_fn=)``). Every replica loads the cloud artifact into its own
:class:`~splitshield.runtime.server.TailService` and answers ``GET /healthz``, ``GET /v1/model`` and
``POST /v1/infer`` exactly as :mod:`splitshield.runtime.server` does (bearer token, error JSON
``{"error": {"code", "message"}}`` with the codes of :data:`~splitshield.runtime.server.ERROR_CODES`), so
:class:`~splitshield.runtime.client.EdgeClient` works against it unchanged::

    import ray
    from ray import serve
    from splitshield.runtime.client import read_token
    from splitshield.runtime.ray_serve import tail_application

    ray.init()  # or ray.init(address="auto") on a cluster
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})  # Ray's HTTP proxy, one per node
    serve.run(tail_application("cloud.safetensors", token=read_token("secret.txt"), num_replicas=4,
                               ray_actor_options={"num_cpus": 1}), name="splitshield-tail", route_prefix="/")
    # EdgeClient("edge.safetensors", "http://HOST:8000", token) now reaches any of the 4 replicas

or from a shell with :func:`build` (port 8000; ``serve run`` starts a local Ray unless ``--address``)::

    serve run splitshield.runtime.ray_serve:build cloud_artifact=/models/cloud.safetensors \\
        token_file=/secrets/token num_replicas=4

or from a Serve config file (``serve run`` / ``serve deploy config.yaml``, KubeRay's RayService)::

    http_options: {host: 0.0.0.0, port: 8000}
    applications:
      - name: splitshield-tail
        route_prefix: /
        import_path: splitshield.runtime.ray_serve:build
        args: {cloud_artifact: /models/cloud.safetensors, token_file: /secrets/token, num_replicas: 4}

Ray's proxy on each node routes requests to the replicas (``max_ongoing_requests`` each); a replica runs
concurrent requests through the tail together with Ray's dynamic batching (:func:`ray.serve.batch`): a
batch takes queued requests until ``max_batch`` feature rows or until ``max_delay_ms`` have passed, one
batch at a time per replica (add replicas, each with its own CPUs or GPU, to run more at once). A batch
holds at most ``max_ongoing_requests`` requests, so Ray's replica log warns when ``max_batch`` is larger
(it counts requests; this batching counts rows). The artifact's path must be readable on every node
(shared storage, or the same file in every image); each replica checks that it loaded the fingerprint
the driver read, so a stale copy on one node is refused.

What differs from ``splitshield serve``:

* **No transcript** (``--record``): replicas are separate processes on several nodes, and one SQLite file
  takes one writer; not implemented.
* **TLS and connection hardening are Ray's or the load balancer's**: the proxy (uvicorn) serves HTTPS with
  ``http_options={"ssl_certfile": ..., "ssl_keyfile": ...}`` (``serve.start`` or the config file's
  ``http_options``), and has ``keep_alive_timeout_s`` and ``request_timeout_s``; it has no header timeout
  nor connection cap (``splitshield serve``'s ``ConnectionLimits``), so expose it through a load
  balancer or Kubernetes ingress that enforces them (and may terminate TLS instead). Never expose Ray's
  other ports (GCS, dashboard, client): whoever reaches them can run code on the cluster.
* **Overload**: beyond ``max_ongoing_requests`` per replica requests wait in Ray's queue; beyond
  ``max_queued_requests`` Ray answers 503 as plain text (not the error JSON). ``EdgeClient`` retries a
  503 either way. ``request_timeout`` gives the server's ``timeout`` error (503, error JSON).
* The token reaches the replicas as a deployment argument, stored by Serve's controller in Ray's GCS.
"""

# No ``from __future__ import annotations``: Ray pickles the deployment class by value, and FastAPI in the replica
# must see real annotations (``request: Request``), not strings it would look up in globals pickling left out.
import asyncio
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .artifacts import _describe, check_servable, checkpoint_fingerprint
from .batcher import check_batching
from .server import ApiError, TailService, _authorized, add_error_handlers, read_frame, resolve_token, run_batch

try:
    from fastapi import FastAPI, Request
    from ray import serve
    from ray.serve import Application
except ImportError as exc:
    raise ImportError(f"splitshield.runtime.ray_serve needs Ray Serve ({exc}): "
                      "pip install 'splitshield[ray]'") from None
if "batch_size_fn" not in inspect.signature(serve.batch).parameters:
    raise ImportError("splitshield.runtime.ray_serve needs ray[serve] >= 2.53 (serve.batch(batch_size_fn=)): "
                      "pip install -U 'splitshield[ray]'")

__all__ = ["TailDeployment", "build", "tail_application"]

_app = FastAPI(title="splitshield tail server (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
add_error_handlers(_app)


def _rows(batch: list[torch.Tensor]) -> int:
    """A batch's size for :func:`ray.serve.batch`: its feature rows, not its requests."""
    return sum(int(z.shape[0]) for z in batch)


@serve.deployment(name="SplitShieldTail")
@serve.ingress(_app)
class TailDeployment:
    """One replica: a :class:`TailService` behind the server's three endpoints (built by :func:`tail_application`)."""

    def __init__(self, cloud_artifact: str, token: str | None, fingerprint: str, max_batch: int,
                 max_delay_ms: float, request_timeout: float, device: str, allow_head_weights: bool):
        self.service = TailService(cloud_artifact, max_batch=max_batch, device=device,
                                   allow_head_weights=allow_head_weights)
        if self.service.fingerprint != fingerprint:
            raise ConfigError(f"{cloud_artifact} on this node has fingerprint {self.service.fingerprint}, the "
                              f"deployed one {fingerprint}: put the same file on every node")
        self.token = token.encode() if token is not None else None
        self.request_timeout = request_timeout
        self._tail.set_max_batch_size(max_batch)
        self._tail.set_batch_wait_timeout_s(max_delay_ms / 1000)

    def _check_token(self, request: Request) -> None:
        if not _authorized(request, self.token):
            raise ApiError("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    @_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @_app.get("/v1/model")
    async def model(self, request: Request) -> dict[str, Any]:
        self._check_token(request)
        return self.service.info()

    @_app.post("/v1/infer")
    async def infer(self, request: Request) -> dict[str, Any]:
        self._check_token(request)
        try:
            return await asyncio.wait_for(self._infer(request), self.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"request took longer than {self.request_timeout} s") from None

    async def _infer(self, request: Request) -> dict[str, Any]:
        frame, request_id = await read_frame(request, self.service)
        z = await asyncio.to_thread(self.service.decode, frame)  # [B, *feature_shape], or an ApiError
        logits = await run_batch(self._tail, z)
        return {"logits": logits.tolist(), "request_id": request_id}

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0, batch_size_fn=_rows)  # set per replica in __init__
    async def _tail(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits ``[B_i, K]`` of each request's features ``[B_i, *feature_shape]``, from one tail call."""
        logits = await asyncio.to_thread(self.service.forward, torch.cat(batch))
        return list(logits.split([int(z.shape[0]) for z in batch]))


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: a positive int, got {value!r}")


def tail_application(cloud_artifact: str | Path, *, token: str | None, max_batch: int = 256,
                     max_delay_ms: float = 0.0, num_replicas: int = 1, ray_actor_options: dict[str, Any] | None = None,
                     max_ongoing_requests: int = 32, max_queued_requests: int = 128, request_timeout: float = 30.0,
                     device: str = "cpu", allow_head_weights: bool = False) -> Application:
    """The tail of ``cloud_artifact`` as a Ray Serve application; deploy it with ``serve.run(...)``.

    Everything is checked here, before Ray is involved: a bad option is a one-line :class:`ConfigError`,
    an edge artifact or (without ``allow_head_weights``) a full checkpoint a one-line
    :class:`~splitshield.errors.CheckpointError`, as ``splitshield serve`` refuses them.

    Parameters
    ----------
    cloud_artifact : str or Path
        From :func:`~splitshield.runtime.artifacts.export`: the tail's tensors only. Resolved to an absolute
        path, which every node must be able to read.
    token : str or None
        Bearer token; ``None`` serves without authentication (trusted networks only).
    max_batch : int
        Feature rows per request, and per batch of requests through the tail, at most.
    max_delay_ms : float
        How long a request may wait for others to fill a batch (0: run what is queued at once).
    num_replicas, ray_actor_options, max_ongoing_requests, max_queued_requests
        Ray Serve's deployment options (``ray_actor_options`` e.g. ``{"num_cpus": 2}`` or ``{"num_gpus": 1}``
        with ``device="cuda"``); ``max_queued_requests=-1`` queues without bound.
    request_timeout : float
        Seconds per ``/v1/infer`` request in the replica (reading, decoding, waiting for and running its batch).
    allow_head_weights : bool
        Serve a full checkpoint (every replica then reads the head's weights); warns.

    Returns
    -------
    ray.serve.Application
        A bound :class:`TailDeployment`: ``POST /v1/infer`` maps a frame ``[B, *feature_shape]`` to
        ``{"logits": [B, K], "request_id": ...}``.
    """
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigError("token: a non-empty secret, or None to serve without authentication")
    check_batching(max_batch, max_delay_ms)
    for name, value in (("num_replicas", num_replicas), ("max_ongoing_requests", max_ongoing_requests)):
        _positive_int(name, value)
    if isinstance(max_queued_requests, bool) or not isinstance(max_queued_requests, int) or (
            max_queued_requests < 1 and max_queued_requests != -1):
        raise ConfigError(f"max_queued_requests: a positive int, or -1 for no bound; got {max_queued_requests!r}")
    if ray_actor_options is not None and not isinstance(ray_actor_options, dict):
        raise ConfigError(f"ray_actor_options: a dict such as {{'num_cpus': 1}}, got {ray_actor_options!r}")
    if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) or not (
            math.isfinite(request_timeout) and request_timeout > 0):
        raise ConfigError(f"request_timeout: seconds > 0, got {request_timeout!r}")
    kind = check_servable(cloud_artifact, allow_head_weights)
    path = str(Path(cloud_artifact).resolve())
    if kind == "checkpoint":
        warnings.warn(f"allow_head_weights: serving the full checkpoint {cloud_artifact}; every replica reads the "
                      "head's weights (white-box access to invert the features it receives). Deploy the cloud "
                      "artifact of `splitshield export` instead.", UserWarning, stacklevel=2)
        fingerprint = checkpoint_fingerprint(path)
    else:
        fingerprint = _describe(path)[1]["fingerprint"]  # type: ignore[index]  # a cloud artifact has its JSON
    options: dict[str, Any] = {"num_replicas": num_replicas, "max_ongoing_requests": max_ongoing_requests,
                               "max_queued_requests": max_queued_requests}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return TailDeployment.options(**options).bind(path, token, fingerprint, max_batch, float(max_delay_ms),
                                                  float(request_timeout), device, allow_head_weights)


_BUILD_ARGS = {"cloud_artifact": str, "token_file": str, "no_auth": bool, "max_batch": int, "max_delay_ms": float,
               "num_replicas": int, "num_cpus": float, "max_ongoing_requests": int, "max_queued_requests": int,
               "request_timeout": float, "device": str, "allow_head_weights": bool}


def build(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run splitshield.runtime.ray_serve:build key=value ...`` and Serve config
    files (``import_path: splitshield.runtime.ray_serve:build`` with ``args:``).

    Keys are :func:`tail_application`'s parameters, except ``token_file`` (read as ``splitshield serve
    --token-file`` reads it) or ``no_auth: true`` instead of ``token``, and ``num_cpus`` per replica instead of
    ``ray_actor_options``. Values may be strings (from the command line).
    """
    unknown = sorted(set(args) - set(_BUILD_ARGS))
    if unknown:
        raise ConfigError(f"unknown arguments {unknown}; allowed: {', '.join(_BUILD_ARGS)}")
    if "cloud_artifact" not in args:
        raise ConfigError("cloud_artifact=PATH is required (the cloud artifact of `splitshield export`)")
    parsed: dict[str, Any] = {}
    for key, value in args.items():
        kind = _BUILD_ARGS[key]
        try:
            if kind is bool:
                parsed[key] = value if isinstance(value, bool) else {"true": True, "false": False}[str(value).lower()]
            else:
                parsed[key] = kind(value)
        except (KeyError, ValueError):
            raise ConfigError(f"{key}: expected {'true/false' if kind is bool else kind.__name__}, "
                              f"got {value!r}") from None
    token = resolve_token(parsed.pop("token_file", None), parsed.pop("no_auth", False))
    if "num_cpus" in parsed:
        parsed["ray_actor_options"] = {"num_cpus": parsed.pop("num_cpus")}
    return tail_application(parsed.pop("cloud_artifact"), token=token, **parsed)
