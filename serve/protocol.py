"""OpenAI wire format for /v1/chat/completions, /v1/completions and /v1/models, and vLLM's for /tokenize,
/detokenize and /version: request and response models, their validation, each request's mapping to
`vllm.SamplingParams` (`to_sampling_params`), and OpenAI-shaped errors. Pydantic and vLLM's types only: no
HTTP (serve/routes.py turns these into responses).

Requests are parsed by pydantic for types only; every semantic check (ranges, context length,
parameters we cannot honour) raises `OpenAIError` from `chat_messages` or `to_sampling_params`,
so the HTTP layer needs one exception handler for `OpenAIError` and one for pydantic's validation errors
(via `validation_error`).

Decisions worth knowing:
- Unset sampling fields take OpenAI's defaults (temperature 1, top_p 1, penalties 0), not the base
  model's generation_config, so a request means the same on every model.
- max_tokens past the context is clamped to the room the prompt leaves, as vLLM's server does (the answer
  stops there with finish_reason "length"); a prompt that fills the context, or max_tokens over the whole
  context, is a 400 naming the lengths.
- OpenAI allows n>1 at temperature 0 (n identical greedy answers); vLLM refuses n>1 with greedy
  sampling, so that case samples at temperature 1 from top_k=1, which is the same argmax.
- Unknown fields are accepted and ignored (as OpenAI and vLLM do), except the ones that would change the
  answer if ignored (logit_bias, suffix, functions, ...): those are refused with a 400 naming them.
- Tools are vLLM's: rendered by the chat template (also with tool_choice "none", vLLM's default), checked
  by vLLM's rules (`check_tools`), and parsed by vLLM's tool parser in serve/serving.py; a call that
  tool_choice forces is a grammar vLLM's parser builds (`ToolConstraint`).
- vLLM's own extras are vLLM's names, bounds and meanings: the sampling ones (top_k, min_p,
  repetition_penalty, min_tokens, stop_token_ids, bad_words, ...) are modelled, published and applied as
  vLLM's server applies them; the rest (`_UNSERVED_EXTRAS`: beam search, chat-template overrides, prompt
  truncation, returned token ids, ...) are accepted at their "off" value and otherwise refused with a 400
  that names the field and says why.
- vLLM finish reasons map as stop->stop, length->length, abort->stop (the client went away, nobody
  reads it), repetition->stop; error -> a 500 `OpenAIError`.
- Token strings in logprobs are vLLM's decoded tokens; `bytes` are their UTF-8 encoding, so a token
  that is part of a multi-byte character shows U+FFFD rather than its raw bytes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    check_json_nesting,
)

MAX_N = 128
MAX_STOP_SEQUENCES = 4
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# A response_format schema is compiled into a grammar in the engine: a 100k-item enum took 108 s there.
MAX_SCHEMA_BYTES = 64 << 10
_SURROGATE = re.compile("[\ud800-\udfff]")
# JSON has no -inf; OpenAI-compatible servers clamp to this floor.
MIN_LOGPROB = -9999.0
# vLLM leaves these unbounded above; its sampler holds them in int32 / float32 tensors.
MAX_INT32 = 2**31 - 1
MAX_FLOAT32 = 3.4028234663852886e38
# vLLM refuses over 128 bad-word token sequences (VLLM_MAX_NUM_BAD_WORDS); a word counts once or twice.
MAX_BAD_WORDS = 64

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
_ERROR_CODES = {401: "invalid_api_key"}


class OpenAIError(Exception):
    """An error that leaves the server as `{"error": {...}}` with its HTTP status.

    `type` (and, for 401, `code`) default from the status, so the openai SDK raises the matching
    typed exception (BadRequestError, AuthenticationError, NotFoundError, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}  # sent with the error (a 429's Retry-After)
        self.status = status
        self.type = type or _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code if code is not None else _ERROR_CODES.get(status)

    @classmethod
    def model_not_found(cls, model: str, why: str = "does not exist") -> OpenAIError:
        """The one 404 for a model this server does not serve (never the list of models: any key reads it)."""
        return cls(
            f"The model '{model}' {why}; GET /v1/models lists the models served here",
            status=404,
            param="model",
            code="model_not_found",
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error this server answers with, whatever its status (OpenAI's shape)."""

    error: ErrorDetail


# pydantic tags the branch of a union it tried with the branch's type ("str", "list[int]", "ContentPart");
# those are not field names and are cut from the reported param.
_UNION_BRANCH_TAGS = {"str", "int", "float", "bool", "bytes", "none"}


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            if not parts:
                break
            parts[-1] += f"[{item}]"
        elif item.isidentifier() and item.islower() and item not in _UNION_BRANCH_TAGS:
            parts.append(item)
        else:
            break
    return ".".join(parts) or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """A 400 for a request body pydantic refused (its `errors()`), naming the first offending field."""
    if not errors:
        return OpenAIError("Invalid request body")
    first = errors[0]
    param = _param_from_loc(first.get("loc", ()))
    if param is None:
        return OpenAIError(f"Invalid request body: {first.get('msg', 'not a JSON object')}")
    if first.get("type") == "missing":
        return OpenAIError(f"Missing required parameter: '{param}'", param=param)
    return OpenAIError(f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param=param)


# ------------------------------------------------------------------------------------------------ requests


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema defines it, as the published schema promises: 2 and 2.0, never 2.5, "2" or true
# (pydantic's lax int also takes "2"; its strict int refuses 2.0, which schemathesis flagged as a valid
# request refused).
JsonInt = Annotated[int, Field(strict=True), BeforeValidator(_integral)]


# Published, and refused by the serving layer with a message naming the prompt (pydantic's own min_length on a
# str also changes how lone surrogates are reported).
NonEmptyText = Annotated[str, Field(json_schema_extra={"minLength": 1})]
TokenIds = Annotated[list[int], Field(json_schema_extra={"minItems": 1})]
TokenId = Annotated[JsonInt, Field(json_schema_extra={"minimum": 0, "maximum": MAX_INT32})]


def _range(low: int, high: int) -> dict[str, Any]:
    """JSON Schema bounds for the published schema; to_sampling_params enforces them with messages that name
    the field and the range (pydantic's own would not)."""
    return {"minimum": low, "maximum": high}


class _Request(BaseModel):
    # Clients send fields we do not model (metadata, store, vLLM's top_k, ...); they are ignored,
    # except the ones `_refuse` lists.
    model_config = ConfigDict(extra="allow")


class ContentPart(_Request):
    """One part of a message's content; only {"type": "text", "text": ...} is served."""

    # The published schema says what is served; _message_text refuses other parts with a message that says so.
    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})

    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = Field(None, json_schema_extra={"type": "string"})


