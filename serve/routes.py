"""The HTTP layer: auth, parsing, and handing over to `Serving` and `ServedModels`, whose response models
become JSON and whose chunk iterators become server-sent events here; a client that goes away cancels its
request (`with_cancellation`)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, ParamSpec

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from vllm.version import __version__ as vllm_version

from serve import protocol
from serve.adapters import NAME_PATTERN
from serve.models import ServedModels
from serve.protocol import OpenAIError
from serve.responses_protocol import Response as ResponseObject
from serve.responses_protocol import ResponseEvent, ResponsesRequest
from serve.responses_serving import ResponsesServing
from serve.serving import Serving
from serve.settings import ServeSettings
from serve.tenants import Tenant, Tenants
from tuneserve import package_version

router = APIRouter()
P = ParamSpec("P")

# Answered to a client that went away before its answer was ready (nginx's "client closed request"); only the
# logs and metrics ever see it.
CLIENT_CLOSED_REQUEST = 499


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)


def with_cancellation(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """Cancel the handler when its client disconnects, so the engine stops generating for nobody (vLLM's
    decorator of the same name). The handler takes the request as `request`; FastAPI has read the body by
    then, so what arrives next is the disconnect. A stream's body runs after the handler returned, and
    Starlette ends it when the client goes away."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        request = kwargs["request"]
        assert isinstance(request, Request)
        handling = asyncio.ensure_future(handler(*args, **kwargs))
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([handling, disconnect], return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            handling.cancel()  # a no-op once it has finished; else the client went away (or the server stops)
        try:
            return await handling
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # Cancelling engine.generate() aborted the request inside vLLM.
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def respond(result: BaseModel | AsyncIterator[BaseModel]) -> Response:
    """A response model as JSON; chunks as server-sent events, ending with `[DONE]`."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(_events(result), media_type="text/event-stream")


async def _events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            # pydantic-core writes the JSON in one call (half the time of model_dump + json.dumps)
            yield f"data: {chunk.model_dump_json()}\n\n"
    except OpenAIError as exc:
        # Headers are gone already: report the error in-band, as OpenAI does.
        yield f"data: {json.dumps(exc.body())}\n\n"
    yield "data: [DONE]\n\n"


def respond_events(result: BaseModel | AsyncIterator[ResponseEvent]) -> Response:
    """A response object as JSON; Responses API events as server-sent events named by their type (OpenAI's
    framing for /v1/responses: `event:` and `data:` lines, no `[DONE]`)."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(_named_events(result), media_type="text/event-stream")


async def _named_events(events: AsyncIterator[ResponseEvent]) -> AsyncIterator[str]:
    async for event in events:
        yield f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
# dependency per request for work that never blocks.
async def get_settings(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


async def get_serving(request: Request) -> Serving:
    """The serving layer, once the engine is up; 503 before that or after the engine died."""
    serving: Serving | None = request.app.state.serving
    failure = request.app.state.startup_error
    if failure is not None:
        raise OpenAIError(f"the engine failed to start: {failure}", status=503, type="server_error")
    if serving is None:
        raise OpenAIError("the engine is still starting; retry shortly", status=503, type="server_error")
    if serving.engine.errored:
        raise OpenAIError("the engine has stopped; restart the server", status=503, type="server_error")
    return serving


async def get_responses(serving: Annotated[Serving, Depends(get_serving)]) -> ResponsesServing:
    return ResponsesServing(serving)


async def get_models(serving: Annotated[Serving, Depends(get_serving)]) -> ServedModels:
    return serving.models


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def get_tenants(request: Request) -> Tenants:
    tenants: Tenants = request.app.state.tenants
    return tenants


async def require_api_key(request: Request, tenants: Annotated[Tenants, Depends(get_tenants)]) -> None:
    """Authenticate the key (--api-key, --admin-api-key or one of --api-keys-file) and count the request
    against its rate limit; the key's tenant becomes `request.state.tenant` (None: the API is open)."""
    request.state.tenant = None
    if not tenants.required:
        return
    token = _bearer(request)
    tenant = tenants.authenticate(token) if token is not None else None
    if tenant is None:
        raise OpenAIError(
            "Incorrect API key provided; send it as 'Authorization: Bearer <key>'",
            status=401,
            type="authentication_error",
            code="invalid_api_key",
        )
    request.state.tenant = tenant
    wait = tenants.admit(tenant)
    if wait is not None:
        # Whole seconds, rounded up (the header's HTTP form); the openai SDK prefers retry-after-ms (OpenAI's
        # own header) and sleeps that long before its retry, so the retry is never refused again.
        seconds = max(1, math.ceil(wait))
        raise OpenAIError(
            f"Rate limit reached for '{tenant.name}': {tenant.rate_limit_rpm} requests per minute; "
            f"retry in {seconds} s",
            status=429,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(seconds), "retry-after-ms": str(math.ceil(wait * 1000))},
        )


def check_scope(request: Request, model: str) -> None:
    """404 for a model outside the key's scope: the very answer for a model that does not exist, so a tenant
    learns nothing of other tenants' adapters."""
    tenant: Tenant | None = getattr(request.state, "tenant", None)
    if tenant is not None and not tenant.allows(model):
        raise OpenAIError.model_not_found(model)


async def require_admin_key(
    request: Request, settings: Annotated[ServeSettings, Depends(get_settings)]
) -> None:
    if settings.admin_api_key is None:
        raise OpenAIError(
            "adapter management is disabled; start the server with --admin-api-key to enable it",
            status=403,
            type="permission_error",
        )
    token = _bearer(request)
    if token is None or not hmac.compare_digest(token, settings.admin_api_key.get_secret_value()):
        raise OpenAIError(
            "adapter management needs the admin API key as 'Authorization: Bearer <key>'",
            status=401,
            type="authentication_error",
            code="invalid_api_key",
        )


async def require_metrics_access(
    request: Request,
    settings: Annotated[ServeSettings, Depends(get_settings)],
    tenants: Annotated[Tenants, Depends(get_tenants)],
) -> None:
    if settings.metrics_port is not None:
        raise OpenAIError(f"metrics are served on port {settings.metrics_port}", status=404, code="not_found")
    if settings.public_metrics:
        return
    await require_api_key(request, tenants)
    tenant: Tenant | None = request.state.tenant
    if tenant is not None and not tenant.all_models:
        # The series are labelled with every model's name.
        raise OpenAIError(
            "metrics name every model served; they need a key whose models are '*'",
            status=403,
            type="permission_error",
        )


async def require_docs_access(
    request: Request,
    settings: Annotated[ServeSettings, Depends(get_settings)],
    tenants: Annotated[Tenants, Depends(get_tenants)],
) -> None:
    if not settings.public_docs:
        await require_api_key(request, tenants)


ServingDep = Annotated[Serving, Depends(get_serving)]
ModelsDep = Annotated[ServedModels, Depends(get_models)]
ResponsesDep = Annotated[ResponsesServing, Depends(get_responses)]
API_KEY = [Depends(require_api_key), Security(HTTPBearer(scheme_name="apiKey", auto_error=False))]
ADMIN_KEY = [Depends(require_admin_key), Security(HTTPBearer(scheme_name="adminKey", auto_error=False))]

_ERROR_MEANING = {
    400: "Invalid request; `error.param` names the field",
    401: "Missing or wrong bearer key",
    403: "Adapter management is disabled (no --admin-api-key), the path is outside the adapters dir, or "
    "/metrics asked with a key limited to some models",
    404: "Unknown model or adapter (or one outside the key's models), no adapter folder of that name, or a "
    "response id (none is stored)",
    409: "Adapter name taken, or an unload still waiting for requests",
    413: "Body over --max-request-bytes",
    429: "The key's rate limit (requests per minute) is reached; retry after Retry-After seconds",
    503: "Engine starting, failed or stopped",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all in OpenAI's error shape."""
    model = protocol.ErrorResponse
    return {status: {"model": model, "description": _ERROR_MEANING[status]} for status in statuses}


def generation_responses(
    model: type[BaseModel], *, named_events: bool = False
) -> dict[int | str, dict[str, Any]]:
    """A generation endpoint's responses: JSON, or with stream=true server-sent events (`named_events`: each
    with an `event` line naming its type, as /v1/responses sends them)."""
    # OpenAPI 3.2's itemSchema: one server-sent event (a `schema` would describe the whole stream).
    event: dict[str, Any] = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": "a chunk as JSON, or `[DONE]` last"}},
    }
    if named_events:
        event = {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "description": "the event's type, as in its `type` field"},
                "data": {"type": "string", "description": "the event as JSON"},
            },
        }
    stream = {"itemSchema": event}
    return {
        200: {"model": model, "content": {"text/event-stream": stream}, "description": "The completion"},
        **errors(400, 401, 404, 413, 429, 503),
    }


