"""The HTTP layer in-process on a fake engine and tokenizer: disconnects abort, an engine that dies or never
starts stops the server with its exit code, stream errors arrive in-band, metrics count, and /health answers
while a prompt is being tokenized. The real engine's end-to-end tests are in test_server_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import vllm
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from serve import app as app_module
from serve.__main__ import main
from serve.app import EXIT_ENGINE_DIED, EXIT_START_FAILED, build_app
from serve.settings import ServeSettings
from tuneserve import package_version

ANSWER = b"hello"
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


class FakeTokenizer:
    """Bytes are tokens (256 of them), after `bos` where set and special tokens are asked for; `gate`, when
    set, holds every tokenization until it opens."""

    chat_template = "{{ messages }}"
    eos_token_id = 0

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.bos: int | None = None

    def __len__(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> str:
        header = "<assistant>" if add_generation_prompt else ""
        shown = f"<tools>{json.dumps(tools)}</tools>" if tools else ""
        turns = "".join(
            f"<{m['role']}>{m['content']}" + (json.dumps(m["tool_calls"]) if "tool_calls" in m else "")
            for m in messages
        )
        return shown + turns + header

    def __call__(self, text: str, *, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the tokenizer's gate"
        special = [self.bos] if self.bos is not None and add_special_tokens else []
        return {"input_ids": special + list(text.encode("latin-1"))}

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("latin-1")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]


@dataclass
class FakeEngine:
    """Answers ANSWER, token by token for streams; `hold` blocks generation after `hold_after` tokens;
    `refuse` makes generate raise vLLM's kind of input error. Records started and aborted request ids."""

    errored: bool = False
    hold: asyncio.Event | None = None
    hold_after: int = 0
    refuse: Exception | None = None
    started: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    received: list[tuple[list[int], Any]] = field(default_factory=list)  # (prompt ids, sampling params)
    answer: bytes = ANSWER
    finish_reason: str = "length"
    model_config: Any = field(default_factory=lambda: SimpleNamespace(hf_config=None, max_model_len=256))

    async def generate(
        self, prompt: Any, params: Any, request_id: str, *, lora_request: Any
    ) -> AsyncGenerator[Any, None]:
        self.started.append(request_id)
        self.received.append((list(prompt["prompt_token_ids"]), params))
        if self.refuse is not None:
            raise self.refuse
        delta = params.output_kind.name == "DELTA"
        finished = False
        try:
            for count in range(1, len(self.answer) + 1):
                if self.hold is not None and count > self.hold_after:
                    await self.hold.wait()
                finished = count == len(self.answer)
                if delta or finished:
                    tokens = list(self.answer[count - 1 : count] if delta else self.answer)
                    yield _output(prompt["prompt_token_ids"], tokens, params.n, finished, self.finish_reason)
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def add_lora(self, lora_request: Any) -> bool:
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return True

    async def list_loras(self) -> set[int]:
        return set()

    async def collective_rpc(self, method: str, timeout: float | None = None, **_: Any) -> list[Any]:
        return [None]  # as a worker without LoRA answers the adapter tiers' RPC

    def shutdown(self) -> None:
        pass


def _output(prompt_ids: list[int], tokens: list[int], n: int, finished: bool, finish_reason: str) -> Any:
    completions = [
        SimpleNamespace(
            index=index,
            text=bytes(tokens).decode("latin-1"),
            token_ids=tokens,
            logprobs=None,
            finish_reason=finish_reason if finished else None,
        )
        for index in range(n)
    ]
    return SimpleNamespace(
        outputs=completions,
        finished=finished,
        prompt_token_ids=prompt_ids,
        prompt_logprobs=None,
        metrics=None,  # vLLM's request stats: none here
    )


@dataclass
class Running:
    app: FastAPI
    engine: FakeEngine
    tokenizer: FakeTokenizer
    client: httpx.AsyncClient
    stops: list[str]

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"timed out waiting until {what}")


