"""POST /v1/responses on the real server (vLLM on CPU, the session's one server) through the official openai
SDK: text, streamed text, an adapter as the model, max_output_tokens cutting a response short, logprobs, and
the greedy text equal to the chat completion's and the engine's own for the same messages."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e import API_KEY, QUESTIONS, Reference, Server

pytestmark = pytest.mark.slow

TOKENS = 24  # engine_reference's greedy budget


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str, messages: list[Any]) -> tuple[str, str, int]:
    """The greedy chat completion's (text, finish_reason, completion tokens)."""
    response = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_completion_tokens=TOKENS
    )
    choice = response.choices[0]
    assert response.usage is not None
    return choice.message.content or "", choice.finish_reason, response.usage.completion_tokens


def test_greedy_text_is_the_chat_completions_and_the_engines(
    client: openai.OpenAI, server: Server, engine_reference: Reference
) -> None:
    for model, name in ((server.base_model, None), ("fmt", "fmt")):
        response = client.responses.create(
            model=model, input=QUESTIONS[0], temperature=0, max_output_tokens=TOKENS
        )
        assert response.output_text == engine_reference.texts[name][0]
        text, finish, tokens = chat(client, model, [{"role": "user", "content": QUESTIONS[0]}])
        assert response.output_text == text
        assert response.status == ("incomplete" if finish == "length" else "completed")
        assert response.model == model and response.id.startswith("resp_")
        assert response.usage is not None
        assert response.usage.input_tokens == len(engine_reference.prompts[0])
        assert response.usage.output_tokens == tokens
    # instructions and message items render as the chat's system and user messages.
    items: list[Any] = [{"role": "user", "content": [{"type": "input_text", "text": QUESTIONS[1]}]}]
    response = client.responses.create(
        model="caps",
        instructions="Answer briefly.",
        input=items,
        temperature=0,
        max_output_tokens=TOKENS,
    )
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[1]}]
    assert response.output_text == chat(client, "caps", messages)[0]


def test_max_output_tokens_leaves_the_response_incomplete_and_a_stop_completes_it(
    client: openai.OpenAI, server: Server
) -> None:
    short = client.responses.create(model="words", input=QUESTIONS[2], temperature=0, max_output_tokens=5)
    assert short.status == "incomplete"
    assert short.incomplete_details is not None and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage is not None and short.usage.output_tokens == 5
    assert short.output[0].status == "incomplete"  # type: ignore[union-attr]
    # Stopped by a stop string (vLLM's extra) taken from the text itself: complete, and shorter.
    longer = client.responses.create(model="words", input=QUESTIONS[2], temperature=0, max_output_tokens=20)
    stop = longer.output_text.strip()[3:6]
    assert stop
    done = client.responses.create(
        model="words", input=QUESTIONS[2], temperature=0, max_output_tokens=20, extra_body={"stop": [stop]}
    )
    assert done.status == "completed" and done.incomplete_details is None
    assert done.output[0].status == "completed"  # type: ignore[union-attr]
    assert stop not in done.output_text and longer.output_text.startswith(done.output_text)


def test_streamed_text_matches_and_the_sdks_stream_helper_follows(
    client: openai.OpenAI, server: Server
) -> None:
    # The base writes no EOS within 12 tokens: the response is cut short.
    body: dict[str, Any] = {"model": server.base_model, "input": QUESTIONS[0], "temperature": 0}
    body["max_output_tokens"] = 12
    whole = client.responses.create(**body)
    assert whole.status == "incomplete"
    kinds, deltas, final = [], [], None
    for event in client.responses.create(**body, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.incomplete":
            final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert "".join(deltas) == whole.output_text and len(deltas) > 1
    assert final is not None and final.output_text == whole.output_text
    assert final.usage is not None and final.usage == whole.usage
    # The SDK's helper needs response.completed: a response that a stop string ends.
    stop = whole.output_text[4:7]
    with client.responses.stream(**body, extra_body={"stop": [stop]}) as helper:
        texts = [event.delta for event in helper if event.type == "response.output_text.delta"]
        completed = helper.get_final_response()
    assert completed.status == "completed" and completed.output_text == "".join(texts)
    assert whole.output_text.startswith(completed.output_text)


def test_logprobs_through_include(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="caps",
        input=QUESTIONS[1],
        temperature=0,
        max_output_tokens=4,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    (part,) = response.model_dump()["output"][0]["content"]
    assert len(part["logprobs"]) == 4
    assert "".join(step["token"] for step in part["logprobs"]) == response.output_text
    assert all(len(step["top_logprobs"]) == 2 and step["logprob"] <= 0 for step in part["logprobs"])


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="fmt",
        input=QUESTIONS[0],
        temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema}},
    )
    data = json.loads(response.output_text)
    assert set(data) == {"name", "count"} and isinstance(data["count"], int)


def test_raw_stream_names_each_event_and_errors_keep_openais_shape(
    client: openai.OpenAI, server: Server
) -> None:
    body = {"model": "fmt", "input": "hi", "max_output_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", json=body, headers=headers, timeout=120
    ) as answer:
        assert answer.status_code == 200
        lines = [line for line in answer.iter_lines() if line]
    assert "data: [DONE]" not in lines
    for event_line, data_line in zip(lines[::2], lines[1::2], strict=True):
        assert event_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="fmt", input="hi", tools=[{"type": "web_search"}])
    assert refused.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