@router.get("/health", responses=errors(503))
async def health(request: Request) -> Response:
    """200 only when the engine can serve."""
    try:
        await get_serving(request)
    except OpenAIError as exc:
        return error_response(exc)
    return JSONResponse({"status": "ok"})


@router.get("/openapi.json", dependencies=[Depends(require_docs_access)], include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", dependencies=[Depends(require_docs_access)], include_in_schema=False)
async def docs(request: Request) -> Response:
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_access)],
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text: vLLM's `vllm:*` series, then tuneserve's per-model ones"},
        **errors(401, 403, 404, 429),
    },
)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(await request.app.state.metrics.render_async(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/models", dependencies=API_KEY, response_model=protocol.ModelList, responses=errors(401, 429, 503)
)
async def list_models(request: Request, models: ModelsDep) -> dict[str, Any]:
    listing = models.list_models()
    tenant: Tenant | None = request.state.tenant
    if tenant is not None:
        listing.data = [card for card in listing.data if tenant.allows(card.id)]
    return listing.model_dump()


@router.get(
    "/v1/models/{model:path}",
    dependencies=API_KEY,
    response_model=protocol.ModelCard,
    responses=errors(401, 404, 429, 503),
)
async def retrieve_model(model: str, request: Request, models: ModelsDep) -> dict[str, Any]:
    check_scope(request, model)
    return models.card(model).model_dump()


@router.post(
    "/v1/chat/completions",
    dependencies=API_KEY,
    response_model=None,
    responses=generation_responses(protocol.ChatCompletion),
)
@with_cancellation
async def chat_completions(
    body: protocol.ChatCompletionRequest, request: Request, serving: ServingDep
) -> Response:
    request.state.model = body.model
    check_scope(request, body.model)
    await serving.models.ensure(body.model)
    return respond(await serving.chat(body, request.state.request_id))


@router.post(
    "/v1/completions",
    dependencies=API_KEY,
    response_model=None,
    responses=generation_responses(protocol.Completion),
)
@with_cancellation
async def completions(body: protocol.CompletionRequest, request: Request, serving: ServingDep) -> Response:
    request.state.model = body.model
    check_scope(request, body.model)
    await serving.models.ensure(body.model)
    return respond(await serving.completions(body, request.state.request_id))


@router.post(
    "/v1/responses",
    dependencies=API_KEY,
    response_model=None,
    responses=generation_responses(ResponseObject, named_events=True),
)
@with_cancellation
async def create_response(body: ResponsesRequest, request: Request, responses: ResponsesDep) -> Response:
    """OpenAI's Responses API for text, made by the chat path (the same prompt, sampling and checks)."""
    request.state.model = body.model
    check_scope(request, body.model)
    await responses.serving.models.ensure(body.model)
    return respond_events(await responses.create(body, request.state.request_id))


@router.get(
    "/v1/responses/{response_id}",
    dependencies=API_KEY,
    response_model=ResponseObject,
    responses=errors(401, 404, 429, 503),
)
async def retrieve_response(response_id: str, responses: ResponsesDep) -> dict[str, Any]:
    """Always 404: responses are not stored (as in vLLM without VLLM_ENABLE_RESPONSES_API_STORE)."""
    return (await responses.retrieve(response_id)).model_dump()


# vLLM's tokenizer routes, outside /v1 as in vLLM; unlike vLLM's (which its key does not guard), they need the
# API key: they run on the tokenizer thread the generation routes wait for.
@router.post(
    "/tokenize",
    dependencies=API_KEY,
    response_model=protocol.TokenizeResponse,
    responses=errors(400, 401, 404, 413, 429, 503),
)
@with_cancellation
async def tokenize(body: protocol.TokenizeRequest, request: Request, serving: ServingDep) -> Response:
    """A prompt's token ids (`prompt`), or a chat's as the chat template renders it (`messages`)."""
    if body.model is not None:
        check_scope(request, body.model)
    return respond(await serving.tokenize(body))


@router.post(
    "/detokenize",
    dependencies=API_KEY,
    response_model=protocol.DetokenizeResponse,
    responses=errors(400, 401, 404, 413, 429, 503),
)
@with_cancellation
async def detokenize(body: protocol.DetokenizeRequest, request: Request, serving: ServingDep) -> Response:
    if body.model is not None:
        check_scope(request, body.model)
    return respond(await serving.detokenize(body))


@router.get("/version", response_model=protocol.VersionResponse)
async def version() -> dict[str, str]:
    """This server's version, and the vLLM it runs (vLLM's own server answers its version as `version`)."""
    return protocol.VersionResponse(version=package_version(), vllm_version=vllm_version).model_dump()


# The schema's copy of the rule serve.adapters enforces (with its own message).
NAME_SCHEMA_PATTERN = f"^{NAME_PATTERN.pattern}$"


class LoadAdapterRequest(BaseModel):
    """vLLM's body for /v1/load_lora_adapter; lora_path may be omitted (then: adapters dir / name)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN})
    lora_path: str | None = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # Any served name, also a source's URI (s3://..., org/name) that a request loaded.
    lora_name: str = Field(min_length=1, max_length=1024)


@router.post("/v1/load_lora_adapter", dependencies=ADMIN_KEY, responses=errors(400, 401, 403, 404, 409, 503))
async def load_adapter(body: LoadAdapterRequest, models: ModelsDep) -> dict[str, Any]:
    adapter = await models.load(body.lora_name, body.lora_path)
    return {
        "status": "loaded",
        "lora_name": adapter.name,
        "lora_path": str(adapter.path),
        "rank": adapter.rank,
    }


@router.post(
    "/v1/unload_lora_adapter", dependencies=ADMIN_KEY, responses=errors(400, 401, 403, 404, 409, 503)
)
async def unload_adapter(body: UnloadAdapterRequest, models: ModelsDep) -> dict[str, Any]:
    adapter = await models.remove_adapter(body.lora_name)
    return {"status": "unloaded", "lora_name": adapter.name}


class AliasToServed(BaseModel):
    """Point `alias` at `model`: the base or an adapter already served."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN})
    model: str = Field(min_length=1, max_length=1024)
    unload_previous: bool = True


class AliasToNewAdapter(BaseModel):
    """Load the adapter `lora_name` from `lora_path` (as /v1/load_lora_adapter does; without it, the adapters
    dir's folder of that name), then point `alias` at it."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN})
    lora_name: str = Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN})
    lora_path: str | None = None
    unload_previous: bool = True


@router.post("/v1/aliases", dependencies=ADMIN_KEY, responses=errors(400, 401, 403, 404, 409, 503))
async def set_alias(body: AliasToServed | AliasToNewAdapter, models: ModelsDep) -> dict[str, Any]:
    """Repoint an alias in one step: no request to it fails or sees a 404 while it moves. The previous
    target drains and is unloaded unless `unload_previous` is false or another alias points to it."""
    loading = isinstance(body, AliasToNewAdapter)
    target = body.lora_name if isinstance(body, AliasToNewAdapter) else body.model
    previous, adapter = await models.set_alias(
        body.alias,
        target,
        load=loading,
        lora_path=body.lora_path if isinstance(body, AliasToNewAdapter) else None,
        unload_previous=body.unload_previous,
    )
    return {
        "alias": body.alias,
        "model": target,
        "version": adapter.version if adapter is not None else None,
        "previous": previous,
    }


class Promotion(BaseModel):
    """Point `alias` at the served adapter `model`, on the word of a passing gate report that judged it."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(json_schema_extra={"pattern": NAME_SCHEMA_PATTERN})
    model: str = Field(min_length=1, max_length=1024)
    gate: dict[str, Any] = Field(
        description="the gate.json that `python -m client gate` or `bench --gate` wrote"
    )
    unload_previous: bool = True


@router.post(
    "/v1/lora_adapters/promote", dependencies=ADMIN_KEY, responses=errors(400, 401, 403, 404, 409, 503)
)
async def promote_adapter(body: Promotion, models: ModelsDep) -> dict[str, Any]:
    """An alias moves to a new version only if a passing gate report judged that version (its manifest's
    hash); otherwise 409 with the failing rules or the version the report judged."""
    previous, adapter = await models.promote(
        body.alias, body.model, body.gate, unload_previous=body.unload_previous
    )
    return {
        "alias": body.alias,
        "model": body.model,
        "version": adapter.version,
        "previous": previous,
        "results_sha256": body.gate.get("results_sha256"),
    }


@router.delete("/v1/aliases/{alias}", dependencies=ADMIN_KEY, responses=errors(401, 403, 404, 503))
async def delete_alias(alias: str, models: ModelsDep) -> dict[str, Any]:
    return {"alias": alias, "deleted": True, "model": await models.delete_alias(alias)}


@router.post("/v1/lora_adapters/refresh", dependencies=ADMIN_KEY, responses=errors(401, 403, 503))
async def refresh_adapters(models: ModelsDep) -> dict[str, Any]:
    """Serve adapter folders that appeared in --adapters-dir since start-up."""
    added = await models.refresh()
    return {"added": [a.name for a in added], "refused": [vars(r) for r in models.refused]}


@router.get("/v1/lora_adapters", dependencies=ADMIN_KEY, responses=errors(401, 403, 503))
async def adapter_status(models: ModelsDep) -> dict[str, Any]:
    """Served adapters, refused ones with the reason, and which adapter ids the engine holds in memory."""
    return await models.status()