@contextlib.asynccontextmanager
async def running_app(
    engine_factory: Callable[[ServeSettings], Any] | None = None, settings: ServeSettings | None = None
) -> AsyncIterator[Running]:
    """The app of `build_app` with its lifespan running, and an httpx client on it (no sockets)."""
    engine, tokenizer, stops = FakeEngine(), FakeTokenizer(), []
    app = build_app(
        settings or ServeSettings(base_model="base"),
        engine_factory=engine_factory or (lambda _: engine),
        tokenizer_factory=lambda _: tokenizer,
        request_stop=lambda: stops.append("stop"),
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Running(app, engine, tokenizer, client, stops)


@contextlib.asynccontextmanager
async def serving_app(settings: ServeSettings | None = None) -> AsyncIterator[Running]:
    async with running_app(settings=settings) as running:
        await running.wait_until(lambda: running.app.state.serving is not None, "the app serves")
        yield running


@pytest.fixture(autouse=True)
def _no_heap_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    # gc.freeze would keep this test process's objects out of the collector for the rest of the session.
    monkeypatch.setattr(app_module, "freeze_startup_heap", lambda: 0)


async def send_then_disconnect(
    app: FastAPI, path: str, body: dict[str, Any], disconnect: asyncio.Event
) -> list[dict[str, Any]]:
    """Call the app as an ASGI server would for a client that goes away once `disconnect` is set; the
    messages the app sent. (httpx's ASGITransport only reports a disconnect after the response.)"""
    payload = json.dumps(body).encode()
    incoming = [{"type": "http.request", "body": payload, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return sent


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in /metrics")


# -- start-up and the engine's death ------------------------------------------------------------------


def test_health_is_503_until_ready_then_200() -> None:
    async def scenario() -> None:
        release = threading.Event()
        engine = FakeEngine()

        def slow_engine(_: ServeSettings) -> FakeEngine:
            assert release.wait(10)
            return engine

        async with running_app(slow_engine) as running:
            starting = await running.client.get("/health")
            assert starting.status_code == 503 and "still starting" in starting.json()["error"]["message"]
            release.set()
            await running.wait_until(lambda: running.app.state.serving is not None, "ready")
            assert (await running.client.get("/health")).json() == {"status": "ok"}

    asyncio.run(scenario())


def test_engine_that_cannot_start_stops_the_server_with_exit_code_3(caplog: pytest.LogCaptureFixture) -> None:
    # It used to stay up answering 503 for ever; a supervisor restarts a server that exits.
    def failing_engine(_: ServeSettings) -> FakeEngine:
        raise RuntimeError("not enough memory for the KV cache")

    async def scenario() -> None:
        async with running_app(failing_engine) as running:
            await running.wait_until(lambda: running.stops == ["stop"], "the server is asked to stop")
            assert running.app.state.exit_code == EXIT_START_FAILED == 3
            health = await running.client.get("/health")
            assert health.status_code == 503
            assert "failed to start: RuntimeError: not enough memory" in health.json()["error"]["message"]

    asyncio.run(scenario())
    assert "stopping the server (exit code 3): RuntimeError: not enough memory" in caplog.text


def test_dead_engine_turns_health_503_and_stops_the_server_with_exit_code_1() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.errored = True
            health = await running.client.get("/health")
            assert health.status_code == 503 and "engine has stopped" in health.json()["error"]["message"]
            assert (await running.client.post("/v1/chat/completions", json=CHAT)).status_code == 503
            await running.wait_until(lambda: running.stops == ["stop"], "the server is asked to stop")
            assert running.app.state.exit_code == EXIT_ENGINE_DIED == 1

    asyncio.run(scenario())


def test_base_model_folder_that_is_not_there_is_refused_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--base-model", str(tmp_path / "missing")]) == 2
    assert "error: --base-model: no folder" in capsys.readouterr().err


@pytest.mark.slow
def test_server_process_exits_3_with_the_reason_when_the_base_cannot_load(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "serve", "--base-model", str(empty), "--port", "0", "--host", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "stopping the server (exit code 3): " in done.stderr


# -- requests -------------------------------------------------------------------------------------------


def test_health_answers_while_a_prompt_is_being_tokenized() -> None:
    # A long prompt takes seconds to tokenize; on the event loop it stalled every request, /health included.
    async def scenario() -> None:
        async with serving_app() as running:
            running.tokenizer.gate = threading.Event()
            body = {"model": "base", "prompt": "tokenize me"}
            completion = asyncio.create_task(running.client.post("/v1/completions", json=body))
            await running.wait_until(running.tokenizer.entered.is_set, "the tokenizer is busy")
            health = await asyncio.wait_for(running.client.get("/health"), 5)
            assert health.status_code == 200 and not completion.done()
            running.tokenizer.gate.set()
            answer = await completion
            assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == ANSWER.decode()

    asyncio.run(scenario())


def test_unknown_model_is_the_same_404_everywhere() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            chat = await running.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            card = await running.client.get("/v1/models/nope")
            for response in (chat, card):
                assert response.status_code == 404
                assert response.json()["error"]["code"] == "model_not_found"
            assert chat.json() == card.json()
            assert (await running.client.get("/v1/models/base")).json()["id"] == "base"

    asyncio.run(scenario())


def test_json_and_stream_report_the_same_usage() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            body = {"model": "base", "prompt": "abc"}
            whole = (await running.client.post("/v1/completions", json=body)).json()
            assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            response = await running.client.post("/v1/completions", json=streamed)
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(event) for event in events[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ANSWER.decode()
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    asyncio.run(scenario())


def test_stream_error_arrives_in_band_after_the_headers() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.refuse = ValueError("prompt too long for the engine")
            response = await running.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["type"] == "invalid_request_error" and "too long" in error["message"]
            # Without a stream the same refusal is a 400.
            plain = await running.client.post("/v1/chat/completions", json=CHAT)
            assert plain.status_code == 400 and "too long" in plain.json()["error"]["message"]

    asyncio.run(scenario())


def test_client_gone_before_the_answer_aborts_the_engine_request() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.hold = asyncio.Event()  # never set: generation waits for ever
            gone = asyncio.Event()
            call = asyncio.create_task(send_then_disconnect(running.app, "/v1/chat/completions", CHAT, gone))
            await running.wait_until(lambda: bool(running.engine.started), "generation starts")
            gone.set()
            sent = await asyncio.wait_for(call, 5)
            assert sent[0]["status"] == 499
            assert running.engine.aborted == running.engine.started
            metrics = (await running.client.get("/metrics")).text
            assert metric(metrics, "tuneserve_requests_aborted_total", model="base") == 1
            assert metric(metrics, "tuneserve_requests_total", status="499") == 1

    asyncio.run(scenario())


def test_client_gone_mid_stream_aborts_the_engine_request() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.engine.hold, running.engine.hold_after = asyncio.Event(), 2
            gone = asyncio.Event()
            body = {"model": "base", "prompt": "abc", "stream": True}
            call = asyncio.create_task(send_then_disconnect(running.app, "/v1/completions", body, gone))
            await running.wait_until(lambda: bool(running.engine.started), "generation starts")
            await asyncio.sleep(0.1)
            gone.set()
            sent = await asyncio.wait_for(call, 5)
            assert sent[0]["status"] == 200
            streamed = b"".join(m.get("body", b"") for m in sent[1:])
            assert b'"text":"h"' in streamed and b"[DONE]" not in streamed
            await running.wait_until(lambda: running.engine.aborted == running.engine.started, "abort")

    asyncio.run(scenario())


def test_metrics_count_answers_and_tokens_by_model() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            for model, status in (("base", 200), ("nope", 404)):
                answer = await running.client.post("/v1/completions", json={"model": model, "prompt": "ab"})
                assert answer.status_code == status
            text = (await running.client.get("/metrics")).text
            ok = {"model": "base", "endpoint": "/v1/completions", "status": "200"}
            assert metric(text, "tuneserve_requests_total", **ok) == 1
            # A model nobody serves is not a label of its own (clients would grow /metrics without bound).
            assert metric(text, "tuneserve_requests_total", model="unknown", status="404") == 1
            assert metric(text, "tuneserve_prompt_tokens_total", model="base") == 2
            assert metric(text, "tuneserve_generation_tokens_total", model="base") == len(ANSWER)

    asyncio.run(scenario())


def test_max_tokens_past_the_context_stop_at_the_context_as_in_vllm() -> None:
    # vLLM answers 200 and stops generating at the context; lm-eval sends such requests.
    async def scenario() -> None:
        async with serving_app() as running:
            body = {"model": "base", "prompt": "x" * 250, "max_tokens": 100}
            assert (await running.client.post("/v1/completions", json=body)).status_code == 200
            chat = {**CHAT, "max_completion_tokens": 256}
            assert (await running.client.post("/v1/chat/completions", json=chat)).status_code == 200
            room = [256 - len(prompt) for prompt, _ in running.engine.received]
            assert [params.max_tokens for _, params in running.engine.received] == room
            assert room[0] == 6
            # Still 400s, naming the lengths: a prompt that fills the context, and max_tokens over all of it.
            for too_long in ({**body, "prompt": "x" * 256}, {**body, "max_tokens": 257}):
                refused = await running.client.post("/v1/completions", json=too_long)
                assert refused.status_code == 400, refused.text
                assert "maximum context length is 256 tokens" in refused.json()["error"]["message"]

    asyncio.run(scenario())


# -- vLLM's tokenizer routes, /version and X-Request-Id ------------------------------------------------------


def test_tokenize_and_detokenize_answer_as_vllm_does() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            running.tokenizer.bos = 1
            text = await running.client.post("/tokenize", json={"model": "base", "prompt": "ab"})
            assert text.json() == {
                "count": 3,
                "max_model_len": 256,
                "tokens": [1, 97, 98],
                "token_strs": None,
            }
            plain = {"prompt": "ab", "add_special_tokens": False, "return_token_strs": True}
            without = (await running.client.post("/tokenize", json=plain)).json()  # no model: the base
            assert without["tokens"] == [97, 98] and without["token_strs"] == ["<97>", "<98>"]
            back = await running.client.post(
                "/detokenize", json={"model": "base", "tokens": without["tokens"]}
            )
            assert back.json() == {"prompt": "ab"}
            # A chat's tokens are the ones the chat route gives the engine (the template's own, no BOS added).
            chat = (await running.client.post("/tokenize", json=CHAT)).json()
            assert (await running.client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert chat["tokens"] == running.engine.received[-1][0] == list(b"<user>hi<assistant>")
            no_header = {**CHAT, "add_generation_prompt": False, "add_special_tokens": True}
            assert (await running.client.post("/tokenize", json=no_header)).json()["tokens"] == [
                1,
                *b"<user>hi",
            ]

    asyncio.run(scenario())


def test_tokenizer_routes_refuse_as_the_generation_routes_do() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            chat_404 = await running.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            for path, body in (
                ("/tokenize", {"prompt": "a"}),
                ("/tokenize", CHAT),
                ("/detokenize", {"tokens": []}),
            ):
                missing = await running.client.post(path, json={**body, "model": "nope"})
                assert missing.status_code == 404 and missing.json() == chat_404.json()
            for path, body, param in (
                ("/detokenize", {"tokens": [256]}, "tokens"),
                ("/tokenize", {**CHAT, "tools": []}, "tools"),
                ("/tokenize", {"prompt": "\ud800"}, "prompt"),
            ):
                # Raw JSON: a lone surrogate only travels as a \u escape.
                raw = json.dumps(body).encode()
                refused = await running.client.post(
                    path, content=raw, headers={"Content-Type": "application/json"}
                )
                assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
            # Types as the schema publishes them (the fuzzer caught "1" taken for 1 and "yes" for true).
            for path, body in (
                ("/tokenize", {"model": "base"}),
                ("/detokenize", {"tokens": ["1"]}),
                ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}),
                ("/tokenize", {**CHAT, "add_generation_prompt": "true"}),
                ("/tokenize", {**CHAT, "tools": [{"type": "function"}]}),
            ):
                assert (await running.client.post(path, json=body)).status_code == 400, body

    asyncio.run(scenario())


def test_tokenizer_routes_need_the_api_key_and_version_does_not() -> None:
    async def scenario() -> None:
        async with serving_app(ServeSettings(base_model="base", api_key="k")) as running:
            key = {"Authorization": "Bearer k"}
            for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})):
                assert (await running.client.post(path, json=body)).status_code == 401
                assert (await running.client.post(path, json=body, headers=key)).status_code == 200
            version = await running.client.get("/version")
            assert version.json() == {"version": package_version(), "vllm_version": vllm.__version__}
            schema = (await running.client.get("/openapi.json", headers=key)).json()
            assert {"/tokenize", "/detokenize", "/version"} <= set(schema["paths"])
            ids = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
            assert (ids["minimum"], ids["maximum"]) == (0, 255)

    asyncio.run(scenario())


def test_every_answer_carries_x_request_id_and_completions_are_named_by_it() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            echoed = await running.client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "r1"}
            )
            assert echoed.headers["x-request-id"] == "r1" and echoed.json()["id"] == "chatcmpl-r1"
            made = await running.client.post("/v1/completions", json={"model": "base", "prompt": "a"})
            assert made.json()["id"] == f"cmpl-{made.headers['x-request-id']}"
            other = await running.client.post("/v1/completions", json={"model": "base", "prompt": "a"})
            assert other.headers["x-request-id"] != made.headers["x-request-id"]
            for answer in (await running.client.get("/health"), await running.client.get("/v1/models/nope")):
                assert answer.headers["x-request-id"]

    asyncio.run(scenario())


