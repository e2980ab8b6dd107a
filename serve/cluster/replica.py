"""One Ray Serve replica: our whole app (routes, keys, tenants, metrics, errors, engine) built by
`serve.app.build_app`, answering the ASGI requests that the ingress forwards, message by message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.types import Message

from serve.app import build_app
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-tuneserve-replica"  # names the replica (its Ray actor) that answered
# On an adapter's requests: hit when the adapter was loaded on this replica already, miss when it had to be.
AFFINITY_HEADER = "x-tuneserve-affinity"
STARTUP_POLL_S = 0.2


class EngineReplica:
    """A Ray Serve deployment class. Its constructor returns once the engine serves, so Ray routes nothing to
    a replica that is still loading; `forward` is the HTTP path, `check_health` Ray's health check."""

    async def __init__(self, settings: ServeSettings) -> None:  # type: ignore[misc]  # Ray awaits it
        from ray import serve as ray_serve

        context = ray_serve.get_replica_context()
        # The Ray actor's name: the tests kill a replica by it, and logs name it.
        self.name = context.replica_id.to_full_id_str()
        settings = settings.model_copy(update=per_node_settings(settings, context.rank.local_rank))
        self.stopped: str | None = None
        self.app = build_app(settings, request_stop=self._stop)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        while self.app.state.serving is None:
            if self.app.state.startup_error is not None:
                await self.lifespan.__aexit__(None, None, None)
                # Ray retries a failed constructor a few times, then the deployment (and the command) fails.
                raise RuntimeError(f"the server could not start: {self.app.state.startup_error}")
            await asyncio.sleep(STARTUP_POLL_S)
        # Ray's multiplexing: the adapters this replica holds (least recently used first out) are reported to
        # Ray's router, which sends requests for them here. As many as the engine keeps in memory.
        slots = settings.max_cpu_loras or settings.max_loras
        self.resident: dict[str, ResidentAdapter] = {}  # what Ray's multiplexing holds here

        async def load(name: str) -> ResidentAdapter:  # a function: Ray keeps its cache on it
            return await self._load_adapter(name)

        self.load_adapter: Callable[[str], Awaitable[ResidentAdapter]] = ray_serve.multiplexed(
            max_num_models_per_replica=slots
        )(load)
        log.info("replica %s serves %s", self.name, settings.model_id)

    def _stop(self) -> None:
        # The engine died (or never started): fail Ray's health check, so Ray replaces this replica.
        self.stopped = self.app.state.startup_error or "the vLLM engine has died"

    async def _load_adapter(self, name: str) -> ResidentAdapter:
        """Bring the adapter into the engine's memory (vLLM's own LRU keeps it there while it is used)."""
        adapter = self.app.state.models.registry.get(name)
        if adapter is not None:
            await self.app.state.engine.add_lora(adapter.lora_request())
        self.resident[name] = ResidentAdapter(name, self.resident)
        return self.resident[name]

    def _serves(self, model: str) -> bool:
        return self.app.state.models.registry.get(model) is not None

    async def check_health(self) -> None:
        if self.stopped is not None:
            raise RuntimeError(self.stopped)
        status = None
        async for message in self.forward({"type": "http", "method": "GET", "path": "/health"}, b""):
            if message["type"] == "http.response.start":
                status = message["status"]
        if status != 200:
            raise RuntimeError(f"GET /health answered {status}")

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """Run one HTTP request through the app; yields its ASGI messages as the app sends them (a stream's
        events one by one). Cancelling the generator (the client went away) is a disconnect for the app."""
        from ray import serve as ray_serve

        model = ray_serve.get_multiplexed_model_id()
        added: list[tuple[bytes, bytes]] = [(REPLICA_HEADER.encode(), self.name.encode())]
        if model and self._serves(model):
            # Only served adapters: an unknown name (a 404 to come) must not evict one that is served.
            hit = model in self.resident
            await self.load_adapter(model)
            added.append((AFFINITY_HEADER.encode(), b"hit" if hit else b"miss"))
        sent: asyncio.Queue[Message | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *added]
                message = {**message, "headers": headers}
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(asgi_scope(scope), receive, send)
            finally:
                await sent.put(None)

        running = asyncio.create_task(run())
        try:
            while (message := await sent.get()) is not None:
                yield message
            await running  # raises what the app raised
            if model and model not in self.resident and self._serves(model):
                # Loaded by this request (--load-on-request, after the key's checks): Ray routes the next ones
                # for it here.
                await self.load_adapter(model)
        finally:
            disconnected.set()
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running

    async def __del__(self) -> None:
        # Ray calls this when it stops the replica: the lifespan's exit shuts the engine down.
        await self.lifespan.__aexit__(None, None, None)


def per_node_settings(settings: ServeSettings, local_rank: int) -> dict[str, Any]:
    """What replicas sharing a node cannot share, made theirs by their rank on the node (a replacement takes
    the rank, so the port and the cache folder, of the replica it replaces)."""
    update: dict[str, Any] = {}
    if settings.metrics_port is not None:
        update["metrics_port"] = settings.metrics_port + local_rank
    if settings.sources().remote:
        # One server process owns an adapter cache folder (serve.sources locks it).
        update["adapter_cache_dir"] = settings.cache_dir() / f"replica-{local_rank}"
    return update


class ResidentAdapter:
    """An adapter as Ray's multiplexing holds it on a replica; Ray calls `__del__` when it evicts it."""

    def __init__(self, name: str, resident: dict[str, ResidentAdapter]) -> None:
        self.name = name
        self.resident = resident

    def __del__(self) -> None:
        # Called by Ray's eviction and again by the garbage collector: only ever removes itself.
        if self.resident.get(self.name) is self:
            del self.resident[self.name]


def asgi_scope(forwarded: dict[str, Any]) -> dict[str, Any]:
    """A whole HTTP scope from the fields the ingress forwards (the rest: an HTTP/1.1 request's defaults)."""
    return {
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": None,
        "server": None,
        **forwarded,
        "raw_path": forwarded.get("raw_path") or forwarded["path"].encode(),
    }
