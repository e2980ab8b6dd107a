"""The OpenAI wire format: validation, mapping to SamplingParams, logprobs, and parsing by the openai SDK."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from openai.types import Completion as SDKCompletion
from openai.types import Model as SDKModel
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk
from pydantic import ValidationError
from vllm.logprobs import Logprob
from vllm.sampling_params import RequestOutputKind

from serve import protocol
from serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from serve.routes import error_response

MAX_LEN = 512


def chat(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "base", "prompt": "hi", **fields})


def params_of(request: ChatCompletionRequest | CompletionRequest, prompt_tokens: int = 10) -> Any:
    return request.to_sampling_params(prompt_tokens=prompt_tokens, max_model_len=MAX_LEN)


def refused(request: ChatCompletionRequest | CompletionRequest, prompt_tokens: int = 10) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        params_of(request, prompt_tokens)
    assert caught.value.status == 400
    return caught.value


# ------------------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -0.1, "at least 0 and at most 2"),
        ("temperature", 2.5, "at least 0 and at most 2"),
        ("temperature", float("nan"), "at least 0 and at most 2"),
        ("top_p", 0.0, "greater than 0 and at most 1"),
        ("top_p", 1.5, "greater than 0 and at most 1"),
        ("n", 0, "at least 1 and at most 128"),
        ("n", 129, "at least 1 and at most 128"),
        ("presence_penalty", -2.5, "at least -2 and at most 2"),
        ("frequency_penalty", 2.5, "at least -2 and at most 2"),
    ],
)
@pytest.mark.parametrize("make", [chat, completion])
def test_range_violation_names_param_and_range(make: Any, field: str, value: float, allowed: str) -> None:
    error = refused(make(**{field: value}))
    assert error.param == field
    assert field in error.message and allowed in error.message


def test_top_logprobs_range_and_needs_logprobs() -> None:
    error = refused(chat(logprobs=True, top_logprobs=21))
    assert error.param == "top_logprobs" and "at most 20" in error.message
    error = refused(chat(top_logprobs=3))
    assert error.param == "top_logprobs" and "logprobs=true" in error.message


def test_completion_logprobs_range() -> None:
    error = refused(completion(logprobs=6))
    assert error.param == "logprobs" and "at least 0 and at most 5" in error.message


def test_max_tokens_below_one_refused() -> None:
    assert refused(chat(max_tokens=0)).param == "max_tokens"
    assert refused(completion(max_tokens=0)).param == "max_tokens"


def test_stop_limits() -> None:
    assert refused(chat(stop=["a", "b", "c", "d", "e"])).param == "stop"
    assert refused(chat(stop=[""])).param == "stop"


# ------------------------------------------------------------------------------------------------ context


@pytest.mark.parametrize(("make", "param"), [(chat, "messages"), (completion, "prompt")])
def test_prompt_longer_than_context(make: Any, param: str) -> None:
    error = refused(make(), prompt_tokens=600)
    assert error.param == param
    assert "maximum context length is 512 tokens; your prompt has 600 tokens" in error.message
    assert refused(make(), prompt_tokens=MAX_LEN).param == param


def test_max_tokens_past_the_context_stop_at_the_context_as_in_vllm() -> None:
    # vLLM's get_max_tokens: min(max_tokens, max_model_len - prompt); lm-eval and other harnesses rely on it.
    assert params_of(chat(max_tokens=100), prompt_tokens=500).max_tokens == 12
    assert params_of(chat(max_completion_tokens=100), prompt_tokens=500).max_tokens == 12
    assert params_of(completion(max_tokens=13), prompt_tokens=500).max_tokens == 12
    assert params_of(completion(max_tokens=MAX_LEN), prompt_tokens=1).max_tokens == MAX_LEN - 1


def test_max_tokens_over_the_whole_context_states_the_numbers() -> None:
    # vLLM refuses these too (its TokenizeParams: max_tokens cannot be greater than max_model_len).
    error = refused(chat(max_tokens=MAX_LEN + 1), prompt_tokens=500)
    assert error.param == "max_tokens" and error.code == "context_length_exceeded"
    assert all(number in error.message for number in ("512", "513", "500", "at most 12"))
    assert refused(chat(max_completion_tokens=MAX_LEN + 1)).param == "max_completion_tokens"
    assert refused(completion(max_tokens=MAX_LEN + 1)).param == "max_tokens"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert params_of(chat(max_tokens=50, max_completion_tokens=7)).max_tokens == 7
    assert params_of(chat(max_tokens=50)).max_tokens == 50


def test_default_max_tokens() -> None:
    assert params_of(chat(), prompt_tokens=100).max_tokens == MAX_LEN - 100
    assert params_of(completion(), prompt_tokens=100).max_tokens == 16
    assert params_of(completion(max_tokens=None), prompt_tokens=100).max_tokens == 16
    # An unset default never overruns the context; only an explicit max_tokens is refused.
    assert params_of(completion(), prompt_tokens=MAX_LEN - 5).max_tokens == 5


# ------------------------------------------------------------------------------------------------ mapping


def test_defaults_and_output_kind() -> None:
    params = params_of(chat(seed=7))
    assert (params.temperature, params.top_p, params.n, params.seed) == (1.0, 1.0, 1, 7)
    assert params.output_kind == RequestOutputKind.FINAL_ONLY
    assert params.logprobs is None and params.structured_outputs is None
    assert params_of(chat(stream=True)).output_kind == RequestOutputKind.DELTA
    assert params_of(completion(stream=True)).output_kind == RequestOutputKind.DELTA


@pytest.mark.parametrize(("stop", "expected"), [("END", ["END"]), (["a", "b"], ["a", "b"]), (None, [])])
def test_stop(stop: Any, expected: list[str]) -> None:
    assert params_of(chat(stop=stop)).stop == expected
    assert params_of(completion(stop=stop)).stop == expected


def test_greedy_with_several_choices_is_allowed() -> None:
    params = params_of(chat(n=3, temperature=0))
    assert params.n == 3 and params.top_k == 1
    assert params_of(chat(temperature=0)).temperature == 0


def test_logprobs_mapping() -> None:
    assert params_of(chat(logprobs=True)).logprobs == 0
    assert params_of(chat(logprobs=True, top_logprobs=5)).logprobs == 5
    assert params_of(chat(logprobs=False)).logprobs is None
    params = params_of(completion(logprobs=3))
    assert params.logprobs == 3 and params.prompt_logprobs is None
    assert params_of(completion(logprobs=2, echo=True)).prompt_logprobs == 2


def test_echo_without_generation() -> None:
    request = completion(echo=True, max_tokens=0)
    assert request.echo_only
    assert params_of(request).max_tokens == 1


def test_response_format_mapping() -> None:
    assert params_of(chat(response_format={"type": "text"})).structured_outputs is None
    json_object = params_of(chat(response_format={"type": "json_object"})).structured_outputs
    assert json_object.json_object is True
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = params_of(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            }
        )
    ).structured_outputs
    assert json_schema.json == schema
    assert refused(chat(response_format={"type": "json_schema"})).param == "response_format"
    missing = chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert refused(missing).param == "response_format"


# ------------------------------------------------------------------------------------------------ unsupported


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("logit_bias", {"50256": -100}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_unsupported_chat_params_refused(field: str, value: Any) -> None:
    request = chat(**{field: value})
    error = refused(request)
    assert error.param == field and field in error.message
    with pytest.raises(OpenAIError):
        protocol.chat_messages(request)


def test_harmless_extras_ignored() -> None:
    params_of(chat(logit_bias={}, function_call="none", modalities=["text"], metadata={"k": "v"}, top_k=3))
    params_of(completion(suffix="", best_of=1, user="u"))


@pytest.mark.parametrize(("field", "value"), [("suffix", "tail"), ("best_of", 3), ("logit_bias", {"1": 5})])
def test_unsupported_completion_params_refused(field: str, value: Any) -> None:
    assert refused(completion(**{field: value})).param == field


# ------------------------------------------------------------------------------------------------ tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tool_choice_defaults_as_in_vllm() -> None:
    assert chat().effective_tool_choice == "none"
    assert chat(tools=[WEATHER]).effective_tool_choice == "auto"
    assert chat(tools=[WEATHER], tool_choice="none").effective_tool_choice == "none"
    # Tools are rendered even with tool_choice none, vLLM's default; its exclude flag leaves them out.
    assert chat(tools=[WEATHER], tool_choice="none").prompt_tools() == [WEATHER]
    # As vLLM passes tools to the template: unset description and parameters as None, no extra fields.
    bare = {"type": "function", "function": {"name": "f", "extra": 1}}
    assert chat(tools=[bare], tool_choice="none").prompt_tools() == [
        {"type": "function", "function": {"name": "f", "description": None, "parameters": None}}
    ]
    assert chat(tools=[WEATHER], tool_choice="none").prompt_tools(exclude_when_none=True) is None
    assert chat(tools=[WEATHER]).prompt_tools(exclude_when_none=True) == [WEATHER]
    assert chat().prompt_tools() is None


@pytest.mark.parametrize(
    ("fields", "auto_tools", "param", "message"),
    [
        ({"tools": []}, True, "tools", "`tools` must not be an empty array"),
        ({"tool_choice": "auto"}, True, "tool_choice", "When using `tool_choice`, `tools` must be set."),
        ({"tool_choice": "required"}, True, "tool_choice", "`tools` must be set"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            True,
            "tool_choice",
            "The tool specified in `tool_choice` ('get_time') does not match any of the specified `tools`",
        ),
        # Without --enable-auto-tool-choice: tools sent alone default to "auto", which needs the parser.
        (
            {"tools": [WEATHER]},
            False,
            "tool_choice",
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required"},
            False,
            "tool_choice",
            'tool_choice="required" requires --enable-auto-tool-choice and --tool-call-parser',
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            False,
            "tool_choice",
            'tool_choice=function "get_weather" requires --enable-auto-tool-choice',
        ),
    ],
)
def test_tool_rules_are_vllms(fields: dict[str, Any], auto_tools: bool, param: str, message: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        chat(**fields).check_tools(auto_tools=auto_tools)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert message in caught.value.message


@pytest.mark.parametrize("auto_tools", [True, False])
def test_tool_choice_none_is_accepted_with_or_without_a_parser(auto_tools: bool) -> None:
    chat(tools=[WEATHER], tool_choice="none").check_tools(auto_tools=auto_tools)
    chat().check_tools(auto_tools=auto_tools)
    if auto_tools:
        for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
            chat(tools=[WEATHER], tool_choice=choice).check_tools(auto_tools=True)


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        ("any", "tool_choice"),
        ({"type": "function"}, "tool_choice"),
        ({"function": {"name": 3}}, "tool_choice"),
    ],
)
def test_malformed_tool_choice_is_a_400_naming_it(choice: Any, param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        chat(tools=[WEATHER], tool_choice=choice)
    error = protocol.validation_error(caught.value.errors())
    assert error.param is not None and error.param.startswith(param)


def test_tool_constraint_reaches_sampling() -> None:
    from vllm.sampling_params import StructuredOutputsParams

    forced = StructuredOutputsParams(structural_tag='{"type": "structural_tag"}')
    request = chat(
        tools=[WEATHER],
        tool_choice="required",
        response_format={"type": "json_object"},
        skip_special_tokens=True,
    )
    constraint = protocol.ToolConstraint(structured=forced, skip_special_tokens=False)
    params = request.to_sampling_params(prompt_tokens=10, max_model_len=MAX_LEN, tool_constraint=constraint)
    # The forced call wins over response_format, as in vLLM; the call's special tokens stay in the text.
    assert params.structured_outputs == forced and params.skip_special_tokens is False
    auto = protocol.ToolConstraint(structured=None, skip_special_tokens=False)
    params = request.to_sampling_params(prompt_tokens=10, max_model_len=MAX_LEN, tool_constraint=auto)
    assert params.structured_outputs is not None and params.structured_outputs.json_object
    assert params_of(request).skip_special_tokens is True


def test_tool_calls_and_results_in_the_conversation() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    request = ChatCompletionRequest.model_validate(
        {
            "model": "base",
            "tools": [WEATHER],
            "tool_choice": "none",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C"}]},
            ],
        }
    )
    # OpenAI's shape, arguments as text: the shared renderer adapts them for the template.
    assert protocol.chat_messages(request) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]


def test_tool_calls_only_on_assistant_messages() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = chat(messages=[{"role": "user", "content": "x", "tool_calls": [call]}])
    with pytest.raises(OpenAIError) as caught:
        protocol.chat_messages(request)
    assert caught.value.param == "messages[0].tool_calls"
    legacy = chat(messages=[{"role": "assistant", "content": "x", "function_call": {"name": "f"}}])
    with pytest.raises(OpenAIError) as caught:
        protocol.chat_messages(legacy)
    assert caught.value.param == "messages[0].function_call"


def test_sdk_parses_tool_call_responses() -> None:
    message = protocol.AssistantMessage(
        content=None,
        tool_calls=[
            protocol.ToolCall(
                id="chatcmpl-tool-1", function=protocol.FunctionCall(name="f", arguments='{"a": 1}')
            )
        ],
    )
    body = protocol.ChatCompletion(
        model="base",
        choices=[protocol.ChatCompletionChoice(index=0, message=message, finish_reason="tool_calls")],
        usage=protocol.Usage.of(3, 4),
    ).model_dump()
    parsed = SDKChatCompletion.model_validate(body)
    assert parsed.choices[0].finish_reason == "tool_calls"
    (call,) = parsed.choices[0].message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == ("chatcmpl-tool-1", "f", '{"a": 1}')
    delta = protocol.ChatDelta(
        tool_calls=[
            protocol.DeltaToolCall(
                index=0, id="chatcmpl-tool-1", type="function", function=protocol.DeltaFunctionCall(name="f")
            )
        ]
    )
    chunk = protocol.ChatCompletionChunk(
        id="c", created=0, model="base", choices=[protocol.ChatCompletionChunkChoice(index=0, delta=delta)]
    )
    (streamed,) = SDKChatCompletionChunk.model_validate(chunk.model_dump()).choices[0].delta.tool_calls or []
    assert streamed.function is not None and streamed.function.name == "f"


# ------------------------------------------------------------------------------------------------ messages


def test_developer_role_and_text_parts() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "base",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "name": "bot"},
            ],
        }
    )
    assert protocol.chat_messages(request) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


def test_image_part_refused() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "base",
            "messages": [
                {"role": "system", "content": "x"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}]},
            ],
        }
    )
    with pytest.raises(OpenAIError) as caught:
        protocol.chat_messages(request)
    assert caught.value.param == "messages[1].content"
    assert "messages[1].content" in caught.value.message and "image_url" in caught.value.message


def test_pydantic_errors_become_400_naming_the_field() -> None:
    def from_body(body: dict[str, Any]) -> OpenAIError:
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate(body)
        errors = [{**error, "loc": ("body", *error["loc"])} for error in caught.value.errors()]
        return protocol.validation_error(errors)

    base = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    error = from_body({**base, "temperature": "hot"})
    assert (error.status, error.param) == (400, "temperature") and "'temperature'" in error.message
    error = from_body({**base, "messages": [{"role": "function", "content": "x"}]})
    assert error.param == "messages[0].role" and "'messages[0].role'" in error.message
    error = from_body({**base, "messages": [{"role": "user", "content": 5}]})
    assert error.param == "messages[0].content"
    error = from_body({"model": "base"})
    assert error.param == "messages" and "Missing required parameter" in error.message
    error = from_body({**base, "messages": []})
    assert error.param == "messages"


# ------------------------------------------------------------------------------------------------ logprobs


def decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_chat_logprobs_conversion() -> None:
    steps: list[dict[int, Logprob] | None] = [
        # The sampled token (7) is rank 3: vLLM puts it first, then the top-2.
        {
            7: Logprob(-2.0, rank=3, decoded_token="é"),
            1: Logprob(-0.5, rank=1, decoded_token="a"),
            2: Logprob(-1.0, rank=2, decoded_token="b"),
        },
        {1: Logprob(float("-inf"), rank=1, decoded_token=None)},
        None,
    ]
    result = protocol.chat_logprobs([7, 1, 9], steps, decode, top_logprobs=2).model_dump()
    first, second, third = result["content"]
    assert (first["token"], first["logprob"], first["bytes"]) == ("é", -2.0, [0xC3, 0xA9])
    assert [top["token"] for top in first["top_logprobs"]] == ["a", "b"]
    assert first["top_logprobs"][0] == {"token": "a", "logprob": -0.5, "bytes": [97]}
    assert (second["token"], second["logprob"]) == ("<1>", protocol.MIN_LOGPROB)
    assert third["token"] == "<9>" and third["top_logprobs"] == []
    assert protocol.chat_logprobs([7], steps[:1], decode, top_logprobs=0).content[0].top_logprobs == []  # type: ignore[index]


def test_completion_logprobs_conversion() -> None:
    steps: list[dict[int, Logprob] | None] = [
        None,  # the first prompt token of an echo has no logprob
        {5: Logprob(-0.1, rank=1, decoded_token=" wor"), 6: Logprob(-3.0, rank=2, decoded_token="x")},
        {8: Logprob(-4.0, rank=9, decoded_token="ld"), 5: Logprob(-0.2, rank=1, decoded_token=" wor")},
    ]
    result = protocol.completion_logprobs([4, 5, 8], steps, decode, top_logprobs=1, text_offset=3)
    assert result.tokens == ["<4>", " wor", "ld"]
    assert result.token_logprobs == [None, -0.1, -4.0]
    assert result.top_logprobs == [None, {" wor": -0.1}, {" wor": -0.2, "ld": -4.0}]
    assert result.text_offset == [3, 6, 10]


@pytest.mark.parametrize(
    ("vllm_reason", "openai_reason"),
    [("stop", "stop"), ("length", "length"), ("abort", "stop"), (None, None)],
)
def test_finish_reason(vllm_reason: str | None, openai_reason: str | None) -> None:
    assert protocol.finish_reason(vllm_reason) == openai_reason


def test_engine_error_finish_is_a_500() -> None:
    with pytest.raises(OpenAIError) as caught:
        protocol.finish_reason("error")
    assert caught.value.status == 500


# ------------------------------------------------------------------------------------------------ responses


def test_chat_completion_parses_in_sdk() -> None:
    logprobs = protocol.chat_logprobs(
        [1], [{1: Logprob(-0.5, rank=1, decoded_token="a")}], decode, top_logprobs=1
    )
    ours = protocol.ChatCompletion(
        model="base",
        choices=[
            protocol.ChatCompletionChoice(
                index=0,
                message=protocol.AssistantMessage(content="a"),
                logprobs=logprobs,
                finish_reason="stop",
            )
        ],
        usage=protocol.Usage.of(3, 1),
    )
    parsed = SDKChatCompletion.model_validate(ours.model_dump(exclude_none=False))
    assert parsed.id.startswith("chatcmpl-") and parsed.choices[0].message.content == "a"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].token == "a"  # type: ignore[union-attr,index]
    assert parsed.usage is not None and parsed.usage.total_tokens == 4


def test_chat_chunks_parse_in_sdk() -> None:
    first = protocol.ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="base",
        choices=[
            protocol.ChatCompletionChunkChoice(
                index=0, delta=protocol.ChatDelta(role="assistant", content="")
            )
        ],
    )
    last = protocol.ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="base",
        choices=[
            protocol.ChatCompletionChunkChoice(index=0, delta=protocol.ChatDelta(), finish_reason="length")
        ],
    )
    usage = protocol.ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="base", choices=[], usage=protocol.Usage.of(3, 2)
    )
    assert SDKChatCompletionChunk.model_validate(first.model_dump()).choices[0].delta.role == "assistant"
    assert SDKChatCompletionChunk.model_validate(last.model_dump()).choices[0].finish_reason == "length"
    parsed = SDKChatCompletionChunk.model_validate(usage.model_dump())
    assert parsed.choices == [] and parsed.usage is not None and parsed.usage.completion_tokens == 2


def test_completion_and_chunk_parse_in_sdk() -> None:
    logprobs = protocol.completion_logprobs(
        [1], [{1: Logprob(-0.5, rank=1, decoded_token="a")}], decode, top_logprobs=0
    )
    ours = protocol.Completion(
        model="base",
        choices=[protocol.CompletionChoice(index=0, text="a", logprobs=logprobs, finish_reason="length")],
        usage=protocol.Usage.of(2, 1),
    )
    parsed = SDKCompletion.model_validate(ours.model_dump(exclude_none=False))
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.tokens == ["a"]
    chunk = protocol.CompletionChunk(
        id="cmpl-1",
        created=1,
        model="base",
        choices=[protocol.CompletionChunkChoice(index=0, text="a", finish_reason="stop")],
    )
    assert SDKCompletion.model_validate(chunk.model_dump()).choices[0].text == "a"


def test_model_card_parses_in_sdk() -> None:
    card = protocol.ModelCard(id="my-adapter", parent="base", root="/adapters/my", max_model_len=MAX_LEN)
    parsed = SDKModel.model_validate(card.model_dump())
    assert parsed.id == "my-adapter" and parsed.object == "model"
    listing = protocol.ModelList(data=[card]).model_dump()
    assert listing["object"] == "list" and listing["data"][0]["parent"] == "base"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "sdk_error", "error_type", "code"),
    [
        (400, openai.BadRequestError, "invalid_request_error", None),
        (401, openai.AuthenticationError, "authentication_error", "invalid_api_key"),
        (403, openai.PermissionDeniedError, "permission_error", None),
        (404, openai.NotFoundError, "not_found_error", None),
        (409, openai.ConflictError, "conflict_error", None),
        (500, openai.InternalServerError, "internal_server_error", None),
        (503, openai.InternalServerError, "service_unavailable", None),
    ],
)
def test_error_bodies_raise_the_sdks_typed_errors(
    status: int, sdk_error: type[Exception], error_type: str, code: str | None
) -> None:
    error = OpenAIError("went wrong", status=status, param="x")
    assert error.body() == {
        "error": {"message": "went wrong", "type": error_type, "param": "x", "code": code}
    }
    response = error_response(error)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            response.status_code, content=bytes(response.body), headers={"content-type": "application/json"}
        )

    client = openai.OpenAI(
        api_key="k",
        base_url="http://test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with pytest.raises(sdk_error) as caught:
        client.models.list()
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == status
    assert caught.value.body == error.body()["error"]


def test_model_not_found() -> None:
    error = OpenAIError.model_not_found("nope")
    assert (error.status, error.param, error.code, error.type) == (
        404,
        "model",
        "model_not_found",
        "not_found_error",
    )
    assert "nope" in error.message


def test_explicit_type_wins() -> None:
    assert OpenAIError("down", status=503, type="server_error").body()["error"]["type"] == "server_error"


# ---------------------------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("make", [chat, completion])
def test_seed_outside_what_the_engine_takes_is_refused(make: Any) -> None:
    # Above 2**64 - 1 it reached the engine and came back as a 500.
    for seed in (2**64, -(2**63) - 1, 10**30):
        error = refused(make(seed=seed))
        assert error.param == "seed" and "from -9223372036854775808 to 18446744073709551615" in error.message
    assert params_of(make(seed=2**64 - 1)).seed == 2**64 - 1


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(messages=[{"role": "user", "content": "\ud800 hi"}]), "messages[0].content"),
        (
            chat(
                messages=[
                    {"role": "system", "content": "ok"},
                    {"role": "user", "content": [{"type": "text", "text": "a\udfff"}]},
                ]
            ),
            "messages[1].content[0].text",
        ),
        (chat(stop=["ok", "\udc80"]), "stop[1]"),
        (completion(prompt=["fine", "bad \ud83d"]), "prompt[1]"),
        (completion(suffix="\ud800"), "suffix"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(
    request_: ChatCompletionRequest | CompletionRequest, param: str
) -> None:
    # JSON's \u escapes can write them, UTF-8 cannot encode them: the tokenizer failed with a 500.
    with pytest.raises(OpenAIError) as caught:
        protocol.check_text(request_)
    assert caught.value.status == 400 and caught.value.param == param
    assert "lone surrogate" in caught.value.message
    protocol.check_text(chat(messages=[{"role": "user", "content": "caf\u00e9 \U0001f600 \u4e2d"}]))


def test_oversized_response_format_schema_is_refused() -> None:
    # A 100k-item enum took 108 s to compile in the engine and kept 560 MB there.
    schema = {"type": "string", "enum": [f"item-{i}" for i in range(100_000)]}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = refused(request)
    assert error.param == "response_format" and "this server takes at most 65536" in error.message


def test_tool_call_arguments_that_are_not_an_object_render_as_empty(caplog: pytest.LogCaptureFixture) -> None:
    def arguments(text: str) -> str:
        call = {"type": "function", "function": {"name": "f", "arguments": text}}
        request = chat(messages=[{"role": "assistant", "content": None, "tool_calls": [call]}])
        return str(protocol.chat_messages(request)[0]["tool_calls"][0]["function"]["arguments"])

    assert arguments('{"a": 1}') == '{"a": 1}'
    assert arguments("") == ""
    for text in ("{not json", "[1, 2]", "42"):
        assert arguments(text) == "{}"
    assert "not a JSON object" in caplog.text