# -- tools ---------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = {**CHAT, "tools": [WEATHER]}
CALL = b'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOL_SETTINGS = ServeSettings(base_model="base", enable_auto_tool_choice=True, tool_call_parser="hermes")


def _sdk(running: Running) -> Any:
    import openai

    transport = httpx.ASGITransport(app=running.app)
    http_client = httpx.AsyncClient(transport=transport, base_url="http://test/v1")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http_client)


def test_tools_without_a_parser_are_rendered_for_tool_choice_none_only() -> None:
    async def scenario() -> None:
        async with serving_app() as running:
            answer = await running.client.post(
                "/v1/chat/completions", json={**TOOL_CHAT, "tool_choice": "none"}
            )
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hello"
            prompt = bytes(running.engine.received[-1][0]).decode("latin-1")
            assert (
                prompt.startswith("<tools>") and "get_weather" in prompt
            )  # vLLM renders them for "none" too
            assert running.engine.received[-1][1].structured_outputs is None
            for choice in (
                None,
                "auto",
                "required",
                {"type": "function", "function": {"name": "get_weather"}},
            ):
                body = TOOL_CHAT if choice is None else {**TOOL_CHAT, "tool_choice": choice}
                refused = await running.client.post("/v1/chat/completions", json=body)
                error = refused.json()["error"]
                assert refused.status_code == 400 and error["param"] == "tool_choice", refused.text
                assert "--enable-auto-tool-choice and --tool-call-parser" in error["message"]
            schema = (await running.client.get("/openapi.json")).json()["components"]["schemas"]
            assert schema["ChatCompletionRequest"]["properties"]["tool_choice"]["anyOf"][0] == {
                "const": "none"
            }

    asyncio.run(scenario())


