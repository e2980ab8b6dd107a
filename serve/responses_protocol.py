"""OpenAI's Responses API (POST /v1/responses) as this server serves it: the request model, its mapping onto a
chat completion request (`to_chat_request`), and the response object and stream events the openai SDK parses.
Pydantic and serve.protocol only: no HTTP (serve/routes.py sends these as JSON or server-sent events).

A response is a chat completion underneath (the same prompt rendering, sampling, checks and engine request),
so a greedy response's text is the chat completion's text for the same messages. What is served, as in vLLM
0.32 without a reasoning parser or tool server: text input (a string, or message items whose content is
a string or input_text/output_text parts) with `instructions`, text output (optionally as JSON or a JSON
Schema through `text.format`, with logprobs through `include`), OpenAI's sampling fields and vLLM's sampling
extras. Responses are not stored (vLLM stores them only under VLLM_ENABLE_RESPONSES_API_STORE): `store` is
accepted and changes nothing, `previous_response_id` is a 404 as in vLLM, and the fields that need stored
responses, tools or reasoning are refused with a 400 naming them rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve import protocol
from serve.protocol import JsonInt, OpenAIError

# OpenAI's limits on `metadata` (16 pairs, keys up to 64 characters, values up to 512).
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_TOP_LOGPROBS = protocol.MAX_CHAT_TOP_LOGPROBS
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's `include` values; all but the logprobs one ask for parts of outputs this server never makes
# (tool calls, reasoning, image inputs), so they change nothing here.
Includable = Literal[
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
]
ROLES = ("user", "system", "developer", "assistant")
TEXT_PART_TYPES = ("input_text", "output_text")

# vLLM's sampling and engine extras on its ResponsesRequest: handed to the chat request, which applies them
# as it does on /v1/chat/completions or refuses them with a 400 naming the field.
VLLM_EXTRAS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "min_tokens",
    "bad_words",
    "logit_bias",
    "priority",
    "cache_salt",
    "watermarking",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "structured_outputs",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "request_id",
)
NOT_STORED = "responses are not stored on this server (as in vLLM without VLLM_ENABLE_RESPONSES_API_STORE)"
_NO_TOOLS = "tools are not served on /v1/responses"
_NO_REASONING = "no reasoning parser is configured"
# Fields of OpenAI's or vLLM's request refused unless off, and why.
REFUSED_EXTRAS = {
    "conversation": NOT_STORED,
    "prompt": "prompt templates are not served (vLLM refuses them too)",
    "context_management": "context compaction is not served; prompts are never truncated",
    "previous_input_messages": _NO_REASONING,
    "enable_response_messages": "responses carry OpenAI's fields only",
    "moderation": "moderation is not served",
}
# Fields of OpenAI's or vLLM's request that change nothing here (no tools, reasoning, images or background
# runs; hints for caching, scheduling tiers, routing, access programs and obfuscation padding): ignored like
# any unknown field, as vLLM ignores them.
IGNORED_FIELDS = (
    "max_tool_calls",
    "include_reasoning",
    "image",
    "background_options",
    "access_programs",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "session_id",
    "stream_options",
    "mm_payload",
    "return_mm_kwargs",
)


class _Item(BaseModel):
    # Clients send fields we do not model (an input message's id and status, annotations, ...): ignored.
    model_config = ConfigDict(extra="allow")


class InputTextPart(_Item):
    """A text part of an input message: `input_text`, or `output_text` in an earlier assistant turn."""

    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})

    # Published as served; images, files and audio are refused with a message that says so.
    type: str = Field(json_schema_extra={"enum": list(TEXT_PART_TYPES)})
    text: str | None = Field(None, json_schema_extra={"type": "string"})


class InputMessage(_Item):
    """A message item of `input` (OpenAI's EasyInputMessage and input/output message items)."""

    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})

    # Published as served; items other than messages (function calls and their outputs, reasoning, item
    # references) and a missing role or content are refused with messages that say so.
    type: str = Field("message", json_schema_extra={"enum": ["message"]})
    role: str | None = Field(None, json_schema_extra={"enum": list(ROLES)})
    content: str | list[InputTextPart] | None = Field(None, json_schema_extra={"type": ["string", "array"]})