# ------------------------------------------------------------------------------------------------ tools
# OpenAI's function tools as vLLM's server takes them (vllm/entrypoints/openai/chat_completion/protocol.py).


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: StrictBool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def template_dict(self) -> dict[str, Any]:
        """The tool as vLLM hands it to the chat template (ChatCompletionToolsParam.model_dump): name,
        description and parameters always (None where unset), strict only where set, nothing else; a template
        that writes `tool | tojson` then renders the same text on both servers."""
        function: dict[str, Any] = {
            "name": self.function.name,
            "description": self.function.description,
            "parameters": self.function.parameters,
        }
        if self.function.strict is not None:
            function["strict"] = self.function.strict
        return {"type": "function", "function": function}


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """tool_choice {"type": "function", "function": {"name": ...}}: call this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class MessageFunctionCall(_Request):
    name: str = Field(json_schema_extra={"minLength": 1})
    arguments: str = ""  # a JSON object, as text (OpenAI's shape)


class MessageToolCall(_Request):
    """A call the assistant made earlier in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(_Request):
    # Published as chat_messages enforces it: only assistant messages carry tool calls.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
            "then": {"properties": {"tool_calls": {"type": "null"}}},
        }
    )

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # role assistant
    tool_call_id: str | None = None  # role tool: the call this message answers


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaSpec(_Request):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    # Published as the server enforces it: type json_schema needs json_schema.schema.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {
                    "json_schema": {
                        "type": "object",
                        "required": ["schema"],
                        "properties": {"schema": {"type": "object"}},
                    }
                },
            },
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _GenerationRequest(_Request):
    """What chat and text completion requests share: sampling and streaming."""

    model: str
    temperature: float | None = Field(None, json_schema_extra=_range(0, 2))
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    n: JsonInt = Field(1, json_schema_extra=_range(1, MAX_N))
    stop: NonEmptyText | list[NonEmptyText] | None = Field(
        None, json_schema_extra={"maxItems": MAX_STOP_SEQUENCES}
    )
    seed: JsonInt | None = Field(None, json_schema_extra=_range(*SEED_RANGE))
    presence_penalty: float | None = Field(None, json_schema_extra=_range(-2, 2))
    frequency_penalty: float | None = Field(None, json_schema_extra=_range(-2, 2))
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's sampling extras, with vLLM's defaults and meanings (its serving benchmark sends ignore_eos).
    top_k: JsonInt | None = Field(None, json_schema_extra=_range(-1, MAX_INT32))
    min_p: float | None = Field(None, json_schema_extra=_range(0, 1))
    repetition_penalty: float | None = Field(
        None, json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_FLOAT32}
    )
    min_tokens: JsonInt = Field(0, json_schema_extra=_range(0, MAX_INT32))
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = Field(None, json_schema_extra={"minItems": 1})
    # vLLM refuses a word that is only whitespace (it strips it to nothing).
    bad_words: list[Annotated[str, Field(json_schema_extra={"pattern": r"\S"})]] | None = Field(
        None, json_schema_extra={"maxItems": MAX_BAD_WORDS}
    )
    stream_interval: JsonInt | None = Field(None, json_schema_extra=_range(1, MAX_INT32))

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with the usage-only chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(
        self,
        *,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured: StructuredOutputsParams | None = None,
        skip_special_tokens: bool | None = None,
    ) -> SamplingParams:
        """The fields both request types share, checked, with what the request type worked out."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        presence_penalty = self.presence_penalty or 0.0
        frequency_penalty = self.frequency_penalty or 0.0
        _check_range("temperature", temperature, 0, 2)
        _check_range("top_p", top_p, 0, 1, low_open=True)
        _check_range("n", self.n, 1, MAX_N)
        _check_range("presence_penalty", presence_penalty, -2, 2)
        _check_range("frequency_penalty", frequency_penalty, -2, 2)
        self._check_vllm_sampling(max_tokens)
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise OpenAIError(
                f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}; got {self.seed}",
                param="seed",
            )
        stop = _stop(self.stop)
        skip_special = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens

        top_k = 0 if self.top_k is None else self.top_k
        if temperature == 0 and self.n > 1:
            temperature, top_k = 1.0, 1

        try:
            return SamplingParams.from_optional(
                n=self.n,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                seed=self.seed,
                stop=stop,
                stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                min_p=0.0 if self.min_p is None else self.min_p,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                skip_special_tokens=skip_special,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                stream_interval=self.stream_interval,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMValidationError as exc:
            raise OpenAIError(str(exc), param=exc.parameter) from exc

    def _check_vllm_sampling(self, max_tokens: int) -> None:
        """vLLM's own bounds on its sampling extras, as 400s naming the field (vLLM's messages name none)."""
        if self.top_k is not None and not -1 <= self.top_k <= MAX_INT32:
            raise OpenAIError(
                f"top_k must be -1 or 0 (off) or a positive integer; got {self.top_k}", param="top_k"
            )
        if self.min_p is not None:
            _check_range("min_p", self.min_p, 0, 1)
        if self.repetition_penalty is not None:
            _check_range("repetition_penalty", self.repetition_penalty, 0, MAX_FLOAT32, low_open=True)
        if not 0 <= self.min_tokens <= max_tokens:
            raise OpenAIError(
                f"min_tokens must be at least 0 and at most the request's max_tokens ({max_tokens}); "
                f"got {self.min_tokens}",
                param="min_tokens",
            )
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is not None and any(not 0 <= token <= MAX_INT32 for token in ids):
                raise OpenAIError(f"{name} must hold token ids from 0 to {MAX_INT32}", param=name)
        if self.allowed_token_ids == []:
            raise OpenAIError("allowed_token_ids must not be empty", param="allowed_token_ids")
        if self.bad_words is not None and any(not word.strip() for word in self.bad_words):
            raise OpenAIError("bad_words must not hold empty or whitespace-only strings", param="bad_words")
        if self.bad_words is not None and len(self.bad_words) > MAX_BAD_WORDS:
            raise OpenAIError(
                f"bad_words may hold at most {MAX_BAD_WORDS} words; got {len(self.bad_words)}",
                param="bad_words",
            )
        if self.stream_interval is not None and not 1 <= self.stream_interval <= MAX_INT32:
            raise OpenAIError(
                f"stream_interval must be at least 1; got {self.stream_interval}", param="stream_interval"
            )


_BEAM = "beam search is not served"
_TEMPLATE = "every chat is rendered by the base model's own chat template, as in training"
_NO_REASONING = "no reasoning parser is configured"
_RETURNED = "responses carry OpenAI's fields only"
# vLLM's request extras that change nothing on these endpoints (vLLM ignores them there too: a routing hint,
# no reasoning parser, render-endpoint and routed-expert options): ignored like any unknown field.
VLLM_IGNORED_EXTRAS = (
    "session_id",
    "include_reasoning",
    "return_token_offsets",
    "mm_payload",
    "return_mm_kwargs",
    "routed_experts_prompt_start",
)
# vLLM's request extras this server does not serve: name -> (values that change nothing, why others are
# refused with a 400 naming the field).
_UNSERVED_EXTRAS: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), _BEAM),
    "length_penalty": ((1,), f"it applies to beam search only, and {_BEAM}"),
    "watermarking": ((False,), "no watermark is configured"),
    "truncate_prompt_tokens": ((), "prompts are never truncated; shorten the prompt"),
    "truncation_side": (("left", "right"), "prompts are never truncated"),
    "prompt_logprobs": ((), f"{_RETURNED} (/v1/completions with echo and logprobs scores the prompt)"),
    "logprob_token_ids": ((), f"{_RETURNED}; use logprobs"),
    "return_tokens_as_token_ids": ((False,), _RETURNED),
    "return_token_ids": ((False,), _RETURNED),
    "return_prompt_text": ((False,), _RETURNED),
    "repetition_detection": ((), "repetition detection is not served"),
    "structured_outputs": ((), "use response_format"),
    "priority": ((0,), "requests are scheduled first come, first served"),
    "request_id": ((), "response ids are the server's own"),
    "cache_salt": ((), "prefix-cache salting is not served"),
    "kv_transfer_params": (({},), "disaggregated serving is not configured"),
    "ec_transfer_params": (({},), "disaggregated serving is not configured"),
    "vllm_xargs": (({},), "no custom extensions are installed"),
    "thinking_token_budget": ((), _NO_REASONING),
    "reasoning_effort": ((), _NO_REASONING),
    "echo": ((False,), "the reply is never prefixed with the last message"),
    "add_generation_prompt": ((True,), _TEMPLATE),
    "continue_final_message": ((False,), _TEMPLATE),
    "add_special_tokens": ((False,), _TEMPLATE),
    "chat_template": ((), _TEMPLATE),
    "chat_template_kwargs": (({},), _TEMPLATE),
    "documents": ((), _TEMPLATE),
    "media_io_kwargs": (({},), "multimodal input is not served"),
    "mm_processor_kwargs": (({},), "multimodal input is not served"),
    "prompt_embeds": ((), "prompts are text or token ids"),
}
_UNSERVED_COMMON = (
    "use_beam_search",
    "length_penalty",
    "watermarking",
    "truncate_prompt_tokens",
    "truncation_side",
    "prompt_logprobs",
    "logprob_token_ids",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "repetition_detection",
    "structured_outputs",
    "priority",
    "request_id",
    "cache_salt",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "thinking_token_budget",
)
_UNSERVED_CHAT = (*_UNSERVED_COMMON, "return_prompt_text", "echo")
# Checked wherever a chat is rendered (generation and /tokenize).
_UNSERVED_TEMPLATE = (
    "reasoning_effort",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "media_io_kwargs",
    "mm_processor_kwargs",
)
# /v1/completions models echo; its add_special_tokens is True (a BOS on text prompts) as in vLLM, or refused.
_UNSERVED_COMPLETION = (*_UNSERVED_COMMON, "prompt_embeds")


def _check_unserved_extras(request: _Request, names: Iterable[str]) -> None:
    for name in names:
        off, why = _UNSERVED_EXTRAS[name]
        value = (request.model_extra or {}).get(name)
        if value is not None and value not in off:
            raise OpenAIError(f"'{name}' is not supported by this server: {why}", param=name)


def _requires(field: str, value: Any, needs: str, needed: Any) -> dict[str, Any]:
    """JSON Schema for a rule the server enforces: `field` = `value` needs `needs` = `needed`."""
    return {
        "if": {"required": [field], "properties": {field: value}},
        "then": {"required": [needs], "properties": {needs: {"const": needed}}},
    }


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _requires("top_logprobs", {"type": "integer"}, "logprobs", True),
                # tool_choice auto, required or a named function needs tools (vLLM's rule).
                {
                    "if": {
                        "required": ["tool_choice"],
                        "properties": {"tool_choice": {"not": {"enum": ["none", None]}}},
                    },
                    "then": {"required": ["tools"], "properties": {"tools": {"type": "array"}}},
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: JsonInt | None = Field(None, json_schema_extra={"minimum": 1})
    max_completion_tokens: JsonInt | None = Field(None, json_schema_extra={"minimum": 1})
    logprobs: bool | None = None
    top_logprobs: JsonInt | None = Field(None, json_schema_extra=_range(0, MAX_CHAT_TOP_LOGPROBS))
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, json_schema_extra={"minItems": 1})
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """vLLM's default: "auto" when tools are sent without a tool_choice, else "none"."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def check_tools(self, *, auto_tools: bool) -> None:
        """vLLM's rules for tools and tool_choice (ChatCompletionRequest.check_tool_usage and
        OnlineRenderer.render_chat), as 400s naming the field; `auto_tools`: this server parses tool calls
        (--enable-auto-tool-choice with a --tool-call-parser)."""
        if self.tools == []:
            raise OpenAIError(
                "`tools` must not be an empty array. Either provide at least one tool or omit the field "
                "entirely.",
                param="tools",
            )
        choice = self.effective_tool_choice
        if choice == "none":
            return
        if self.tools is None:
            raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            tool.function.name for tool in self.tools
        }:
            raise OpenAIError(
                f"The tool specified in `tool_choice` ('{choice.function.name}') does not match any of the "
                "specified `tools`",
                param="tool_choice",
            )
        if auto_tools:
            return
        if choice == "auto":
            raise OpenAIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                'on this server; send tool_choice "none" to render the tools without calling them',
                param="tool_choice",
            )
        wanted = (
            f'function "{choice.function.name}"' if isinstance(choice, NamedToolChoice) else f'"{choice}"'
        )
        raise OpenAIError(
            f"tool_choice={wanted} requires --enable-auto-tool-choice and --tool-call-parser to be set on "
            "this server",
            param="tool_choice",
        )

    def prompt_tools(self, *, exclude_when_none: bool = False) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (OpenAI's shape); vLLM renders them even with
        tool_choice "none" unless its --exclude-tools-when-tool-choice-none is set."""
        if self.tools is None or (exclude_when_none and self.effective_tool_choice == "none"):
            return None
        return [tool.template_dict() for tool in self.tools]

    def to_sampling_params(
        self, *, prompt_tokens: int, max_model_len: int, tool_constraint: ToolConstraint | None = None
    ) -> SamplingParams:
        """vLLM sampling parameters for this chat rendered as `prompt_tokens` tokens, or an `OpenAIError`
        (400) naming the bad field. Streams get DELTA outputs, other requests FINAL_ONLY. `tool_constraint`
        is what vLLM's tool parser asks of sampling for this request's tools."""
        _check_chat_supported(self)
        _check_unserved_extras(self, _UNSERVED_CHAT)
        _check_room(prompt_tokens, max_model_len, "messages")
        # OpenAI deprecated max_tokens for max_completion_tokens; when both are sent the new one wins.
        requested, param = self.max_completion_tokens, "max_completion_tokens"
        if requested is None:
            requested, param = self.max_tokens, "max_tokens"
        max_tokens = _max_tokens(
            requested, param, prompt_tokens=prompt_tokens, max_model_len=max_model_len, default=None
        )
        logprobs: int | None = None
        if self.top_logprobs is not None:
            _check_range("top_logprobs", self.top_logprobs, 0, MAX_CHAT_TOP_LOGPROBS)
            if not self.logprobs:
                raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
        if self.logprobs:
            # vLLM returns the sampled token's logprob plus this many alternatives.
            logprobs = self.top_logprobs or 0
        structured = _structured_outputs(self.response_format)
        skip_special_tokens = self.skip_special_tokens
        if tool_constraint is not None:
            # A forced call overrides response_format, as in vLLM (which logs that it is ignored).
            structured = tool_constraint.structured or structured
            skip_special_tokens = tool_constraint.skip_special_tokens
        return self._sampling_params(
            max_tokens=max_tokens,
            logprobs=logprobs,
            structured=structured,
            skip_special_tokens=skip_special_tokens,
        )


@dataclass(frozen=True)
class ToolConstraint:
    """What vLLM's tool parser asks of sampling for a request with tools (its adjust_request): the grammar
    that forces a call (tool_choice "required" or a named function; None for "auto"), and whether special
    tokens stay in the text (they must where the call markup is special tokens, as Qwen2.5's <tool_call>)."""

    structured: StructuredOutputsParams | None
    skip_special_tokens: bool


class CompletionRequest(_GenerationRequest):
    # max_tokens 0 scores the prompt only (echo), as OpenAI's legacy API does.
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_requires("max_tokens", {"const": 0}, "echo", True)]}
    )

    prompt: NonEmptyText | list[NonEmptyText] | TokenIds | list[TokenIds] = Field(
        json_schema_extra={"minItems": 1}
    )
    max_tokens: JsonInt | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, json_schema_extra={"minimum": 0})
    logprobs: JsonInt | None = Field(None, json_schema_extra=_range(0, MAX_COMPLETION_LOGPROBS))
    echo: bool = False

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: score the prompt, generate nothing. The engine is still asked for one
        token (vLLM needs max_tokens >= 1); the response must drop it."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, *, prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """vLLM sampling parameters for a prompt of `prompt_tokens` tokens (several prompts: pass the
        longest), or an `OpenAIError` (400) naming the bad field. Streams get DELTA outputs, others
        FINAL_ONLY."""
        _refuse(self, "suffix", lambda value: value == "")
        _refuse(self, "logit_bias", lambda value: value == {})
        _refuse(self, "best_of", lambda value: value == self.n)
        _check_unserved_extras(self, _UNSERVED_COMPLETION)
        _refuse(self, "add_special_tokens", lambda value: value is True)
        _check_room(prompt_tokens, max_model_len, "prompt")
        if self.echo_only:
            max_tokens = 1
        else:
            explicit = "max_tokens" in self.model_fields_set and self.max_tokens is not None
            max_tokens = _max_tokens(
                self.max_tokens if explicit else None,
                "max_tokens",
                prompt_tokens=prompt_tokens,
                max_model_len=max_model_len,
                default=DEFAULT_COMPLETION_MAX_TOKENS,
            )
        prompt_logprobs: int | None = None
        if self.logprobs is not None:
            _check_range("logprobs", self.logprobs, 0, MAX_COMPLETION_LOGPROBS)
            if self.echo:
                prompt_logprobs = self.logprobs
        return self._sampling_params(
            max_tokens=max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs
        )


def _refuse(request: _Request, name: str, honourable: Callable[[Any], bool]) -> None:
    value = (request.model_extra or {}).get(name)
    if value is not None and not honourable(value):
        raise OpenAIError(f"'{name}' is not supported by this server", param=name)


def _check_chat_supported(request: ChatCompletionRequest | TokenizeChatRequest) -> None:
    # OpenAI's deprecated functions API: tools replaced it (vLLM does not serve it either).
    _refuse(request, "functions", lambda value: value == [])
    _refuse(request, "function_call", lambda value: value in ("none", "auto"))
    _refuse(request, "logit_bias", lambda value: value == {})
    _refuse(request, "audio", lambda value: False)
    _refuse(request, "prediction", lambda value: False)
    _refuse(request, "modalities", lambda value: value == ["text"])
    _check_unserved_extras(request, _UNSERVED_TEMPLATE)


def check_text(request: BaseModel) -> None:
    """400 naming the field if a string holds a lone surrogate: JSON's \\u escapes can write one, UTF-8
    cannot encode it, and the tokenizer failed on it with a 500."""
    found = _surrogate_at(request.model_dump(by_alias=True, exclude_none=True), "")
    if found is not None:
        param, character = found
        raise OpenAIError(
            f"'{param}' is not valid Unicode text: it holds a lone surrogate (U+{ord(character):04X}); "
            "send UTF-8 text",
            param=param,
        )


def _surrogate_at(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (path, match.group()) if match else None
    items: Iterable[tuple[str, Any]] = ()
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    for item_path, item in items:
        found = _surrogate_at(item, item_path)
        if found is not None:
            return found
    return None


def chat_messages(request: ChatCompletionRequest | TokenizeChatRequest) -> list[dict[str, Any]]:
    """The conversation as OpenAI-shaped dicts for the shared prompt renderer (finetune.prompting, which
    adapts tool calls for the chat template): {"role", "content"}, plus "tool_calls" on assistant turns that
    called tools and "tool_call_id" on tool results.

    "developer" becomes "system"; text parts are joined with newlines (as vLLM does); `name` is
    dropped (chat templates do not render it). Non-text parts are refused. A call's arguments that are not
    a JSON object become "{}" with a warning, as vLLM serves them (vllm/renderers/chat_utils.py,
    _postprocess_messages): the call is history, and refusing it would fail every later turn too.
    """
    _check_chat_supported(request)
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(request.messages):
        if (message.model_extra or {}).get("function_call"):
            raise OpenAIError(
                f"'messages[{index}].function_call' is not supported by this server; use tool_calls",
                param=f"messages[{index}].function_call",
            )
        turn: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _message_text(message.content, index),
        }
        if message.tool_calls and message.role == "assistant":
            turn["tool_calls"] = [
                {
                    **({"id": call.id} if call.id is not None else {}),
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _arguments(call.function)},
                }
                for call in message.tool_calls
            ]
        elif message.tool_calls:
            raise OpenAIError(
                f"messages[{index}].tool_calls: only assistant messages carry tool calls",
                param=f"messages[{index}].tool_calls",
            )
        if message.role == "tool" and message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        rendered.append(turn)
    return rendered


def _arguments(function: MessageFunctionCall) -> str:
    try:
        parsed = json.loads(function.arguments) if function.arguments else {}
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return function.arguments
    log.warning(
        "tool call %r has arguments that are not a JSON object (%d characters); rendered as {}",
        function.name,
        len(function.arguments),
    )
    return "{}"


def _message_text(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise OpenAIError(
                f"messages[{index}].content: only text content parts are supported by this server, "
                f"got a part of type '{part.type}'",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "\n".join(texts)


# ------------------------------------------------------------------------------------------------ sampling


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    # Written so that NaN falls outside every range.
    if not ((low < value if low_open else low <= value) and value <= high):
        lower = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise OpenAIError(f"{name} must be {lower} and at most {high:g}; got {value}", param=name)


def _context_error(message: str, param: str) -> OpenAIError:
    return OpenAIError(message, param=param, code="context_length_exceeded")


def _max_tokens(
    requested: int | None, param: str, *, prompt_tokens: int, max_model_len: int, default: int | None
) -> int:
    """The generation budget, as vLLM's server computes it (vllm/entrypoints/serve/utils/api_utils.py,
    get_max_tokens): `requested` (unset: `default`, no default: all the room) clamped to the room the prompt
    leaves, so generation stops at the context with finish_reason "length". Only a `requested` that no
    prompt could leave room for, more than the whole context, is a 400 (vLLM's TokenizeParams rule)."""
    room = max_model_len - prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise OpenAIError(f"{param} must be at least 1; got {requested}", param=param)
    if requested > max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens; {param} asks for {requested}, "
            f"more than the whole context. Lower {param} to at most {room} for this prompt "
            f"of {prompt_tokens} tokens.",
            param,
        )
    return min(requested, room)


