"""vLLM's request extras (issue 20): every field of vLLM's own ChatCompletionRequest and CompletionRequest is
either applied as vLLM applies it, ignored where vLLM ignores it too, or refused with a 400 naming it; the
applied ones give the answers vLLM's own OpenAI server gives on the same base.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChatRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VLLMCompletionRequest

from pipeline.launch import ServerProcess, free_port
from serve import protocol
from serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from tests.e2e import Server, engine_flags, start_server, stop_server
from tests.finetune.conftest import REPO_ROOT

# Fields OpenAI's API has (ours models them, or refuses them by name).
OPENAI_FIELDS = {
    "model", "messages", "prompt", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "tools", "tool_choice", "user", "suffix", "echo",
}  # fmt: skip


def vllm_extras(vllm_request: type[Any], ours: type[Any]) -> set[str]:
    return set(vllm_request.model_fields) - OPENAI_FIELDS - set(ours.model_fields)


@pytest.mark.parametrize(
    ("vllm_request", "ours"),
    [(VLLMChatRequest, ChatCompletionRequest), (VLLMCompletionRequest, CompletionRequest)],
)
def test_every_vllm_extra_has_a_policy(vllm_request: type[Any], ours: type[Any]) -> None:
    # A vLLM upgrade that adds a request field fails here until the field is applied, refused or ignored.
    unplaced = (
        vllm_extras(vllm_request, ours) - set(protocol._UNSERVED_EXTRAS) - set(protocol.VLLM_IGNORED_EXTRAS)
    )
    assert unplaced == set()


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "base", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def _completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "base", "prompt": "hi", **fields})


# An "on" value for each refused extra (vLLM's own examples where it has them).
REFUSED_VALUES: dict[str, Any] = {
    "use_beam_search": True,
    "length_penalty": 0.5,
    "watermarking": True,
    "truncate_prompt_tokens": 8,
    "truncation_side": "middle",
    "prompt_logprobs": 2,
    "logprob_token_ids": [1, 2],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "return_prompt_text": True,
    "repetition_detection": {"max_pattern_size": 4},
    "structured_outputs": {"regex": "[a-z]+"},
    "priority": 1,
    "request_id": "mine",
    "cache_salt": "salt",
    "kv_transfer_params": {"do_remote_prefill": True},
    "ec_transfer_params": {"x": 1},
    "vllm_xargs": {"x": 1},
    "thinking_token_budget": 8,
    "reasoning_effort": "low",
    "echo": True,
    "add_generation_prompt": False,
    "continue_final_message": True,
    "add_special_tokens": True,
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "documents": [{"title": "t", "text": "x"}],
    "media_io_kwargs": {"image": {}},
    "mm_processor_kwargs": {"size": 1},
    "prompt_embeds": "AAAA",
}


@pytest.mark.parametrize(
    "field", sorted(vllm_extras(VLLMChatRequest, ChatCompletionRequest) & set(REFUSED_VALUES))
)
def test_refused_chat_extra_is_a_400_naming_it(field: str) -> None:
    request = _chat(**{field: REFUSED_VALUES[field]})
    with pytest.raises(OpenAIError) as caught:
        protocol.chat_messages(request)
        request.to_sampling_params(prompt_tokens=4, max_model_len=64)
    assert (caught.value.status, caught.value.param) == (400, field)
    assert f"'{field}'" in caught.value.message


@pytest.mark.parametrize(
    "field",
    sorted(
        (vllm_extras(VLLMCompletionRequest, CompletionRequest) & set(REFUSED_VALUES)) | {"add_special_tokens"}
    ),
)
def test_refused_completion_extra_is_a_400_naming_it(field: str) -> None:
    value = False if field == "add_special_tokens" else REFUSED_VALUES[field]
    with pytest.raises(OpenAIError) as caught:
        _completion(**{field: value}).to_sampling_params(prompt_tokens=4, max_model_len=64)
    assert (caught.value.status, caught.value.param) == (400, field)
    assert f"'{field}'" in caught.value.message


def test_extras_at_their_off_value_and_ignored_ones_are_accepted() -> None:
    off = {
        "use_beam_search": False, "length_penalty": 1.0, "priority": 0, "add_generation_prompt": True,
        "continue_final_message": False, "echo": False, "chat_template_kwargs": {}, "vllm_xargs": {},
        "session_id": "s", "parallel_tool_calls": False, "include_reasoning": False,
        "truncation_side": "left",
    }  # fmt: skip
    _chat(**off).to_sampling_params(prompt_tokens=4, max_model_len=64)
    _completion(add_special_tokens=True, use_beam_search=False).to_sampling_params(
        prompt_tokens=4, max_model_len=64
    )


def test_sampling_extras_reach_sampling_params() -> None:
    params = _chat(
        top_k=3, min_p=0.1, repetition_penalty=1.3, min_tokens=5, max_tokens=9, stop_token_ids=[7],
        include_stop_str_in_output=True, ignore_eos=True, skip_special_tokens=False,
        spaces_between_special_tokens=False, allowed_token_ids=[1, 2], bad_words=["x"], stream_interval=2,
    ).to_sampling_params(prompt_tokens=4, max_model_len=64)  # fmt: skip
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (3, 0.1, 1.3, 5)
    assert (params.stop_token_ids, params.allowed_token_ids, params.bad_words) == ([7], [1, 2], ["x"])
    assert params.include_stop_str_in_output and params.ignore_eos and params.stream_interval == 2
    assert not params.skip_special_tokens and not params.spaces_between_special_tokens
    defaults = _completion().to_sampling_params(prompt_tokens=4, max_model_len=64)
    assert (defaults.top_k, defaults.min_p, defaults.repetition_penalty, defaults.min_tokens) == (
        0,
        0.0,
        1.0,
        0,
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"stream_interval": 0}, "stream_interval"),
    ],
)
def test_sampling_extra_out_of_vllms_bounds_names_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        _completion(**fields).to_sampling_params(prompt_tokens=4, max_model_len=64)
    assert caught.value.param == param


# ------------------------------------------------------------------------------------------------ vs vLLM

NAME = "tiny"
CHAT = {"messages": [{"role": "user", "content": "Tell me about the harbor."}], "max_tokens": 24}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 24}


@dataclass
class Baseline:
    """What the comparison's extras are built from: the base's greedy answer as token ids, per endpoint."""

    ids: dict[str, list[int]]
    texts: dict[str, str]


Extras = Callable[[Baseline, str], dict[str, Any]]


def _stop_id(base: Baseline, path: str) -> dict[str, Any]:
    return {"stop_token_ids": [base.ids[path][4]]}


def _allowed(base: Baseline, path: str) -> dict[str, Any]:
    return {"allowed_token_ids": sorted(set(base.ids[path][1:6]))}


def _min_tokens(base: Baseline, path: str) -> dict[str, Any]:
    # min_tokens holds back stop token ids as it holds back EOS, which this base does not reach in 40 tokens.
    return {**_stop_id(base, path), "min_tokens": 12, "max_tokens": 40}


def _bad_word(base: Baseline, path: str) -> dict[str, Any]:
    return {"bad_words": [base.texts[path].split()[0]]}


def _stop_string(base: Baseline, path: str) -> dict[str, Any]:
    text = base.texts[path]
    middle = len(text) // 3
    return {"stop": [text[middle : middle + 3]], "include_stop_str_in_output": True}


def _fixed(**fields: Any) -> Extras:
    return lambda base, path: fields


# Each applied extra, with the fields that make it visible; sampled rows fix the seed.
CASES: dict[str, Extras] = {
    "none": _fixed(),
    "top_k": _fixed(top_k=3, temperature=1.0, seed=7),
    "min_p": _fixed(min_p=0.2, temperature=1.0, seed=7),
    "repetition_penalty": _fixed(repetition_penalty=1.8),
    "min_tokens": _min_tokens,
    "stop_token_ids": _stop_id,
    "include_stop_str_in_output": _stop_string,
    "ignore_eos": _fixed(ignore_eos=True, max_tokens=40),
    "skip_special_tokens": _fixed(skip_special_tokens=False, ignore_eos=True, max_tokens=40),
    "spaces_between_special_tokens": _fixed(
        spaces_between_special_tokens=False, skip_special_tokens=False, ignore_eos=True, max_tokens=40
    ),
    "allowed_token_ids": _allowed,
    "bad_words": _bad_word,
    "stream_interval": _fixed(stream=True, stream_interval=4),
}
PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
# Rows whose extra leaves this base's answer as it is: stream_interval changes only how the text is chunked,
# and this base writes 40 tokens without an EOS or any other special token.
UNCHANGED = {"none", "stream_interval", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"}


@pytest.fixture(scope="module")
def both_servers(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Ours and vLLM's own OpenAI server on the same tiny base and engine settings (base only)."""
    root = tmp_path_factory.mktemp("vllm-extras")
    (root / "adapters").mkdir()
    ours: Server = start_server(tiny_base, root / "adapters", root / "ours.log", "--served-model-name", NAME)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_base)]
    command += ["--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--enable-lora"]
    # vLLM's defaults for unset sampling fields (ours are OpenAI's), not the base's generation_config.
    command += ["--generation-config", "vllm"]
    command += engine_flags()
    theirs = ServerProcess("vllm", command, f"http://127.0.0.1:{port}", root / "vllm.log", cwd=REPO_ROOT)
    theirs.launch()
    try:
        ours.wait_ready(600)
        theirs.wait_ready(600)
        yield ours.url, theirs.url
    finally:
        theirs.stop(grace_s=60)
        stop_server(ours)