class TextFormat(_Item):
    """`text.format`: plain text, any JSON object, or JSON following `schema` (the flat Responses shape)."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        json_schema_extra={
            "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}},
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Item):
    format: TextFormat | None = None
    # Only the default is published: nothing here controls verbosity (to_chat_request refuses the others).
    verbosity: str | None = Field(None, json_schema_extra={"enum": ["medium", None]})


class Reasoning(_Item):
    # No reasoning parser: only "no reasoning" is published (to_chat_request refuses the rest).
    effort: str | None = Field(None, json_schema_extra={"enum": ["none", None]})
    summary: str | None = Field(None, json_schema_extra={"enum": [None]})


Metadata = Annotated[
    dict[
        Annotated[str, Field(json_schema_extra={"maxLength": MAX_METADATA_KEY})],
        Annotated[str, Field(json_schema_extra={"maxLength": MAX_METADATA_VALUE})],
    ],
    Field(json_schema_extra={"maxProperties": MAX_METADATA_PAIRS}),
]


class ResponsesRequest(_Item):
    """POST /v1/responses. Unknown fields are ignored, as OpenAI's SDK extras and vLLM's are; the ones that
    would change the answer if ignored are refused by `to_chat_request` with a 400 naming them."""

    model: str
    input: str | list[InputMessage] = Field(json_schema_extra={"minItems": 1})
    instructions: str | None = None
    max_output_tokens: JsonInt | None = Field(None, json_schema_extra={"minimum": 1})
    temperature: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 2})
    top_p: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    stream: bool = False
    user: str | None = None
    metadata: Metadata | None = None
    store: bool | None = True
    text: TextConfig | None = None
    include: list[Includable] | None = None
    top_logprobs: JsonInt | None = Field(None, json_schema_extra={"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    # What needs tools, stored responses or reasoning: published with the values that change nothing, the
    # others refused by to_chat_request with a 400 that says why.
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    reasoning: Reasoning | None = None
    truncation: str | None = Field(None, json_schema_extra={"enum": ["disabled", None]})

    def to_chat_request(self) -> protocol.ChatCompletionRequest:
        """The chat completion request this response is made from, or an `OpenAIError` (400) naming the
        field of this request that cannot be served. `previous_response_id` is a 404: no response is kept."""
        self._refuse_unserved()
        if self.previous_response_id is not None:
            raise OpenAIError(
                f"Response with id '{self.previous_response_id}' not found: {NOT_STORED}; send the "
                "conversation so far as `input` items",
                status=404,
                param="previous_response_id",
                code="not_found",
            )
        self._check_metadata()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise OpenAIError(
                f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}; got {self.top_logprobs}",
                param="top_logprobs",
            )
        body: dict[str, Any] = {
            name: value for name, value in (self.model_extra or {}).items() if name in VLLM_EXTRAS
        }
        body.update(
            model=self.model,
            messages=self.chat_messages(),
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stream=self.stream,
            user=self.user,
            response_format=self._response_format(),
        )
        if self.stream:
            body["stream_options"] = {"include_usage": True}  # the usage of response.completed
        if self.logprobs:  # top_logprobs alone returns nothing, as in OpenAI and vLLM
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        try:
            return protocol.ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:  # a vLLM extra of the wrong type
            raise protocol.validation_error(exc.errors()) from exc

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def chat_messages(self) -> list[dict[str, Any]]:
        """`instructions` as a system message first (as vLLM renders them), then `input` as chat messages;
        developer stays developer (the chat path renders it as system)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:  # an empty one adds no system message, as in vLLM
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        if not self.input:
            raise OpenAIError("input must hold at least one message", param="input")
        for index, item in enumerate(self.input):
            messages.append(_chat_message(item, index))
        return messages

    def _refuse_unserved(self) -> None:
        if self.tools:
            raise OpenAIError(f"'tools' is not supported: {_NO_TOOLS}", param="tools")
        if self.background:
            raise OpenAIError(
                f"'background' is not supported: it needs stored responses, and {NOT_STORED}",
                param="background",
            )
        if self.truncation not in (None, "disabled"):
            raise OpenAIError(
                "'truncation' is not supported: prompts are never truncated here; send 'disabled' and shorten"
                " the input",
                param="truncation",
            )
        if self.reasoning is not None and (
            self.reasoning.effort not in (None, "none") or self.reasoning.summary
        ):
            raise OpenAIError(f"'reasoning' is not supported: {_NO_REASONING}", param="reasoning")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise OpenAIError(
                "'text.verbosity' is not supported: nothing here controls an answer's length "
                "but max_output_tokens",
                param="text.verbosity",
            )
        extra = self.model_extra or {}
        for name, why in REFUSED_EXTRAS.items():
            if extra.get(name) not in (None, False, [], {}):
                raise OpenAIError(f"'{name}' is not supported by this server: {why}", param=name)

    def _check_metadata(self) -> None:
        # The schema publishes these bounds; pydantic's own would not name the field.
        metadata = self.metadata or {}
        if len(metadata) > MAX_METADATA_PAIRS:
            raise OpenAIError(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs", param="metadata")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise OpenAIError(
                    f"metadata keys may have at most {MAX_METADATA_KEY} characters and values at most "
                    f"{MAX_METADATA_VALUE}; '{key[:MAX_METADATA_KEY]}' is longer",
                    param="metadata",
                )

    def _response_format(self) -> dict[str, Any] | None:
        form = self.text.format if self.text is not None else None
        if form is None or form.type == "text":
            return None
        if form.type == "json_object":
            return {"type": "json_object"}
        spec = {"name": form.name, "description": form.description, "strict": form.strict}
        return {"type": "json_schema", "json_schema": {**spec, "schema": form.schema_}}


