"""POST /v1/responses in-process on the fake engine and tokenizer of test_http.py: the openai SDK's own
`responses.create` and `responses.stream` parse what the server sends, the stream's events come in OpenAI's
order, a response's prompt is the chat's for the same messages, refusals name the response request's
fields, and disconnects abort. The real engine's end-to-end tests are in test_responses_e2e.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from serve import protocol, responses_protocol
from serve.responses_protocol import ResponsesRequest
from serve.settings import ServeSettings
from tests.serve.test_http import (
    ANSWER,
    CHAT,
    Running,
    _no_heap_freeze,  # noqa: F401  (autouse fixture)
    metric,
    send_then_disconnect,
    serving_app,
)

BODY = {"model": "base", "input": "hi"}
EVENTS = TypeAdapter(ResponseStreamEvent)


def sdk(running: Running, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The openai SDK on the in-process app."""
    transport = httpx2.ASGITransport(app=running.app)  # the openai SDK's HTTP client is httpx2
    http = httpx2.AsyncClient(transport=transport, base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http, max_retries=0)


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A Responses stream's server-sent events as (event line, parsed data)."""
    parsed = []
    for block in text.split("\n\n"):
        if not block:
            continue
        event_line, data_line = block.split("\n")
        parsed.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return parsed


def test_sdk_reads_a_text_response() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            client = sdk(running)
            response = await client.responses.create(
                model="base", input="hi", instructions="be brief", metadata={"run": "7"}, user="u1"
            )
            assert isinstance(response, Response)
            assert response.id.startswith("resp_") and response.object == "response"
            assert response.output_text == ANSWER.decode()
            (message,) = response.output
            assert message.type == "message" and message.role == "assistant"
            assert message.id.startswith("msg_")
            assert [part.type for part in message.content] == ["output_text"]
            # The fake engine always stops at its token budget: incomplete, as max_output_tokens cuts.
            assert response.status == "incomplete" and message.status == "incomplete"
            assert response.incomplete_details is not None
            assert response.incomplete_details.reason == "max_output_tokens"
            assert response.instructions == "be brief" and response.metadata == {"run": "7"}
            assert response.user == "u1" and response.model == "base"
            prompt, _ = running.engine.received[-1]
            assert response.usage is not None
            assert response.usage.input_tokens == len(prompt)
            assert response.usage.output_tokens == len(ANSWER)
            assert response.usage.total_tokens == len(prompt) + len(ANSWER)

    asyncio.run(scenario())


def test_the_response_is_the_chat_completion_of_the_same_messages() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            items = [
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
                {"role": "user", "content": "c"},
            ]
            body = {**BODY, "input": items, "instructions": "sys", "temperature": 0.5, "top_p": 0.5}
            body |= {"max_output_tokens": 7, "top_k": 3, "seed": 11}
            assert (await running.client.post("/v1/responses", json=body)).status_code == 200
            chat = {
                "model": "base",
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "developer", "content": "rules"},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
                "temperature": 0.5,
                "top_p": 0.5,
                "max_completion_tokens": 7,
                "top_k": 3,
                "seed": 11,
            }
            assert (await running.client.post("/v1/chat/completions", json=chat)).status_code == 200
            (response_prompt, response_params), (chat_prompt, chat_params) = running.engine.received
            assert response_prompt == chat_prompt
            assert repr(response_params) == repr(chat_params)
            assert response_params.max_tokens == 7 and response_params.top_k == 3

    asyncio.run(scenario())


def test_stream_sends_openais_events_in_order_and_the_sdk_follows_them() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            answer = await running.client.post("/v1/responses", json={**BODY, "stream": True})
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            stream = events(answer.text)
            for name, data in stream:
                assert name == data["type"]
                EVENTS.validate_python(data)  # each is one of the SDK's event types
            names = [name for name, _ in stream]
            deltas = ["response.output_text.delta"] * len(ANSWER)
            assert names == [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                *deltas,
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete",  # cut by max tokens; response.completed otherwise
            ]
            assert [data["sequence_number"] for _, data in stream] == list(range(len(stream)))
            datas = [data for _, data in stream]
            assert datas[0]["response"]["status"] == "in_progress" and datas[0]["response"]["output"] == []
            text = "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta")
            assert text == ANSWER.decode() == datas[-4]["text"]
            final = datas[-1]["response"]
            assert final["id"] == datas[0]["response"]["id"]
            assert final["output"] == [datas[-2]["item"]]
            assert final["output"][0]["id"] == datas[2]["item"]["id"]
            assert final["usage"]["output_tokens"] == len(ANSWER)

            client = sdk(running)
            async with client.responses.stream(model="base", input="hi") as helper:
                seen = [event.type async for event in helper]
            assert seen[-1] == "response.incomplete"
            streamed = await client.responses.create(model="base", input="hi", stream=True)
            pieces = [e.delta async for e in streamed if e.type == "response.output_text.delta"]
            assert "".join(pieces) == ANSWER.decode()

    asyncio.run(scenario())


