"""The transport's limit for ``benchmarks/serve.py``: the tail server's HTTP stack with nothing behind it.

``python _echo_server.py TOKEN CLASSES --port PORT`` serves, with the uvicorn configuration ``splitshield serve`` uses
(:func:`splitshield.runtime.server.uvicorn_config`: guarded httptools protocol, connection limits, logging),
an app that checks the bearer token, reads the request body as the server does and answers a fixed JSON body
the size of one image's logits. No decode, no batching, no tail.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn
from starlette.requests import Request

from splitshield.runtime.hardening import ConnectionLimits
from splitshield.runtime.server import _authorized, _read_body, listen, uvicorn_config


def echo_app(token: str, classes: int) -> Any:
    body = json.dumps({"logits": [[0.123456789] * classes], "request_id": None}).encode()
    secret = token.encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        ok = scope["path"] == "/healthz" or _authorized(request, secret)
        await _read_body(request, 1 << 26)
        await send({"type": "http.response.start", "status": 200 if ok else 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("token")
    parser.add_argument("classes", type=int)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    token, classes, port = args.token, args.classes, args.port
    config = uvicorn_config(echo_app(token, classes), host="127.0.0.1", port=port, limits=ConnectionLimits())
    uvicorn.Server(config).run(sockets=[listen("127.0.0.1", port, config.backlog)])