def _chat_message(item: InputMessage, index: int) -> dict[str, Any]:
    param = f"input[{index}]"
    if item.type != "message":
        raise OpenAIError(
            f"{param}: items of type '{item.type}' are not supported by this server (only message items: "
            f"{_NO_TOOLS} and {_NO_REASONING})",
            param=param,
        )
    if item.role not in ROLES:
        raise OpenAIError(f"{param}.role must be one of {', '.join(ROLES)}; got {item.role!r}", param=param)
    if item.content is None:
        raise OpenAIError(f"Missing required parameter: '{param}.content'", param=f"{param}.content")
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    parts = []
    for part_index, part in enumerate(item.content):
        if part.type not in TEXT_PART_TYPES or part.text is None:
            raise OpenAIError(
                f"{param}.content[{part_index}]: only text parts (input_text, output_text) are supported by "
                f"this server, got a part of type '{part.type}'",
                param=f"{param}.content[{part_index}]",
            )
        parts.append({"type": "text", "text": part.text})
    return {"role": item.role, "content": parts}


# ------------------------------------------------------------------------------------------------ responses
# OpenAI's shapes (openai.types.responses), with the fields a text response has.


class TopLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class OutputMessage(BaseModel):
    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, usage: protocol.Usage) -> ResponseUsage:
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    # OpenAI's codes for a failed response: the engine's fault, or the input's.
    code: Literal["server_error", "invalid_prompt"]
    message: str


class FormatEcho(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class TextEcho(BaseModel):
    format: FormatEcho


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class Response(BaseModel):
    """The response object: the request's settings echoed, the output, its status and usage."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, None] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = False  # never stored, whatever the request asked
    temperature: float
    text: TextEcho
    tool_choice: Literal["none", "auto"]
    tools: list[Any] = Field(default_factory=list)
    top_logprobs: int
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None

    @classmethod
    def start(cls, request: ResponsesRequest, response_id: str) -> Response:
        """The response as it stands before any output: in progress, the request's settings echoed."""
        form = request.text.format if request.text is not None else None
        echoed = form.model_dump(by_alias=True, exclude_none=True) if form is not None else {"type": "text"}
        return cls(
            id=response_id,
            status="in_progress",
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata or {},
            model=request.model,
            output=[],
            parallel_tool_calls=request.parallel_tool_calls is not False,
            temperature=1.0 if request.temperature is None else request.temperature,
            text=TextEcho(format=FormatEcho.model_validate(echoed)),
            tool_choice=request.tool_choice or "auto",
            top_logprobs=request.top_logprobs or 0,
            top_p=1.0 if request.top_p is None else request.top_p,
            user=request.user,
        )


# ------------------------------------------------------------------------------------------------ events
# The stream's server-sent events, in the order OpenAI sends them for one text message.


class _Event(BaseModel):
    sequence_number: int


class ResponseCreated(_Event):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseInProgress(_Event):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: Response


class OutputItemAdded(_Event):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputMessage


class ContentPartAdded(_Event):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class DeltaTopLogprob(BaseModel):
    token: str
    logprob: float


class DeltaLogprob(DeltaTopLogprob):
    top_logprobs: list[DeltaTopLogprob]


class OutputTextDelta(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[DeltaLogprob]


class OutputTextDone(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[DeltaLogprob]


class ContentPartDone(_Event):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputItemDone(_Event):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputMessage


class ResponseCompleted(_Event):
    type: Literal["response.completed"] = "response.completed"
    response: Response


class ResponseIncomplete(_Event):
    """The last event of a response cut short by max_output_tokens (OpenAI's; vLLM sends
    response.completed with status "incomplete")."""

    type: Literal["response.incomplete"] = "response.incomplete"
    response: Response


class ResponseFailed(_Event):
    type: Literal["response.failed"] = "response.failed"
    response: Response


class ErrorEvent(_Event):
    """An error after the stream began (headers sent): OpenAI's `error` event, then response.failed."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None


ResponseEvent = (
    ResponseCreated
    | ResponseInProgress
    | OutputItemAdded
    | ContentPartAdded
    | OutputTextDelta
    | OutputTextDone
    | ContentPartDone
    | OutputItemDone
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | ErrorEvent
)


def output_logprobs(logprobs: protocol.ChatLogprobs | None) -> list[TokenLogprob]:
    """A chat completion's logprobs as an output_text part's (the same fields)."""
    if logprobs is None or logprobs.content is None:
        return []
    return [TokenLogprob.model_validate(step.model_dump()) for step in logprobs.content]


def delta_logprobs(logprobs: list[TokenLogprob]) -> list[DeltaLogprob]:
    """Logprobs as a text delta event carries them (no bytes)."""
    return [
        DeltaLogprob(
            token=step.token,
            logprob=step.logprob,
            top_logprobs=[DeltaTopLogprob(token=t.token, logprob=t.logprob) for t in step.top_logprobs],
        )
        for step in logprobs
    ]