def test_exclude_tools_when_tool_choice_none_leaves_them_out_of_the_prompt() -> None:
    settings = ServeSettings(base_model="base", exclude_tools_when_tool_choice_none=True)

    async def scenario() -> None:
        async with serving_app(settings) as running:
            answer = await running.client.post(
                "/v1/chat/completions", json={**TOOL_CHAT, "tool_choice": "none"}
            )
            assert answer.status_code == 200
            assert not bytes(running.engine.received[-1][0]).startswith(b"<tools>")

    asyncio.run(scenario())


def test_a_tool_call_is_parsed_by_vllms_parser_plain_and_streamed() -> None:
    async def scenario() -> None:
        async with serving_app(TOOL_SETTINGS) as running:
            running.engine.answer, running.engine.finish_reason = CALL, "stop"
            client = _sdk(running)
            completion = await client.chat.completions.create(**TOOL_CHAT)
            (choice,) = completion.choices
            assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
            (call,) = choice.message.tool_calls or []
            assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
            assert (call.function.name, json.loads(call.function.arguments)) == (
                "get_weather",
                {"city": "Paris"},
            )
            # auto: the parser keeps the <tool_call> markup in the text (special tokens are not skipped).
            params = running.engine.received[-1][1]
            assert params.skip_special_tokens is False and params.structured_outputs is None

            chunks = [chunk async for chunk in await client.chat.completions.create(**TOOL_CHAT, stream=True)]
            deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
            content = "".join(delta.content or "" for delta in deltas)
            streamed = [call for delta in deltas for call in delta.tool_calls or []]
            assert content == "Let me check."
            assert streamed[0].id and streamed[0].function and streamed[0].function.name == "get_weather"
            arguments = "".join(c.function.arguments or "" for c in streamed if c.function)
            assert json.loads(arguments) == {"city": "Paris"} and {c.index for c in streamed} == {0}
            assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"

    asyncio.run(scenario())


