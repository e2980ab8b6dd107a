"""Route-level properties of the HTTP layer that the end-to-end tests cannot see."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute

from serve.routes import router


def _dependency_calls(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _dependency_calls(sub)


def test_every_endpoint_and_dependency_runs_on_the_event_loop() -> None:
    # FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread hop (and GIL hand-off
    # with the engine's output handler) per request for work that never blocks; three such dependencies were
    # part of the extra API-process CPU per request that bench/serve_vs_vllm showed against vLLM's server.
    checked = 0
    for route in router.routes:
        assert isinstance(route, APIRoute)
        for call in [route.endpoint, *_dependency_calls(route.dependant)]:
            # A callable object (fastapi.security's HTTPBearer) counts by its __call__, as FastAPI does.
            is_async = inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)
            name = getattr(call, "__qualname__", type(call).__qualname__)
            assert is_async, f"{route.path}: {name} is not async"
            checked += 1
    assert checked > len(router.routes)  # the dependencies were walked, not only the endpoints


def test_freeze_startup_heap_puts_live_objects_out_of_the_collectors_reach() -> None:
    import gc

    from serve.app import freeze_startup_heap

    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def _schema(**settings: Any) -> dict[str, Any]:
    from serve.app import build_app
    from serve.settings import ServeSettings

    return build_app(ServeSettings(base_model="base", **settings)).openapi()


def test_published_schema_describes_what_the_server_answers() -> None:
    schema = _schema(api_key="k", admin_api_key="a")
    text = str(schema)
    # Validation errors are 400s in OpenAI's shape: FastAPI's 422 never leaves this server.
    assert "'422'" not in text and "HTTPValidationError" not in text
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletion"
    }
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert chat["security"] == [{"apiKey": []}]
    assert schema["paths"]["/v1/load_lora_adapter"]["post"]["security"] == [{"adminKey": []}]
    assert set(schema["components"]["securitySchemes"]) == {"apiKey", "adminKey"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # The limits sampling_params enforces are published.
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    # (beside anyOf for optional fields: JSON Schema applies minimum/maximum to numbers only, null passes)
    assert (fields["temperature"]["minimum"], fields["temperature"]["maximum"]) == (0, 2)
    assert (fields["n"]["minimum"], fields["n"]["maximum"]) == (1, 128)
    load = schema["components"]["schemas"]["LoadAdapterRequest"]["properties"]["lora_name"]
    assert load["pattern"] == "^[A-Za-z0-9._-]{1,64}$"


def test_schema_has_no_security_where_no_key_is_asked() -> None:
    schema = _schema()
    assert "security" not in schema["paths"]["/v1/chat/completions"]["post"]
    assert not schema.get("components", {}).get("securitySchemes")


def test_integer_fields_take_json_integers_only() -> None:
    # JSON Schema's integer, which the published schema says: 2.0 is one, 2.5, "2" and true are not.
    import pytest
    from pydantic import ValidationError

    from serve.protocol import ChatCompletionRequest, CompletionRequest

    for model in (ChatCompletionRequest, CompletionRequest):
        base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
        for field in ("n", "max_tokens", "seed"):
            for refused in (2.5, "2", True, float("inf"), float("nan")):
                with pytest.raises(ValidationError):
                    model.model_validate({**base, field: refused})
            for accepted in (2, 2.0):
                value = getattr(model.model_validate({**base, field: accepted}), field)
                assert value == 2 and type(value) is int