def _stop(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(
            f"stop may hold at most {MAX_STOP_SEQUENCES} sequences; got {len(stops)}", param="stop"
        )
    if any(not sequence for sequence in stops):
        raise OpenAIError("stop sequences must not be empty strings", param="stop")
    return stops


def _structured_outputs(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise OpenAIError(
            "response_format of type 'json_schema' needs json_schema.schema (a JSON Schema object)",
            param="response_format",
        )
    size = len(json.dumps(spec.schema_))
    if size > MAX_SCHEMA_BYTES:
        raise OpenAIError(
            f"response_format.json_schema.schema is {size} bytes of JSON; this server takes at most "
            f"{MAX_SCHEMA_BYTES} (large schemas take minutes to compile into a grammar)",
            param="response_format",
        )
    try:
        check_json_nesting(spec.schema_)
    except VLLMValidationError as exc:
        raise OpenAIError(str(exc), param="response_format") from exc
    return StructuredOutputsParams(json=spec.schema_)


def _check_room(prompt_tokens: int, max_model_len: int, prompt_param: str) -> None:
    if prompt_tokens >= max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens; your prompt has {prompt_tokens} "
            f"tokens, which leaves no room for an answer. Shorten the {prompt_param}.",
            prompt_param,
        )


# ------------------------------------------------------------------------------------------------ responses


def _created() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    @classmethod
    def total(cls, parts: Iterable[Usage]) -> Usage:
        """The usage of several engine requests (a completion's prompts) as one."""
        parts = list(parts)
        return cls.of(sum(p.prompt_tokens for p in parts), sum(p.completion_tokens for p in parts))


FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first of each call brings its id and name, the rest pieces of
    its arguments (joined, a JSON object)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a chat stream; with stream_options.include_usage the stream ends with a
    chunk whose `choices` is empty and whose `usage` is set."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # None where the position has no logprob (the first token of an echoed prompt).
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a completion stream; OpenAI streams these as "text_completion" objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "tuneserve"
    # For an adapter: the base model it was trained on; None for the base itself.
    parent: str | None = None
    root: str | None = None
    max_model_len: int | None = None
    # Ours, beside vLLM's fields: an adapter's version (serve.adapters: the sha256 of the weights its
    # finetune manifest lists, else NAME@N), so a benchmark records which version it scored.
    version: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------ tokenizer
# vLLM's /tokenize, /detokenize and /version (vllm/entrypoints/serve/tokenize/protocol.py and
# vllm/entrypoints/serve/instrumentator/basic.py in vLLM 0.32): same fields, defaults and answers.


class TokenizeCompletionRequest(_Request):
    """A text prompt's tokens, as /v1/completions tokenizes it (special tokens such as BOS added)."""

    model: str | None = None  # None: the base; an adapter's name works too (adapters share its tokenizer)
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(_Request):
    """A conversation's tokens, rendered by the chat template as /v1/chat/completions renders it."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    # The template writes the special tokens; true adds the tokenizer's own (BOS) on top, as in vLLM.
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = False
    tools: list[ChatTool] | None = Field(None, json_schema_extra={"minItems": 1})  # rendered, as in vLLM


# vLLM's union: a body with `messages` is a chat, one with `prompt` a text prompt.
TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[JsonInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    """`version` is this server's (tuneserve's); vLLM's server puts its own there, here `vllm_version`."""

    version: str
    vllm_version: str


