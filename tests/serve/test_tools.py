"""Tool calling end to end: the tiny base with a LoRA adapter trained to call a weather tool
(tests/toolcalls.py), served with `--enable-auto-tool-choice --tool-call-parser hermes`, driven by the openai
SDK and by LangChain, and compared with vLLM's own OpenAI server on the same base, adapter and flags.

One module-scoped pair of servers (ours and vLLM's); the fake-engine tests of the same plumbing are in
test_http.py."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from pipeline.launch import ServerProcess, free_port
from tests.e2e import Server, engine_flags, start_server, stop_server
from tests.finetune.conftest import REPO_ROOT
from tests.toolcalls import TOOLS, WEATHER_QUESTION

pytestmark = pytest.mark.slow

ADAPTER = "tools"
PARSER_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
QUESTION = [{"role": "user", "content": WEATHER_QUESTION}]
# A tool the adapter never saw: naming it forces its call all the same (vLLM's grammar).
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_time"}}
GREEDY = {"temperature": 0.0, "max_tokens": 64}


@dataclass
class Servers:
    ours: Server
    vllm: ServerProcess


@pytest.fixture(scope="module")
def servers(
    tiny_base: Path, tool_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("tools")
    (root / "adapters").mkdir()
    lora = f"{ADAPTER}={tool_adapter}"
    ours = start_server(tiny_base, root / "adapters", root / "ours.log", "--lora", lora, *PARSER_FLAGS)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_base)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--generation-config", "vllm", *PARSER_FLAGS]
    command += ["--enable-lora", "--lora-modules", lora]
    command += engine_flags()
    theirs = ServerProcess("vllm", command, f"http://127.0.0.1:{port}", root / "vllm.log", cwd=REPO_ROOT)
    theirs.launch()
    try:
        ours.wait_ready(600)
        theirs.wait_ready(600)
        yield Servers(ours, theirs)
    finally:
        theirs.stop(grace_s=60)
        stop_server(ours)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def chat(url: str, **fields: Any) -> Any:
    body: dict[str, Any] = {"model": ADAPTER, "messages": QUESTION, "tools": TOOLS, **GREEDY, **fields}
    return client(url).chat.completions.create(**body)


def streamed(url: str, **fields: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """A stream's content, its tool calls put together from their deltas as the SDK's users do, and its
    finish_reason."""
    content, finish = "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chat(url, stream=True, **fields):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[index] for index in sorted(calls)], finish


def calls_of(completion: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (call.function.name, json.loads(call.function.arguments))
        for call in completion.choices[0].message.tool_calls or []
    ]


def test_the_adapter_calls_the_tool_plain_and_streamed(servers: Servers) -> None:
    completion = chat(servers.ours.url)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    ((name, arguments),) = calls_of(completion)
    # The adapter learnt the call's format and function, not to copy the city (tests/toolcalls.py).
    assert name == "get_weather" and isinstance(arguments.get("city"), str), arguments
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert "<tool_call>" not in (choice.message.content or "")

    content, calls, finish = streamed(servers.ours.url)
    assert finish == "tool_calls" and "<tool_call>" not in content
    ((streamed_call),) = calls
    assert streamed_call["id"] and streamed_call["name"] == "get_weather"
    assert json.loads(streamed_call["arguments"]) == arguments


def test_tool_choice_none_answers_in_text(servers: Servers) -> None:
    completion = chat(servers.ours.url, tool_choice="none")
    choice = completion.choices[0]
    assert not choice.message.tool_calls and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_required_and_named_tool_choice_force_a_call(servers: Servers) -> None:
    both = [*TOOLS, TIME_TOOL]
    required = chat(servers.ours.url, tools=both, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"
    assert calls_of(required) and all(name in ("get_weather", "get_time") for name, _ in calls_of(required))
    named = chat(servers.ours.url, tools=both, tool_choice=NAMED)
    assert named.choices[0].finish_reason == "stop"  # OpenAI's for a named function
    assert [name for name, _ in calls_of(named)] == ["get_time"]
    _, calls, finish = streamed(servers.ours.url, tools=both, tool_choice=NAMED)
    assert [call["name"] for call in calls] == ["get_time"] and finish == "stop"
    json.loads(calls[0]["arguments"])


def test_a_follow_up_turn_with_the_tool_result(servers: Servers) -> None:
    first = chat(servers.ours.url)
    (call,) = first.choices[0].message.tool_calls or []
    messages = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    answer = chat(servers.ours.url, messages=messages)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and answer.usage.prompt_tokens > first.usage.prompt_tokens


def test_ours_calls_tools_as_vllms_own_server(servers: Servers) -> None:
    both = [*TOOLS, TIME_TOOL]
    cases: list[dict[str, Any]] = [
        {},
        {"tool_choice": "required"},
        {"tool_choice": NAMED, "tools": both},
        {"tool_choice": "none"},
    ]
    for fields in cases:
        mine, theirs = chat(servers.ours.url, **fields), chat(servers.vllm.url, **fields)
        assert calls_of(mine) == calls_of(theirs), fields
        assert mine.choices[0].message.content == theirs.choices[0].message.content, fields
        assert mine.choices[0].finish_reason == theirs.choices[0].finish_reason, fields
        # Streamed: the same content, calls (ids are random) and finish_reason.
        assert _without_ids(streamed(servers.ours.url, **fields)) == _without_ids(
            streamed(servers.vllm.url, **fields)
        ), fields


def _without_ids(result: tuple[str, list[dict[str, Any]], str | None]) -> tuple[Any, ...]:
    content, calls, finish = result
    return content, [{key: value for key, value in call.items() if key != "id"} for call in calls], finish


def test_langchain_binds_tools_and_gets_structured_output(servers: Servers) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    model = ChatOpenAI(
        model=ADAPTER, base_url=f"{servers.ours.url}/v1", api_key="none", temperature=0, max_tokens=64
    )
    reply = model.bind_tools(TOOLS).invoke(WEATHER_QUESTION)
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"], reply
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str)

    class CityWeather(BaseModel):
        """The weather asked about."""

        city: str = Field(description="The city")

    # LangChain names the function and sends tool_choice for it; strict pins the arguments to the schema.
    structured = model.with_structured_output(CityWeather, method="function_calling", strict=True)
    result = structured.invoke(WEATHER_QUESTION)
    assert isinstance(result, CityWeather) and result.city