def test_json_and_stream_report_the_same_usage_and_text() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            whole = (await running.client.post("/v1/responses", json=BODY)).json()
            streamed = await running.client.post("/v1/responses", json={**BODY, "stream": True})
            final = events(streamed.text)[-1][1]["response"]
            assert final["usage"] == whole["usage"]
            assert final["output"][0]["content"] == whole["output"][0]["content"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"model": "nope"}, 404, "model", "does not exist"),
        ({"input": []}, 400, "input", "at least one message"),
        (
            {"input": [{"type": "function_call_output", "output": "1"}]},
            400,
            "input[0]",
            "function_call_output",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0]", "role must be one of"),
        ({"input": [{"role": "user"}]}, 400, "input[0].content", "content"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            400,
            "input[0].content[0]",
            "image",
        ),
        ({"tools": [{"type": "function", "name": "f"}]}, 400, "tools", "tools"),
        ({"tool_choice": "required"}, 400, "tool_choice", "tool_choice"),
        ({"previous_response_id": "resp_1"}, 404, "previous_response_id", "not stored"),
        ({"background": True}, 400, "background", "stored"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning", "reasoning"),
        ({"truncation": "auto"}, 400, "truncation", "never truncated"),
        ({"text": {"verbosity": "low"}}, 400, "text.verbosity", "verbosity"),
        ({"conversation": "conv_1"}, 400, "conversation", "not stored"),
        ({"prompt": {"id": "pmpt_1"}}, 400, "prompt", "prompt templates"),
        ({"moderation": {"enabled": True}}, 400, "moderation", "moderation"),
        ({"include": ["nonsense"]}, 400, "include[0]", "include"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", "16"),
        ({"temperature": 3}, 400, "temperature", "temperature"),
        ({"top_logprobs": 21}, 400, "top_logprobs", "from 0 to 20"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens", "max_output_tokens must be at least 1"),
        ({"max_output_tokens": 10**6}, 400, "max_output_tokens", "max_output_tokens asks for"),
        ({"top_k": "many"}, 400, "top_k", "top_k"),
        ({"logit_bias": {"5": 1}}, 400, "logit_bias", "logit_bias"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format", "schema"),
    ],
)
def test_refusals_name_the_response_requests_field(
    body: dict[str, Any], status: int, param: str, says: str
) -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            answer = await running.client.post("/v1/responses", json={**BODY, **body})
            assert answer.status_code == status, answer.text
            error = answer.json()["error"]
            assert error["param"] == param, error
            assert says in error["message"], error
            assert "messages" not in error["message"] and "max_completion_tokens" not in error["message"]
            assert not running.engine.started

    asyncio.run(scenario())


def test_a_chat_refusal_names_the_input_item_after_instructions() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            items = [{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}]
            payload = json.dumps({**BODY, "instructions": "s", "input": items}).encode()  # \ud800 escaped
            answer = await running.client.post(
                "/v1/responses", content=payload, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "input[1].content"

    asyncio.run(scenario())


def test_store_is_accepted_but_nothing_is_kept() -> None:
    # As vLLM without VLLM_ENABLE_RESPONSES_API_STORE: store=true (OpenAI's default) answers, nothing is kept.
    async def scenario() -> None:
        async with serving_app() as running:
            created = await running.client.post("/v1/responses", json={**BODY, "store": True})
            assert created.status_code == 200 and created.json()["store"] is False
            kept = await running.client.get(f"/v1/responses/{created.json()['id']}")
            assert kept.status_code == 404 and kept.json()["error"]["param"] == "response_id"
            with pytest.raises(openai.NotFoundError):
                await sdk(running).responses.retrieve(created.json()["id"])

    asyncio.run(scenario())


def test_response_id_follows_the_request_id_header() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            answer = await running.client.post("/v1/responses", json=BODY, headers={"x-request-id": "abc123"})
            assert answer.json()["id"] == "resp_abc123" and answer.headers["x-request-id"] == "abc123"

    asyncio.run(scenario())


def test_routes_need_the_api_key() -> None:
    async def scenario() -> None:
        async with serving_app(ServeSettings(base_model="base", api_key="k")) as running:
            assert (await running.client.post("/v1/responses", json=BODY)).status_code == 401
            assert (await running.client.get("/v1/responses/resp_1")).status_code == 401
            with pytest.raises(openai.AuthenticationError):
                await sdk(running, api_key="wrong").responses.create(model="base", input="hi")
            assert (await sdk(running, api_key="k").responses.create(model="base", input="hi")).output_text

    asyncio.run(scenario())


def test_stream_error_arrives_as_an_error_event_then_response_failed() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.refuse = ValueError("prompt too long for the engine")
            answer = await running.client.post("/v1/responses", json={**BODY, "stream": True})
            assert answer.status_code == 200
            stream = events(answer.text)
            names = [name for name, _ in stream]
            assert names[-2:] == ["error", "response.failed"]
            error = stream[-2][1]
            assert "too long" in error["message"]
            failed = stream[-1][1]["response"]
            assert failed["status"] == "failed" and "too long" in failed["error"]["message"]
            for _, data in stream:
                EVENTS.validate_python(data)

    asyncio.run(scenario())


def test_client_gone_aborts_the_engine_request() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.hold = asyncio.Event()  # never set: generation waits for ever
            gone = asyncio.Event()
            call = asyncio.create_task(send_then_disconnect(running.app, "/v1/responses", BODY, gone))
            await running.wait_until(lambda: bool(running.engine.started), "generation starts")
            gone.set()
            sent = await asyncio.wait_for(call, 5)
            assert sent[0]["status"] == 499
            assert running.engine.aborted == running.engine.started

    asyncio.run(scenario())


def test_client_gone_mid_stream_aborts_the_engine_request() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.hold, running.engine.hold_after = asyncio.Event(), 2
            gone = asyncio.Event()
            body = {**BODY, "stream": True}
            call = asyncio.create_task(send_then_disconnect(running.app, "/v1/responses", body, gone))
            await running.wait_until(lambda: bool(running.engine.started), "generation starts")
            await asyncio.sleep(0.1)
            gone.set()
            sent = await asyncio.wait_for(call, 5)
            assert sent[0]["status"] == 200
            streamed = b"".join(m.get("body", b"") for m in sent[1:])
            assert b'"delta":"h"' in streamed and b"response.output_text.done" not in streamed
            await running.wait_until(lambda: running.engine.aborted == running.engine.started, "abort")

    asyncio.run(scenario())


def test_metrics_count_responses_by_model_and_route() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            for model, status in (("base", 200), ("nope", 404)):
                answer = await running.client.post("/v1/responses", json={**BODY, "model": model})
                assert answer.status_code == status
            text = (await running.client.get("/metrics")).text
            for label, code in (("base", "200"), ("unknown", "404")):
                count = metric(
                    text, "tuneserve_requests_total", model=label, endpoint="/v1/responses", status=code
                )
                assert count == 1
            assert metric(text, "tuneserve_generation_tokens_total", model="base") == len(ANSWER)

    asyncio.run(scenario())


def test_published_schema_has_the_routes() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            schema = (await running.client.get("/openapi.json")).json()
            create = schema["paths"]["/v1/responses"]["post"]
            assert set(create["responses"]) == {"200", "400", "401", "404", "413", "503"}
            assert "text/event-stream" in create["responses"]["200"]["content"]
            assert "/v1/responses/{response_id}" in schema["paths"]
            request = schema["components"]["schemas"]["ResponsesRequest"]
            assert request["required"] == ["model", "input"]

    asyncio.run(scenario())


def test_every_field_of_vllms_and_openais_request_has_a_policy() -> None:
    # A vLLM or openai upgrade that adds a request field fails here until it is served, refused or ignored.
    from openai.types.responses.response_create_params import ResponseCreateParamsBase
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VLLMResponsesRequest

    placed = (
        set(ResponsesRequest.model_fields)
        | set(responses_protocol.VLLM_EXTRAS)
        | set(responses_protocol.REFUSED_EXTRAS)
        | set(responses_protocol.IGNORED_FIELDS)
    )
    assert set(VLLMResponsesRequest.model_fields) - placed == set()
    assert set(ResponseCreateParamsBase.__annotations__) - placed == set()


def test_every_vllm_extra_handed_to_the_chat_is_applied_or_refused_there() -> None:
    # A forwarded name the chat request did not know would be dropped without a word.
    chat_known = (
        set(protocol.ChatCompletionRequest.model_fields) | set(protocol._UNSERVED_EXTRAS) | {"logit_bias"}
    )
    assert set(responses_protocol.VLLM_EXTRAS) - chat_known == set()


def test_unknown_model_is_the_chats_404_before_any_other_refusal() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            body = {"model": "nope", "input": [], "tools": [{"type": "web_search"}]}
            response = await running.client.post("/v1/responses", json=body)
            chat = await running.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            assert response.status_code == 404 and response.json() == chat.json()

    asyncio.run(scenario())
