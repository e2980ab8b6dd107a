"""The FastAPI app: `build_app(settings)` plus a lifespan that owns the engine (started in the background, so
/health answers 503 while the model loads instead of refusing connections). The server stops with a
non-zero exit code, for its supervisor to restart it, when the engine cannot start or dies later."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import protocol
from serve.adapters import AdapterError, AdapterRegistry, parse_lora_option
from serve.engine import build_engine
from serve.metrics import ServerMetrics
from serve.models import ServedModels
from serve.protocol import OpenAIError
from serve.routes import error_response, router
from serve.serving import Serving, ToolCalling
from serve.settings import ServeSettings
from serve.sources import AdapterCache
from serve.tenants import Tenants
from tuneserve import package_version

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServeSettings], Any]
TokenizerFactory = Callable[[ServeSettings], Any]

# Exit codes of `python -m serve` (app.state.exit_code); 2 is a bad command line (serve/__main__.py).
EXIT_ENGINE_DIED = 1
EXIT_START_FAILED = 3  # uvicorn's own code for a failed start-up


class MetricsMiddleware:
    """Counts every /v1 response by model and status (pure ASGI: streaming and disconnects pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.count_response(self._model(scope), self._endpoint(scope), status)
            tenant = scope.get("state", {}).get("tenant")
            self.metrics.count_tenant(tenant.name if tenant is not None else "-", status)

    # Labels come from known values only: a label per client-chosen path or model name let anyone grow
    # /metrics without bound (5,000 requests: 1.6 KB -> 42 MB, rendering 16x slower).
    @staticmethod
    def _endpoint(scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "unknown"

    @staticmethod
    def _model(scope: Scope) -> str:
        model = scope.get("state", {}).get("model")
        if model is None:
            return "-"
        models = getattr(scope["app"].state, "models", None)
        return str(model) if models is not None and models.has_served(str(model)) else "unknown"


class RequestIdMiddleware:
    """Every response carries `X-Request-Id` (the openai SDK's `request_id`): the request's own, else a new
    one (vLLM's XRequestIdMiddleware). Handlers find it as `request.state.request_id`, so a completion's id
    is `cmpl-` or `chatcmpl-` and the same value, as vLLM names a request that sent the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(raw=message.setdefault("headers", [])).append("X-Request-Id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413 in OpenAI's error shape, by Content-Length when
    given, else as the body streams in, before anything parses it (a 10 MB prompt stalled every request)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _refusal(self) -> Response:
        error = OpenAIError(
            f"the request body is larger than this server's limit of {self.limit} bytes "
            "(--max-request-bytes); send a shorter prompt",
            status=413,
            type="invalid_request_error",
        )
        return error_response(error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refusal()(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refusal()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def load_tokenizer(settings: ServeSettings) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(settings.base_model, revision=settings.revision)


async def start_serving(
    app: FastAPI,
    settings: ServeSettings,
    engine_factory: EngineFactory,
    tokenizer_factory: TokenizerFactory,
    request_stop: Callable[[], None],
) -> None:
    """Start the engine, then load every adapter; a bad adapter is refused and the rest are served.

    If the server cannot start (no such base model, an engine that fails), it stops with exit code 3 and the
    reason in its log: an API process left up would answer 503 for ever, and a supervisor restarts it."""
    try:
        registry = AdapterRegistry(  # first: it refuses a bad --adapters-dir at once
            base_model=settings.base_model,
            adapters_dir=settings.adapters_dir,
            max_lora_rank=settings.max_lora_rank,
            served_name=settings.model_id,
            allow_template_mismatch=settings.allow_template_mismatch,
        )
        tokenizer = await asyncio.to_thread(tokenizer_factory, settings)
        registry.tokenizer = tokenizer  # the template lock's fingerprint, worked out when first needed
        engine = await asyncio.to_thread(engine_factory, settings)  # ~30 s; /health answers 503 meanwhile
        app.state.engine = engine
        registry.base_config = engine.model_config.hf_config
        max_model_len = engine.model_config.max_model_len
        sources = settings.sources()
        models = ServedModels(
            engine=engine,
            registry=registry,
            model_id=settings.model_id,
            max_model_len=max_model_len,
            unload_timeout_s=settings.unload_timeout,
            sources=sources,
            # Only with a remote source: the cache's folder is locked to this process.
            cache=AdapterCache(settings.cache_dir(), settings.adapter_cache_size) if sources.remote else None,
            load_on_request=settings.load_on_request,
        )
        await models.start_tier_counts()
        app.state.metrics.watch_adapters(models.tiers, asyncio.get_running_loop())
        await models.add_adapters([parse_lora_option(value) for value in settings.lora])
        await models.refresh()
        serving = Serving(
            engine=engine,
            tokenizer=tokenizer,
            models=models,
            metrics=app.state.metrics,
            max_model_len=max_model_len,
            tool_calling=ToolCalling.from_settings(settings, tokenizer),
        )
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.exception("the server could not start")
        log.critical("stopping the server (exit code %d): %s", EXIT_START_FAILED, reason)
        app.state.startup_error = reason
        app.state.exit_code = EXIT_START_FAILED
        request_stop()
        return
    app.state.models = models
    app.state.serving = serving
    frozen = freeze_startup_heap()
    log.info("ready: %s with adapters %s", settings.model_id, ", ".join(registry.names()) or "(none)")
    log.info("garbage collector: %d start-up objects frozen", frozen)


ENGINE_CHECK_INTERVAL_S = 0.5


def stop_by_sigterm() -> None:
    signal.raise_signal(signal.SIGTERM)


async def watch_engine(app: FastAPI, request_stop: Callable[[], None]) -> None:
    """Stop the server with exit code 1 (app.state.exit_code) once the engine has died, so a supervisor
    (Docker's restart policy, systemd, Kubernetes) restarts it: a dead vLLM engine never recovers, and an
    API process that stayed up would answer 503 for ever."""
    while True:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        engine = app.state.engine
        if engine is not None and engine.errored:
            log.critical("the vLLM engine has died; stopping the server (exit code 1) so it can be restarted")
            app.state.exit_code = EXIT_ENGINE_DIED
            request_stop()
            return


def freeze_startup_heap() -> int:
    """Collect, then put every object alive now out of the garbage collector's reach (gc.freeze, through
    vLLM's own helper, which its OpenAI server calls at the same point); returns how many are frozen.

    Start-up leaves millions of long-lived objects in this process (torch, transformers, vLLM's client,
    the tokenizer), and every full collection walks them all: 300-400 ms pauses in this process under load,
    during which no stream advances (seen 2026-12-01 as a wave of 32 requests with 550-640 ms TTFT, 2-3x
    vLLM's server's p99, at concurrency 32 in bench.serve_vs_vllm).
    """
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()
    return gc.get_freeze_count()


def _bound_allowed_token_ids(schema: dict[str, Any], vocabulary: int) -> None:
    """vLLM's allowed_token_ids must be ids of this base's vocabulary (vLLM refuses others)."""
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        for option in schema["components"]["schemas"][request]["properties"]["allowed_token_ids"]["anyOf"]:
            if option.get("type") == "array":
                option["items"].update(maximum=vocabulary - 1)


def published_schema(app: FastAPI, settings: ServeSettings, tenants: Tenants) -> dict[str, Any]:
    """FastAPI's OpenAPI schema, made to tell the truth: no 422 (validation errors are 400s in OpenAI's
    shape, declared per route), bearer security only where this server asks for a key, and 429 only where
    a key has a rate limit."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        unused = {"apiKey"} if not settings.keys_required else set()
        if settings.admin_api_key is None:
            unused.add("adminKey")
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if not tenants.rate_limited:
                    operation.get("responses", {}).pop("429", None)
                security = [item for item in operation.get("security", []) if not set(item) & unused]
                if security:
                    operation["security"] = security
                else:
                    operation.pop("security", None)
        components = schema.get("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        for name in unused:
            components.get("securitySchemes", {}).pop(name, None)
        if not settings.enable_auto_tool_choice:
            _tools_without_parser(schema)
        serving = getattr(app.state, "serving", None)
        if serving is None:
            return schema  # the token-id bound is known once the engine is up; cache from then on
        _bound_token_ids(schema, len(serving.tokenizer))
        _bound_allowed_token_ids(schema, len(serving.tokenizer))
        app.openapi_schema = schema
    return app.openapi_schema


def _tools_without_parser(schema: dict[str, Any]) -> None:
    """Without --enable-auto-tool-choice tools are rendered, never called: tool_choice can only be "none",
    and tools need it (vLLM's default for a request with tools is "auto", which such a server refuses)."""
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    request["properties"]["tool_choice"] = {
        "anyOf": [{"const": "none"}, {"type": "null"}],
        "title": "Tool Choice",
    }
    request.setdefault("allOf", []).append(
        {
            "if": {"required": ["tools"], "properties": {"tools": {"type": "array"}}},
            "then": {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}},
        }
    )


def _bound_token_ids(schema: dict[str, Any], vocabulary: int) -> None:
    """Token-id prompts and the ids to detokenize must be ids of this base's vocabulary."""
    schemas = schema["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for option in prompt["anyOf"]:
        items = option.get("items", {})
        ids = items.get("items", items)  # [[int]] or [int]
        if ids.get("type") == "integer":
            ids.update(minimum=0, maximum=vocabulary - 1)
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"].update(minimum=0, maximum=vocabulary - 1)


def build_app(
    settings: ServeSettings,
    *,
    engine_factory: EngineFactory = build_engine,
    tokenizer_factory: TokenizerFactory = load_tokenizer,
    request_stop: Callable[[], None] = stop_by_sigterm,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The app; `request_stop` asks the HTTP server to shut down (the engine failed to start, or died);
    `clock` times the keys' rate limits."""
    metrics = ServerMetrics(max_loras=settings.max_loras)
    tenants = settings.tenants(clock)
    if settings.api_keys_file is not None:
        log.info("API keys of %d tenants: %s", len(tenants.keys), ", ".join(tenants.names))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.tenants = tenants
        app.state.metrics = metrics
        app.state.serving = None
        app.state.models = None
        app.state.engine = None
        app.state.startup_error = None
        app.state.exit_code = 0
        metrics_server = None
        if settings.metrics_port is not None:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(
                settings.metrics_port, addr=settings.host, registry=metrics.served
            )
            log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
        starting = asyncio.create_task(
            start_serving(app, settings, engine_factory, tokenizer_factory, request_stop)
        )
        watching = asyncio.create_task(watch_engine(app, request_stop))
        try:
            yield
        finally:
            for task in (starting, watching):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if app.state.serving is not None:
                app.state.serving.close()
            if app.state.models is not None and app.state.models.cache is not None:
                app.state.models.cache.close()  # its lock: another server may use the folder now
            if app.state.engine is not None:
                app.state.engine.shutdown()
            if metrics_server is not None:
                metrics_server.shutdown()

    # /docs and /openapi.json are routes of ours (serve/routes.py), behind the API key unless --public-docs.
    app = FastAPI(
        title="tuneserve",
        version=package_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(router)
    app.openapi = lambda: published_schema(app, settings, tenants)  # type: ignore[method-assign]
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer has the header, a 413 too

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return error_response(exc)

    @app.exception_handler(AdapterError)
    async def adapter_error(_: Request, exc: AdapterError) -> Response:
        error = OpenAIError(str(exc), status=exc.status, param="lora_name" if exc.status != 400 else None)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's own refusals (unknown route, wrong method, a body it cannot parse) in OpenAI's shape.
        error = OpenAIError(str(exc.detail), status=exc.status_code)
        response = error_response(error)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Response:
        return error_response(protocol.validation_error(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            body = OpenAIError("the engine has stopped; restart the server", status=503, type="server_error")
            return error_response(body)
        log.exception("unhandled error")
        error = OpenAIError(f"internal error: {type(exc).__name__}", status=500, type="internal_server_error")
        return error_response(error)

    return app
