"""The real server (vLLM on CPU, real HTTP) driven by the official openai SDK: every behaviour end to end."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import (
    ADAPTERS,
    ADMIN_KEY,
    API_KEY,
    ELSEWHERE,
    ELSEWHERE_DECLARES,
    QUESTIONS,
    Reference,
    Server,
    free_port,
    start_server,
    stop_server,
    wait_healthy,
)

pytestmark = pytest.mark.slow

# Bounded for `make test`; `make soak` sets these far higher.
SOAK_REQUESTS = int(os.environ.get("TUNESERVE_SOAK_REQUESTS", "400"))
SWAP_CYCLES = int(os.environ.get("TUNESERVE_SWAP_CYCLES", "25"))


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str, question: str, **kwargs: object) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24, **kwargs
    )
    return response.choices[0].message.content or ""


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# The series vLLM's Grafana dashboard queries: examples/observability/prometheus_grafana/grafana.json in
# vllm-project/vllm, as published at docs.vllm.ai/en/latest/examples/observability/prometheus_grafana/
# (2026-09-23), every one selected by `model_name`.
VLLM_DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:inter_token_latency_seconds_sum",
    "vllm:inter_token_latency_seconds_count",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_sum",
    "vllm:request_time_per_output_token_seconds_count",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
)


def scrape(server: Server, url: str | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample /metrics serves, by sample name: [(labels, value)]."""
    response = httpx.get(url or f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    samples = collections.defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def metric(server: Server, name: str, model: str, label: str = "model") -> float:
    """Sum of a series' samples for one model (other labels summed); vLLM's series name it by `model_name`."""
    return sum(value for labels, value in scrape(server)[name] if labels.get(label) == model)


def vllm_scheduler_idle(server: Server) -> bool:
    """vLLM's scheduler has no request running or waiting (its gauges move with the engine's steps)."""
    return all(
        metric(server, name, server.base_model, label="model_name") == 0
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
    )


def admin(server: Server, path: str, body: dict[str, object], key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


def test_models_lists_base_and_every_adapter(client: openai.OpenAI, server: Server) -> None:
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {server.base_model, *ADAPTERS, ELSEWHERE}
    for name in [*ADAPTERS, ELSEWHERE]:
        assert models[name].model_extra is not None
        assert models[name].model_extra["parent"] == server.base_model
        assert models[name].model_extra["max_model_len"] == 512
        assert models[name].model_extra["root"] == name  # never the adapter's path: any key sees this
    assert client.models.retrieve("caps").id == "caps"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert "does not exist" in str(missing.value) and not any(name in str(missing.value) for name in ADAPTERS)


def test_bad_adapters_are_refused_and_the_rest_served(server: Server) -> None:
    status = httpx.get(
        f"{server.url}/v1/lora_adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    refused = {item["name"]: item["reason"] for item in status["refused"]}
    assert "rank 32 is above the server's --max-lora-rank 16" in refused["too_big_rank"]
    # Another base's name and weights of another shape: refused, naming the first layer that does not fit.
    assert (
        "q_proj maps 512 -> 256 features, but the base model's layer maps 256 -> 256" in refused["other_base"]
    )
    assert "it declares base model 'org/other-7b'" in refused["other_base"]
    assert "NaN or infinite values" in refused["nan_weights"]
    served = {a["name"]: a for a in status["adapters"]}
    assert set(served) == {*ADAPTERS, ELSEWHERE}
    # Another base's name, weights that fit: served, the base it declares shown to the admin.
    assert (served[ELSEWHERE]["base_model"], served[ELSEWHERE]["base_check"]) == (
        ELSEWHERE_DECLARES,
        "shapes",
    )
    assert {served[name]["base_check"] for name in ADAPTERS} == {"content_sha256"}
    log = server.log_path.read_text()
    assert f"adapter {ELSEWHERE} ({server.adapters_dir / ELSEWHERE}) declares base model" in log


def test_each_adapter_answers_like_the_engine_directly(
    client: openai.OpenAI, server: Server, engine_reference: Reference
) -> None:
    for question, base_text in zip(QUESTIONS, engine_reference.texts[None], strict=True):
        assert chat(client, server.base_model, question) == base_text
    for name in ADAPTERS:
        answers = [chat(client, name, question) for question in QUESTIONS]
        assert answers == engine_reference.texts[name]
        assert answers != engine_reference.texts[None]
    # fmt's weights saved by plain PEFT under another base's name answer as fmt does.
    assert [chat(client, ELSEWHERE, question) for question in QUESTIONS] == engine_reference.texts["fmt"]


def test_completions_with_token_and_text_prompts(
    client: openai.OpenAI, engine_reference: Reference, tiny_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    from_ids = client.completions.create(
        model="fmt", prompt=engine_reference.prompts[0], max_tokens=24, temperature=0
    )
    assert from_ids.choices[0].text == engine_reference.texts["fmt"][0]
    text_prompt = tiny_tokenizer.decode(engine_reference.prompts[0])
    batch = client.completions.create(
        model="fmt", prompt=[text_prompt, text_prompt], max_tokens=24, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == batch.choices[1].text == engine_reference.texts["fmt"][0]
    assert batch.usage is not None and batch.usage.prompt_tokens == 2 * len(engine_reference.prompts[0])
    echo = client.completions.create(model="fmt", prompt=text_prompt, max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(text_prompt)


def test_concurrent_requests_across_adapters_get_their_own_output(
    server: Server, engine_reference: Reference
) -> None:
    async def run_all() -> list[tuple[str | None, int, str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:

            async def one(model: str | None, index: int) -> tuple[str | None, int, str]:
                response = await client.chat.completions.create(
                    model=model or server.base_model,
                    messages=[{"role": "user", "content": QUESTIONS[index]}],
                    temperature=0,
                    max_tokens=24,
                )
                return model, index, response.choices[0].message.content or ""

            jobs = [
                one(model, i) for _ in range(2) for model in [None, *ADAPTERS] for i in range(len(QUESTIONS))
            ]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run_all())
    assert len(results) == 24
    # Batched CPU kernels may sum in another order than single requests, which can flip a near-tied greedy
    # token late in a reply (vLLM is not batch-invariant). So each reply must match its own model's
    # reference for a good while, and match it better than any other model's reference.
    for model, index, text in results:
        overlap = {
            other: _common_prefix(text, texts[index]) for other, texts in engine_reference.texts.items()
        }
        own = overlap.pop(model)
        assert own >= min(12, len(engine_reference.texts[model][index])), (model, index, text)
        assert (
            all(own > theirs for theirs in overlap.values()) or text == engine_reference.texts[model][index]
        )


def test_streaming_chat_matches_and_reports_usage(client: openai.OpenAI, engine_reference: Reference) -> None:
    stream = client.chat.completions.create(
        model="words",
        messages=[{"role": "user", "content": QUESTIONS[2]}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine_reference.texts["words"][2]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == len(engine_reference.prompts[2])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > usage.prompt_tokens


def test_raw_sse_ends_with_done(server: Server) -> None:
    body = {"model": "caps", "prompt": "Hello", "max_tokens": 5, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0].removeprefix("data: "))["object"] == "text_completion"


def test_sampling_options_are_honoured(client: openai.OpenAI) -> None:
    seeded = [
        client.chat.completions.create(
            model="caps",
            messages=[{"role": "user", "content": "Say anything."}],
            temperature=1.0,
            seed=123,
            max_tokens=12,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    several = client.chat.completions.create(
        model="caps",
        messages=[{"role": "user", "content": "Say anything."}],
        temperature=1.0,
        n=3,
        max_tokens=8,
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    short = client.chat.completions.create(
        model="fmt",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_completion_tokens=3,
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3
    with_logprobs = client.chat.completions.create(
        model="fmt",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = with_logprobs.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    stopped = client.completions.create(
        model="caps", prompt="a b c", max_tokens=30, temperature=0, stop=["\n", "."]
    )
    assert "\n" not in stopped.choices[0].text and "." not in stopped.choices[0].text


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="fmt",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
    )
    content = response.choices[0].message.content or ""
    assert "\n" not in content  # compact JSON: no free whitespace for the model to loop on
    parsed = json.loads(content)
    assert set(parsed) == {"name", "count"} and isinstance(parsed["count"], int)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "(["},  # a regex that does not compile
        {"type": 42},  # not a JSON Schema
        {"type": "integer", "minimum": 5, "maximum": 1},  # nothing satisfies it
    ],
)
def test_bad_response_format_schemas_are_400s(server: Server, schema: dict[str, object]) -> None:
    # Each was a 500; the server must keep serving afterwards.
    body = {
        "model": "fmt",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "\ud800 hi"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
    ],
)
def test_hostile_values_are_400s_naming_the_field(
    server: Server, body: dict[str, object], param: str
) -> None:
    # Sent as raw JSON: the lone surrogate as a \u escape, as a hostile client would.
    raw = json.dumps({"model": "fmt", "max_tokens": 4, **body}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=headers, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


DEEP = b"[" * 3000 + b"]" * 3000


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "fmt", "messages": ' + DEEP + b"}", 400),
        ("POST", "/v1/chat/completions", b'{"model": "fmt", "messages": "\xff\xfe"}', 400),
        ("GET", "/v1/no-such-route", b"", 404),
        ("DELETE", "/v1/models", b"", 405),
    ],
)
def test_every_refusal_has_the_openai_error_shape(
    server: Server, method: str, path: str, content: bytes, status: int
) -> None:
    # Nested 2,000+ deep or not UTF-8, bodies got {"detail": ...}, which the openai SDK cannot read.
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_have_openai_shape_and_status(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "no-such-adapter", "hi")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="fmt", messages=[{"role": "user", "content": "hi"}], temperature=3.5
        )
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        chat(client, "fmt", "word " * 600)
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(
            model="fmt", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
        )
    assert too_many.value.body["param"] == "max_tokens"  # type: ignore[index]
    raw = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_max_tokens_past_the_context_stop_at_the_context_as_in_vllm(client: openai.OpenAI) -> None:
    # vLLM 0.32 answers these 200 (max_tokens clamped to the room left); lm-eval's requests rely on it.
    prompt = [5] * 500
    done = client.completions.create(
        model="fmt", prompt=prompt, max_tokens=100, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (500, 12)
    with pytest.raises(
        openai.BadRequestError, match="maximum context length is 512 tokens; your prompt has 512"
    ):
        client.completions.create(model="fmt", prompt=[5] * 512, max_tokens=1)


def test_tokenize_and_detokenize_as_vllm(client: openai.OpenAI, server: Server, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from finetune.prompting import encode_prompt

    key = {"Authorization": f"Bearer {API_KEY}"}

    def post(path: str, body: dict[str, object]) -> Any:
        response = httpx.post(f"{server.url}{path}", json=body, headers=key, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    # A chat's tokens are exactly what the chat route generates from: same ids, same answer from them.
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    chat_ids = post("/tokenize", {"model": "fmt", "messages": messages})
    assert chat_ids["tokens"] == encode_prompt(tiny_tokenizer, messages)
    assert chat_ids["count"] == len(chat_ids["tokens"]) and chat_ids["max_model_len"] == 512
    chat = client.chat.completions.create(
        model="fmt", messages=[{"role": "user", "content": QUESTIONS[1]}], temperature=0, max_tokens=12
    )
    from_ids = client.completions.create(model="fmt", prompt=chat_ids["tokens"], temperature=0, max_tokens=12)
    assert chat.usage is not None and chat.usage.prompt_tokens == chat_ids["count"]
    assert from_ids.choices[0].text == chat.choices[0].message.content

    text = "Tokenize me, then give me back."
    ids = post("/tokenize", {"model": server.base_model, "prompt": text, "return_token_strs": True})
    assert ids["tokens"] == tiny_tokenizer(text)["input_ids"]
    assert ids["token_strs"] == tiny_tokenizer.convert_ids_to_tokens(ids["tokens"])
    plain = post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
    assert plain == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert post("/detokenize", {"model": "caps", "tokens": plain}) == {"prompt": text}

    assert httpx.post(f"{server.url}/tokenize", json={"prompt": text}).status_code == 401
    missing = httpx.post(f"{server.url}/detokenize", json={"model": "nope", "tokens": [1]}, headers=key)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    version = httpx.get(f"{server.url}/version").json()  # no key, as /health
    assert set(version) == {"version", "vllm_version"} and version["vllm_version"] == "0.32.0"


def test_request_id_header_is_the_sdks_request_id(client: openai.OpenAI, server: Server) -> None:
    chat = client.chat.completions.create(
        model="caps", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat._request_id and chat.id == f"chatcmpl-{chat._request_id}"
    text = client.completions.create(
        model="caps", prompt="hi", max_tokens=2, extra_headers={"X-Request-Id": "mine-1"}
    )
    assert text._request_id == "mine-1" and text.id == "cmpl-mine-1"  # vLLM's naming of a sent id


def test_docs_schema_and_metrics_need_the_key_unless_made_public(server: Server) -> None:
    key = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/docs", "/openapi.json", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.get(f"{server.url}{path}", headers=key).status_code == 200, path
    assert "/v1/chat/completions" in httpx.get(f"{server.url}/openapi.json", headers=key).json()["paths"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # for load balancers: no key


def test_metrics_move(client: openai.OpenAI, server: Server) -> None:
    before = metric(server, "tuneserve_requests_total", "caps")
    tokens_before = metric(server, "tuneserve_generation_tokens_total", "caps")
    chat(client, "caps", "Say anything.")
    assert metric(server, "tuneserve_requests_total", "caps") == before + 1
    assert metric(server, "tuneserve_generation_tokens_total", "caps") > tokens_before
    assert metric(server, "tuneserve_time_to_first_token_seconds_count", "caps") >= 1
    assert metric(server, "tuneserve_e2e_request_latency_seconds_count", "caps") >= 1
    # Labels take known values only: anyone could grow /metrics without bound with random models and paths.
    unknown = metric(server, "tuneserve_request_errors_total", "unknown")
    for index in range(3):
        with pytest.raises(openai.NotFoundError):
            chat(client, f"nope-{index}", "hi")
        httpx.post(f"{server.url}/v1/random-{index}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert metric(server, "tuneserve_request_errors_total", "unknown") == unknown + 3
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert "nope-" not in text and "random-" not in text
    assert 'endpoint="/v1/chat/completions"' in text and 'endpoint="unknown"' in text


def test_metrics_serve_vllms_dashboard_series_and_ours_per_model(
    client: openai.OpenAI, server: Server
) -> None:
    def ttft_sums() -> tuple[float, float]:
        samples = scrape(server)
        ours = sum(value for _, value in samples["tuneserve_time_to_first_token_seconds_sum"])
        return metric(server, "vllm:time_to_first_token_seconds_sum", server.base_model, "model_name"), ours

    vllm_before, ours_before = ttft_sums()
    caps_before = metric(server, "tuneserve_time_to_first_token_seconds_count", "caps")
    chat(client, server.base_model, "Say anything.")
    chat(client, "caps", "Say anything.")
    samples = scrape(server)
    missing = [
        name
        for name in VLLM_DASHBOARD_SERIES
        if not any(labels.get("model_name") == server.base_model for labels, _ in samples[name])
    ]
    assert not missing, f"series of vLLM's dashboard missing from /metrics: {missing}"
    # The LoRA gauge routers read: one series per (running, waiting) adapter set seen, valued at when.
    lora_info = [labels for labels, _ in samples["vllm:lora_requests_info"]]
    assert any(labels["running_lora_adapters"] == "caps" for labels in lora_info), lora_info
    assert all({"max_lora", "waiting_lora_adapters"} <= set(labels) for labels in lora_info)
    # Ours tell the models apart, with vLLM's own measure: the two requests' TTFTs sum to vLLM's.
    assert metric(server, "tuneserve_time_to_first_token_seconds_count", "caps") == caps_before + 1
    vllm_after, ours_after = ttft_sums()
    assert ours_after - ours_before == pytest.approx(vllm_after - vllm_before, rel=1e-6)
    assert metric(server, "tuneserve_e2e_request_latency_seconds_count", server.base_model) >= 1
    assert not any(name.startswith("tuneserve_requests_running") for name in samples)


def test_metrics_follow_each_adapter_through_the_engines_tiers(client: openai.OpenAI, server: Server) -> None:
    # Three adapters asked in turn, one request at a time, on 2 LoRA slots and a host cache of 2 (vLLM's
    # default --max-cpu-loras is --max-loras): least recently used out, so from the third request on each
    # one loads its adapter into both tiers and evicts another from both.
    def moves(move: str, tier: str) -> float:
        return sum(
            value
            for labels, value in scrape(server)[f"tuneserve_adapter_{move}_total"]
            if labels["tier"] == tier
        )

    def location(name: str) -> str:
        (where,) = [
            labels["location"]
            for labels, value in scrape(server)["tuneserve_adapter_location"]
            if labels["model"] == name and value == 1
        ]
        return where

    order = ["fmt", "caps", "words"] * 2
    before = {
        (move, tier): moves(move, tier) for move in ("loads", "evictions") for tier in ("slot", "host_memory")
    }
    queue_before = {
        name: metric(server, "tuneserve_request_queue_time_seconds_count", name) for name in order
    }
    vllm_queue_before = metric(server, "vllm:request_queue_time_seconds_sum", server.base_model, "model_name")
    ours_queue_before = sum(value for _, value in scrape(server)["tuneserve_request_queue_time_seconds_sum"])
    for name in order:
        chat(client, name, QUESTIONS[0])
        assert location(name) == "slot"
    for (move, tier), value in before.items():
        assert moves(move, tier) - value >= 4, (move, tier)
    # The last two hold both tiers; the engine no longer holds fmt (nor the adapter no request asked for).
    assert [location(name) for name in ("caps", "words", "fmt", ELSEWHERE)] == [
        "slot",
        "slot",
        "disk",
        "disk",
    ]
    in_flight = scrape(server)["tuneserve_adapter_requests_in_flight"]
    assert {labels["model"] for labels, _ in in_flight} >= set(ADAPTERS) and all(v == 0 for _, v in in_flight)
    # The wait in vLLM's queue, per model, with vLLM's own measure: the requests' waits sum to vLLM's.
    for name in set(order):
        assert metric(server, "tuneserve_request_queue_time_seconds_count", name) == queue_before[name] + 2
    vllm_queue = metric(server, "vllm:request_queue_time_seconds_sum", server.base_model, "model_name")
    ours_queue = sum(value for _, value in scrape(server)["tuneserve_request_queue_time_seconds_sum"])
    assert ours_queue - ours_queue_before == pytest.approx(vllm_queue - vllm_queue_before, rel=1e-6, abs=1e-9)


def test_a_third_adapter_waits_for_a_lora_slot_and_only_then(client: openai.OpenAI, server: Server) -> None:
    # 2 LoRA slots: while fmt and caps generate, vLLM cannot schedule words; asked one at a time, none waits.
    def waits(name: str) -> tuple[float, float, float]:
        return (
            metric(server, "tuneserve_lora_slot_wait_seconds_count", name),
            metric(server, "tuneserve_lora_slot_wait_seconds_sum", name),
            metric(server, "tuneserve_request_queue_time_seconds_sum", name),
        )

    names = ["fmt", "caps", "words"]
    before = {name: waits(name) for name in names}
    for name in names:
        chat(client, name, QUESTIONS[0])
    for name in names:
        count, wait, _ = waits(name)
        assert (count, wait) == (before[name][0] + 1, before[name][1]), name

    before = {name: waits(name) for name in names}
    started = threading.Barrier(3)

    def hold_a_slot(name: str) -> None:
        stream = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTIONS[1]}],
            max_tokens=300,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i, _ in enumerate(stream):
            if i == 1:
                started.wait(timeout=60)

    holders = [threading.Thread(target=hold_a_slot, args=(name,)) for name in ("fmt", "caps")]
    for holder in holders:
        holder.start()
    started.wait(timeout=60)  # both generating
    sent = time.monotonic()
    chat(client, "words", QUESTIONS[0])
    answered_in = time.monotonic() - sent
    for holder in holders:
        holder.join(timeout=120)
    count, wait, queued = (now - then for now, then in zip(waits("words"), before["words"], strict=True))
    assert count == 1
    # It waited for a slot (most of its time), never longer than it was queued or than its whole answer.
    assert 0.1 < wait <= queued + 1e-6 and wait < answered_in
    for name in ("fmt", "caps"):
        assert waits(name)[1] == before[name][1], name  # scheduled at once: 2 slots for 2 adapters


def test_aborted_stream_frees_its_request(server: Server) -> None:
    aborted = metric(server, "tuneserve_requests_aborted_total", "words")
    body = {
        "model": "words",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 480,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    # The client is gone: the engine request is aborted, nothing keeps running for it.
    deadline = time.monotonic() + 30
    while metric(server, "tuneserve_requests_aborted_total", "words") == aborted:
        assert time.monotonic() < deadline, "the disconnected stream was never aborted"
        time.sleep(0.1)
    while not vllm_scheduler_idle(server):
        assert time.monotonic() < deadline, "vLLM still counts the aborted request as running or waiting"
        time.sleep(0.1)


def test_disconnected_non_streaming_request_is_aborted(server: Server) -> None:
    aborted = metric(server, "tuneserve_requests_aborted_total", "caps")
    body = {"model": "caps", "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "temperature": 1.0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=0.3,
        )
    deadline = time.monotonic() + 30
    while metric(server, "tuneserve_requests_aborted_total", "caps") == aborted:
        assert time.monotonic() < deadline, "the disconnected request was never aborted"
        time.sleep(0.1)


def test_runtime_load_and_unload(client: openai.OpenAI, server: Server) -> None:
    # Admin endpoints need the admin key.
    assert admin(server, "/v1/load_lora_adapter", {"lora_name": "x"}, key=None).status_code == 401
    assert admin(server, "/v1/load_lora_adapter", {"lora_name": "x"}, key=API_KEY).status_code == 401
    # Paths are confined to the adapters dir (403: well-formed, but not a place this server reads from).
    for path in ["../spare", str(server.adapters_dir.parent / "spare"), "/etc"]:
        refused = admin(server, "/v1/load_lora_adapter", {"lora_name": "escape", "lora_path": path})
        assert refused.status_code == 403, path
        assert "adapters dir" in refused.json()["error"]["message"]
    escape_link = server.adapters_dir / "link_out"
    escape_link.symlink_to(server.adapters_dir.parent / "spare")
    try:
        assert admin(server, "/v1/load_lora_adapter", {"lora_name": "link_out"}).status_code == 403
        # A refresh (and start-up discovery) follow the same rule.
        refreshed = admin(server, "/v1/lora_adapters/refresh", {}).json()
        assert refreshed["added"] == []
        reasons = {item["name"]: item["reason"] for item in refreshed["refused"]}
        assert "must be inside the adapters dir" in reasons["link_out"]
    finally:
        escape_link.unlink()

    shutil.copytree(server.adapters_dir.parent / "spare", server.adapters_dir / "late")
    try:
        loaded = admin(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "late"})
        assert loaded.status_code == 200, loaded.text
        assert admin(server, "/v1/load_lora_adapter", {"lora_name": "late"}).status_code == 409
        assert "late" in {m.id for m in client.models.list()}
        assert chat(client, "late", QUESTIONS[1]) == chat(client, "caps", QUESTIONS[1])
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        late_id = next(
            a["lora_int_id"]
            for a in httpx.get(f"{server.url}/v1/lora_adapters", headers=headers).json()["adapters"]
            if a["name"] == "late"
        )
        assert admin(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
        assert (
            late_id
            not in httpx.get(f"{server.url}/v1/lora_adapters", headers=headers).json()["engine_lora_ids"]
        )
        with pytest.raises(openai.NotFoundError):
            chat(client, "late", "hi")
        assert admin(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 404
        # A folder that appears later is picked up by a refresh.
        refreshed = admin(server, "/v1/lora_adapters/refresh", {})
        assert refreshed.json()["added"] == ["late"]
        assert chat(client, "late", QUESTIONS[1]) == chat(client, "caps", QUESTIONS[1])
    finally:
        admin(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
        shutil.rmtree(server.adapters_dir / "late")


def test_soak_of_mixed_traffic_leaves_nothing_behind(server: Server, engine_reference: Reference) -> None:
    """Base and adapters, chat and completions, streamed or not, a tenth of them dropped by the client
    mid-stream, at concurrency 32: no 5xx, greedy answers stay their model's, /health answers throughout,
    and afterwards nothing runs or waits and the API process has not kept growing."""
    import psutil

    api_process = psutil.Process(server.process.pid)
    models: list[str | None] = [None, *ADAPTERS]
    statuses: collections.Counter[int | str] = collections.Counter()
    wrong: list[tuple[str | None, int, str]] = []
    health: collections.Counter[int] = collections.Counter()
    rss: list[int] = []

    async def one(http: httpx.AsyncClient, index: int) -> None:
        model, question = models[index % len(models)], (index // len(models)) % len(QUESTIONS)
        chat_route, streamed, dropped = index % 3 != 0, index % 2 == 0, index % 10 == 7
        body: dict[str, object] = {"model": model or server.base_model, "temperature": 0, "max_tokens": 24}
        if chat_route:
            body["messages"] = [{"role": "user", "content": QUESTIONS[question]}]
        else:
            body["prompt"] = engine_reference.prompts[question]
        if streamed or dropped:
            body["stream"] = True
        path = "/v1/chat/completions" if chat_route else "/v1/completions"
        try:
            async with http.stream("POST", path, json=body) as response:
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    return
                if not body.get("stream"):
                    choice = json.loads(await response.aread())["choices"][0]
                    text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
                else:
                    text = ""
                    async for line in response.aiter_lines():
                        if dropped:
                            return  # the client goes away after the first chunk
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        except httpx.HTTPError as error:
            statuses[type(error).__name__] += 1
            return
        expected = engine_reference.texts[model][question]
        if _common_prefix(text, expected) < min(12, len(expected)):
            wrong.append((model, question, text))

    async def watch(http: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            health[(await http.get("/health")).status_code] += 1
            await asyncio.sleep(0.2)

    async def run_all() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=120, limits=limits
        ) as http:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(http, done))
            gate = asyncio.Semaphore(32)

            async def gated(index: int) -> None:
                async with gate:
                    await one(http, index)
                if index == SOAK_REQUESTS // 2:
                    rss.append(api_process.memory_info().rss)

            await asyncio.gather(*(gated(index) for index in range(SOAK_REQUESTS)))
            done.set()
            await watcher

    asyncio.run(run_all())
    rss.append(api_process.memory_info().rss)
    print(f"soak: {SOAK_REQUESTS} requests, statuses {dict(statuses)}, /health {dict(health)}, rss {rss}")
    assert statuses == {200: SOAK_REQUESTS}, statuses
    assert not wrong, wrong[:3]
    assert set(health) == {200}, health
    deadline = time.monotonic() + 30
    while not vllm_scheduler_idle(server):
        assert time.monotonic() < deadline, "vLLM's running or waiting requests stayed above 0"
        time.sleep(0.2)
    # The second half of the load must not have kept memory the first half did not (the 10 MB request that
    # froze the server also kept 1 GB after it).
    assert rss[1] - rss[0] < 0.25 * rss[0], rss


def test_hot_swap_under_load_keeps_the_engine_alive(client: openai.OpenAI, server: Server) -> None:
    # Unloading an adapter while requests ran on it killed the engine for good (KeyError in vLLM's
    # convert_mapping after 14 and after 101 load/unload cycles with 16 workers on the adapter).
    expected = chat(client, "caps", QUESTIONS[1])
    shutil.copytree(server.adapters_dir.parent / "spare", server.adapters_dir / "swap")
    statuses: collections.Counter[int] = collections.Counter()
    wrong: list[str] = []
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def worker(index: int) -> None:
        model = "swap" if index % 4 else server.base_model
        body = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTIONS[1]}],
            "temperature": 0,
            "max_tokens": 24,
        }
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
            while not stop.is_set():
                response = http.post("/v1/chat/completions", json=body)
                statuses[response.status_code] += 1
                if response.status_code == 200 and model == "swap":
                    text = response.json()["choices"][0]["message"]["content"]
                    if _common_prefix(text, expected) < min(12, len(expected)):
                        wrong.append(text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(SWAP_CYCLES):
            loaded = admin(server, "/v1/load_lora_adapter", {"lora_name": "swap"})
            assert loaded.status_code == 200, loaded.text
            time.sleep(0.3)
            unloaded = admin(server, "/v1/unload_lora_adapter", {"lora_name": "swap"})
            assert unloaded.status_code == 200, unloaded.text
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        shutil.rmtree(server.adapters_dir / "swap")
    assert set(statuses) <= {200, 404}, statuses  # 404: asked for swap while it was unloaded
    assert statuses[200] > SWAP_CYCLES and not wrong, (statuses, wrong[:3])
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert chat(client, "caps", QUESTIONS[1]) == expected


ALIAS_SWAPS = 10
ALIAS_REQUESTS = 500


def test_an_alias_repointed_under_load_never_fails_a_request(client: openai.OpenAI, server: Server) -> None:
    # A release alias moved ten times between versions of two adapters while 12 clients (half streaming) ask
    # for it: no request fails or sees a 404, each answer is one version's, previous versions are unloaded.
    question = QUESTIONS[0]
    expected = {name: chat(client, name, question) for name in ("fmt", "caps")}
    assert expected["fmt"] != expected["caps"]
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def release(index: int) -> str:  # version i: a copy of fmt (even i) or caps (odd i) under its own name
        name = f"release-{index}"
        shutil.copytree(server.adapters_dir / ("caps" if index % 2 else "fmt"), server.adapters_dir / name)
        return name

    def point(index: int) -> httpx.Response:
        name = release(index)
        return admin(server, "/v1/aliases", {"alias": "release", "lora_name": name, "lora_path": name})

    first = point(0)
    assert first.status_code == 200, first.text
    assert first.json()["previous"] is None and first.json()["version"].startswith("sha256:")
    outcomes: list[str] = []  # "fmt", "caps", or what went wrong
    stop = threading.Event()

    def worker(index: int) -> None:
        own = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        messages: Any = [{"role": "user", "content": question}]
        while not stop.is_set():
            try:
                if index % 2:
                    stream = own.chat.completions.create(
                        model="release", messages=messages, temperature=0, max_tokens=24, stream=True
                    )
                    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
                else:
                    response = own.chat.completions.create(
                        model="release", messages=messages, temperature=0, max_tokens=24
                    )
                    text = response.choices[0].message.content or ""
            except openai.APIError as exc:
                outcomes.append(repr(exc))
                continue
            # Batched CPU kernels may part from the single request's answer late; the start tells them apart.
            known = [name for name, ref in expected.items() if _common_prefix(text, ref) >= min(12, len(ref))]
            outcomes.append(known[0] if len(known) == 1 else f"unknown answer {text!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    seen_draining = False
    try:
        for index in range(1, ALIAS_SWAPS + 1):
            time.sleep(0.5)
            moved = point(index)
            assert moved.status_code == 200, moved.text
            assert moved.json()["previous"] == f"release-{index - 1}"
            status = httpx.get(f"{server.url}/v1/lora_adapters", headers=admin_headers).json()
            assert status["aliases"]["release"] == f"release-{index}"
            seen_draining |= any(item["in_flight"] > 0 for item in status["draining"])
        deadline = time.monotonic() + 300
        while len(outcomes) < ALIAS_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        failures = [outcome for outcome in outcomes if outcome not in expected]
        assert len(outcomes) >= ALIAS_REQUESTS and not failures, (len(outcomes), failures[:3])
        assert set(outcomes) == {"fmt", "caps"}, collections.Counter(outcomes)
        # The last version answers, every previous one is unloaded once its requests ended.
        assert chat(client, "release", question) == expected["fmt"]  # release-10: fmt
        for _ in range(100):
            status = httpx.get(f"{server.url}/v1/lora_adapters", headers=admin_headers).json()
            if not status["draining"]:
                break
            time.sleep(0.1)
        releases = {item["name"]: item for item in status["adapters"] if item["name"].startswith("release-")}
        assert list(releases) == [f"release-{ALIAS_SWAPS}"] and not status["draining"], status
        last = releases[f"release-{ALIAS_SWAPS}"]
        fmt = next(item for item in status["adapters"] if item["name"] == "fmt")
        assert last["aliases"] == ["release"] and last["version"] == fmt["version"] and last["in_flight"] == 0
        assert "release" in {model.id for model in client.models.list()}
        print(f"alias swaps: {collections.Counter(outcomes)}, draining seen with requests: {seen_draining}")
    finally:
        httpx.delete(f"{server.url}/v1/aliases/release", headers=admin_headers, timeout=60)
        admin(server, "/v1/unload_lora_adapter", {"lora_name": f"release-{ALIAS_SWAPS}"})
        for index in range(ALIAS_SWAPS + 1):
            shutil.rmtree(server.adapters_dir / f"release-{index}", ignore_errors=True)
    assert "release" not in {model.id for model in client.models.list()}


def test_request_body_limit_and_over_long_prompts_refused_before_tokenizing(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.url}/v1/chat/completions"
    # Over --max-request-bytes (4 MiB by default): 413 in OpenAI's shape, before anything parses it.
    huge = {"model": "caps", "messages": [{"role": "user", "content": "word " * (1 << 20)}]}
    refused = httpx.post(url, json=huge, headers=headers, timeout=60)
    assert refused.status_code == 413
    assert "--max-request-bytes" in refused.json()["error"]["message"]

    # Under the limit but far over the context: refused from its length alone, before tokenizing (a 10 MB
    # prompt took 14 s of the event loop to tokenize, during which nothing else was answered).
    big = {"model": "caps", "messages": [{"role": "user", "content": "word " * 600_000}]}
    response = httpx.post(url, json=big, headers=headers, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "3000000 characters" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_health_is_503_while_the_engine_starts(server: Server) -> None:
    # The HTTP server is up within seconds; the engine takes far longer, and until then /health says 503.
    assert 503 in server.startup_statuses
    assert server.startup_statuses[-1] == 200


# uvicorn ends by re-raising the signal it stopped on: SIGTERM then kills the process (as a supervisor
# expects), SIGINT is caught by `python -m serve`, which exits 0 (1 is kept for a dead engine).
@pytest.mark.parametrize(
    ("stop_signal", "exit_code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0)]
)
def test_stop_signal_with_a_request_in_flight_ends_the_server_and_its_engine(
    tiny_base: Path, adapters_dir: Path, tmp_path: Path, stop_signal: signal.Signals, exit_code: int
) -> None:
    # Containers and the demo stop servers this way; the engine worker used to linger after the API process.
    import psutil

    metrics_port = free_port()
    log = tmp_path / "server.log"
    running = start_server(tiny_base, adapters_dir, log, "--metrics-port", str(metrics_port))
    try:
        wait_healthy(running)
        # --metrics-port: /metrics on its own port (for a scraper on a private network), not on the API's.
        assert httpx.get(f"{running.url}/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200
        assert "vllm:num_requests_waiting" in scraped.text and "tuneserve_requests_total" in scraped.text
        children = psutil.Process(running.process.pid).children(recursive=True)
        body = {"model": "caps", "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120) as stream:
            next(stream.iter_lines())  # generating now
            running.process.send_signal(stop_signal)
            try:
                running.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 30 s after {stop_signal.name}:\n{running.log_text()[-3000:]}")
        assert running.process.returncode == exit_code
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [child.cmdline() for child in alive]
    finally:
        stop_server(running)


def test_dead_engine_ends_the_server_with_exit_code_1(client: openai.OpenAI, server: Server) -> None:
    """Runs last in this module: it kills the engine of the shared server. A dead vLLM engine never
    recovers, so the server stops with a non-zero exit code for its supervisor to restart it."""
    import psutil

    engine = next(
        child
        for child in psutil.Process(server.process.pid).children(recursive=True)
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name()
    )
    engine.kill()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server kept running after its engine died:\n{server.log_text()[-3000:]}")
    assert server.process.returncode == 1
    assert "the vLLM engine has died" in server.log_text()


def test_start_up_heap_is_frozen_once_ready(server: Server) -> None:
    # vLLM's server does the same: without it, full collections walk every start-up object (300-400 ms pauses
    # under load, every stream stalled)
    found = re.findall(r"garbage collector: (\d+) start-up objects frozen", server.log_text())
    assert len(found) == 1 and int(found[0]) > 100_000, found
