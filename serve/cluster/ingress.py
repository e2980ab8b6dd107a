"""The cluster's HTTP entry (behind Ray Serve's proxy): reads the request's `model` and forwards the request,
untouched, to a replica chosen by Ray's model multiplexing, streaming the answer back as the replica sends it.

Deliberately light (no vLLM, no torch): it runs in its own Ray actor and handles every request."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# What of the HTTP scope a replica's app needs; the rest (Ray's and Starlette's state) stays here.
FORWARDED_SCOPE = (
    *("type", "http_version", "method", "scheme", "path", "raw_path"),
    *("query_string", "headers", "root_path", "client", "server"),
)


def request_model(body: bytes) -> str | None:
    """The `model` of a JSON request body (what selects the adapter), else None."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = request.get("model") if isinstance(request, dict) else None
    return model if isinstance(model, str) and model else None


class Ingress:
    """A Ray Serve deployment class, wrapped by `serve.ingress()` (see serve.cluster.__main__): its ASGI app
    is a `Forwarder` to the replicas."""

    def __init__(self, replicas: Any, base_model_id: str, max_request_bytes: int) -> None:
        self.forwarder = Forwarder(replicas, base_model_id, max_request_bytes)

    def __serve_build_asgi_app__(self) -> Forwarder:
        return self.forwarder


class Forwarder:
    """The ASGI app of the ingress. `replicas` is the replicas' DeploymentHandle; requests for
    `base_model_id` (or for no model) go to any replica."""

    def __init__(self, replicas: Any, base_model_id: str, max_request_bytes: int) -> None:
        self.replicas = replicas
        self.base_model_id = base_model_id
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        # Past the limit the rest is not read: the replica's app answers 413 for the oversized body.
        body = await read_body(receive, self.max_request_bytes + 1)
        model = request_model(body)
        handle = self.replicas.options(stream=True)
        if model is not None and model != self.base_model_id:
            # Ray routes to a replica that has this adapter loaded, else loads it on one (LRU).
            handle = handle.options(multiplexed_model_id=model)
        forwarded = {key: scope[key] for key in FORWARDED_SCOPE if key in scope}
        started = False
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            async for message in handle.forward.remote(forwarded, body):
                if message["type"] == "http.response.start":
                    started = True
                    # Ray's proxy adds the request's X-Request-Id (the same value): once is enough.
                    headers = [(k, v) for k, v in message["headers"] if k.lower() != b"x-request-id"]
                    message = {**message, "headers": headers}
                await send(message)
        except (RayActorError, ActorUnavailableError) as exc:
            if started:
                raise  # a stream cut short: the client sees the connection end without [DONE]
            log.warning("the replica died before answering %s %s: %s", scope["method"], scope["path"], exc)
            await send_error(send, 503, "the replica serving this request stopped; retry the request")


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, at most `limit` bytes of it."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[:limit]


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_error(send: Send, status: int, message: str) -> None:
    """An error in OpenAI's shape (serve.protocol.OpenAIError's body, which would import vLLM here)."""
    error: dict[str, Any] = {"message": message, "type": "server_error", "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