def test_tool_choice_none_returns_the_text_with_a_parser() -> None:
    async def scenario() -> None:
        async with serving_app(TOOL_SETTINGS) as running:
            running.engine.answer, running.engine.finish_reason = CALL, "stop"
            answer = await running.client.post(
                "/v1/chat/completions", json={**TOOL_CHAT, "tool_choice": "none"}
            )
            (choice,) = answer.json()["choices"]
            assert choice["message"]["content"] == CALL.decode() and choice["message"]["tool_calls"] is None
            assert choice["finish_reason"] == "stop"
            assert running.engine.received[-1][1].skip_special_tokens is True

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("choice", "finish"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
)
def test_required_and_named_tool_choice_force_the_call_with_vllms_grammar(choice: Any, finish: str) -> None:
    async def scenario() -> None:
        async with serving_app(TOOL_SETTINGS) as running:
            running.engine.answer, running.engine.finish_reason = CALL, "stop"
            for stream in (False, True):
                body = {**TOOL_CHAT, "tool_choice": choice, "stream": stream}
                answer = await running.client.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                params = running.engine.received[-1][1]
                # vLLM's structural tag for Hermes calls: <tool_call>{"name": "get_weather", "arguments": ...
                tag = json.loads(params.structured_outputs.structural_tag)
                begins = [item["begin"] for item in tag["format"]["tags"]]
                assert (
                    all('"name": "get_weather"' in begin for begin in begins)
                    and tag["format"]["at_least_one"]
                )
                assert params.skip_special_tokens is False
                if stream:
                    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line[6:7] == "{"]
                    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
                    calls = [
                        c
                        for e in events
                        if e["choices"]
                        for c in e["choices"][0]["delta"].get("tool_calls") or []
                    ]
                    assert calls[0]["function"]["name"] == "get_weather" and finishes[-1] == finish
                else:
                    (answered,) = answer.json()["choices"]
                    assert answered["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
                    assert answered["finish_reason"] == finish

    asyncio.run(scenario())


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    second = b'<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'

    async def scenario() -> None:
        async with serving_app(TOOL_SETTINGS) as running:
            running.engine.answer, running.engine.finish_reason = CALL + second, "stop"
            both = await running.client.post("/v1/chat/completions", json=TOOL_CHAT)
            assert len(both.json()["choices"][0]["message"]["tool_calls"]) == 2
            body = {**TOOL_CHAT, "parallel_tool_calls": False}
            one = await running.client.post("/v1/chat/completions", json=body)
            (call,) = one.json()["choices"][0]["message"]["tool_calls"]
            assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
            streamed = await running.client.post("/v1/chat/completions", json={**body, "stream": True})
            events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
            indexes = {
                c["index"]
                for e in events
                if e["choices"]
                for c in e["choices"][0]["delta"].get("tool_calls") or []
            }
            assert indexes == {0}

    asyncio.run(scenario())


def test_a_follow_up_turn_renders_the_call_and_its_result() -> None:
    async def scenario() -> None:
        async with serving_app(TOOL_SETTINGS) as running:
            call = {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
            messages = [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C and sunny"},
            ]
            body = {**CHAT, "messages": messages}  # (the fake's context is too short for the tools too)
            answer = await running.client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hello"
            prompt = bytes(running.engine.received[-1][0]).decode("latin-1")
            assert "<tool>18 C and sunny" in prompt and '"city": "Paris"' in prompt
            # /tokenize renders the same conversation and tools to the same ids.
            tokens = await running.client.post("/tokenize", json={"messages": messages})
            assert tokens.json()["tokens"] == running.engine.received[-1][0]
            # Arguments that are not a JSON object render as {} (vLLM's leniency with history), never a 400.
            broken = {**call, "function": {**call["function"], "arguments": "{not json"}}
            lenient = await running.client.post(
                "/v1/chat/completions",
                json={**body, "messages": [messages[0], {**messages[1], "tool_calls": [broken]}]},
            )
            assert lenient.status_code == 200, lenient.text
            assert '"arguments": {}' in bytes(running.engine.received[-1][0]).decode("latin-1")

    asyncio.run(scenario())