def answer(url: str, path: str, body: dict[str, Any]) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion tokens) of one request; a stream's chunks joined."""
    body = {"model": NAME, "temperature": 0.0, "seed": 0, **body}
    if not body.get("stream"):
        response = httpx.post(f"{url}{path}", json=body, timeout=120)
        assert response.status_code == 200, response.text
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return text, choice["finish_reason"], data["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    parts: list[str] = []
    finish, tokens = None, -1
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(parts), finish, tokens


@pytest.fixture(scope="module")
def baseline(both_servers: tuple[str, str], tiny_tokenizer: Any) -> Baseline:
    _, theirs = both_servers
    texts = {path: answer(theirs, path, body)[0] for path, body in PATHS.items()}
    ids = {
        path: list(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        for path, text in texts.items()
    }
    return Baseline(ids=ids, texts=texts)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_extra_answers_as_vllms_own_server(
    both_servers: tuple[str, str], baseline: Baseline, path: str, case: str
) -> None:
    ours, theirs = both_servers
    body = {**PATHS[path], **CASES[case](baseline, path)}
    mine = answer(ours, path, body)
    assert mine == answer(theirs, path, body), body
    if case not in UNCHANGED:
        # The extra is applied, not dropped: without it the same request answers otherwise.
        assert answer(ours, path, {key: value for key, value in body.items() if key != case}) != mine, body


def respond(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A /v1/responses answer as JSON, and the event types of the same request streamed (a run of deltas as
    one)."""
    body = {"model": NAME, "temperature": 0.0, **body}
    whole = httpx.post(f"{url}/v1/responses", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}, timeout=120) as answer:
        assert answer.status_code == 200
        kinds = [line.removeprefix("event: ") for line in answer.iter_lines() if line.startswith("event: ")]
    # How many deltas depends on timing (vLLM merges the engine's outputs that wait for a slow reader): one
    # stands for a run.
    runs = [kind for index, kind in enumerate(kinds) if index == 0 or kind != kinds[index - 1]]
    return whole.json(), runs


def _summary(response: dict[str, Any]) -> tuple[Any, ...]:
    (message,) = response["output"]
    usage = response["usage"]
    text = "".join(part["text"] for part in message["content"])
    return (
        text,
        response["status"],
        response["incomplete_details"],
        usage["input_tokens"],
        usage["output_tokens"],
    )


@pytest.mark.slow
def test_responses_answer_as_vllms_own_server(both_servers: tuple[str, str]) -> None:
    ours, theirs = both_servers
    body = {"instructions": "Answer in one line.", "input": "Name three colours.", "max_output_tokens": 16}
    mine, my_events = respond(ours, body)
    vllms, vllm_events = respond(theirs, body)
    assert _summary(mine) == _summary(vllms)
    assert _summary(mine)[1] == "incomplete"
    # vLLM ends every stream with response.completed; OpenAI ends one cut short with response.incomplete.
    assert my_events[:-1] == vllm_events[:-1]
    assert (my_events[-1], vllm_events[-1]) == ("response.incomplete", "response.completed")
    # Ended by a stop string from the text (vLLM's extra): complete on both, the same events.
    stop = _summary(mine)[0][5:8]
    mine, my_events = respond(ours, {**body, "stop": [stop]})
    vllms, vllm_events = respond(theirs, {**body, "stop": [stop]})
    assert _summary(mine) == _summary(vllms) and _summary(mine)[1] == "completed"
    assert my_events == vllm_events