def finish_reason(vllm_reason: str | None) -> FinishReason | None:
    """OpenAI's finish_reason for vLLM's (None while a stream is still running)."""
    if vllm_reason is None:
        return None
    if vllm_reason == "length":
        return "length"
    if vllm_reason in ("stop", "abort", "repetition"):
        return "stop"
    raise OpenAIError(f"the engine failed while generating (finish reason '{vllm_reason}')", status=500)


# ------------------------------------------------------------------------------------------------ logprobs

Decode = Callable[[int], str]
StepLogprobs = dict[int, Logprob] | None


def _token_text(token_id: int, logprob: Logprob | None, decode: Decode) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return decode(token_id)


def _clamped(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _by_rank(step: dict[int, Logprob], limit: int) -> list[tuple[int, Logprob]]:
    """The `limit` best alternatives of one position. vLLM's dict holds the sampled token first, then the
    top-k, so the sampled token may be there without being in the top-k."""
    ranked = sorted(step.items(), key=lambda item: math.inf if item[1].rank is None else item[1].rank)
    return ranked[:limit]


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[StepLogprobs], decode: Decode, *, top_logprobs: int
) -> ChatLogprobs:
    """OpenAI chat logprobs from vLLM's per-position `{token_id: Logprob}` dicts (one per generated token).

    `decode` turns a token id into text where vLLM gave no decoded token; `top_logprobs` is the request's.
    """
    content: list[ChatTokenLogprob] = []
    for token_id, step in zip(token_ids, logprobs, strict=True):
        sampled = None if step is None else step.get(token_id)
        token = _token_text(token_id, sampled, decode)
        alternatives = [
            TopLogprob(
                token=(text := _token_text(alt_id, alt, decode)),
                logprob=_clamped(alt.logprob),
                bytes=list(text.encode("utf-8", errors="replace")),
            )
            for alt_id, alt in (_by_rank(step, top_logprobs) if step else [])
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=MIN_LOGPROB if sampled is None else _clamped(sampled.logprob),
                bytes=list(token.encode("utf-8", errors="replace")),
                top_logprobs=alternatives,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[StepLogprobs],
    decode: Decode,
    *,
    top_logprobs: int,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """OpenAI completion logprobs from vLLM's per-position dicts.

    For echo pass the prompt's ids and `prompt_logprobs` (first entry None) followed by the generated ones.
    `top_logprobs` is the request's `logprobs`; each position lists the sampled token and the top
    `top_logprobs` (so at most top_logprobs + 1 entries, as OpenAI). `text_offset` is where the first
    token starts in the choice's text (in a stream: the length of the text sent so far).
    """
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = text_offset
    for token_id, step in zip(token_ids, logprobs, strict=True):
        sampled = None if step is None else step.get(token_id)
        token = _token_text(token_id, sampled, decode)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if step is None or sampled is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_clamped(sampled.logprob))
        top: dict[str, float] = {}
        for alt_id, alt in _by_rank(step, top_logprobs):
            top.setdefault(_token_text(alt_id, alt, decode), _clamped(alt.logprob))
        top.setdefault(token, _clamped(sampled.logprob))
        result.top_logprobs.append(top)
    return result
