"""POST /v1/responses on top of the chat path: a response request becomes a chat completion request
(serve.responses_protocol), `Serving.chat` runs it, and its completion (or chunks) become the response object
(or the Responses stream events). No HTTP here, as in serve.serving.

Refusals from the chat path name the chat's fields; they are renamed to the response request's
(`messages[2]` -> `input[1]` after `instructions`, `max_completion_tokens` -> `max_output_tokens`, ...).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve import protocol
from serve import responses_protocol as rp
from serve.protocol import OpenAIError
from serve.serving import Serving

_CHAT_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}
_MESSAGES = re.compile(r"\bmessages(?:\[(\d+)\])?")
_CHAT_NAME = re.compile(r"\b(" + "|".join(_CHAT_NAMES) + r")\b")


@dataclass
class ResponsesServing:
    """The Responses API for what `serving` serves; responses are not stored (`retrieve` is always a 404)."""

    serving: Serving

    async def create(
        self, request: rp.ResponsesRequest, request_id: str | None = None
    ) -> rp.Response | AsyncIterator[rp.ResponseEvent]:
        """The response, or with stream=true its events; cancelling this (or closing the events) aborts the
        engine request. Its id is `resp_<request_id>` (the HTTP request's X-Request-Id), or a new one."""
        renamed = _Renamer(offset=1 if request.instructions else 0, text_input=isinstance(request.input, str))
        response_id = f"resp_{request_id or uuid.uuid4().hex}"
        self.serving.models.resolve(request.model)  # an unknown model is a 404 first, as on the other routes
        chat_request = request.to_chat_request()
        try:
            result = await self.serving.chat(chat_request, request_id)
        except OpenAIError as exc:
            raise renamed(exc) from exc
        response = rp.Response.start(request, response_id)
        if isinstance(result, protocol.ChatCompletion):
            (choice,) = result.choices
            logprobs = rp.output_logprobs(choice.logprobs) if request.logprobs else None
            text = rp.OutputText(text=choice.message.content or "", logprobs=logprobs)
            return _finished(response, [text], choice.finish_reason, result.usage)
        return _events(response, result, request.logprobs, renamed)

    async def retrieve(self, response_id: str) -> rp.Response:
        """GET /v1/responses/{id}: nothing is stored, so always vLLM's 404 (its default, without
        VLLM_ENABLE_RESPONSES_API_STORE)."""
        raise OpenAIError(
            f"Response with id '{response_id}' not found: {rp.NOT_STORED}",
            status=404,
            param="response_id",
            code="not_found",
        )


def _finished(
    response: rp.Response,
    parts: list[rp.OutputText],
    finish_reason: protocol.FinishReason | None,
    usage: protocol.Usage | None,
    message_id: str | None = None,
) -> rp.Response:
    """The response once generation ended: incomplete when cut by max_output_tokens (or the context)."""
    cut = finish_reason == "length"
    message = rp.OutputMessage(status="incomplete" if cut else "completed", content=parts)
    if message_id is not None:
        message.id = message_id
    return response.model_copy(
        update={
            "status": "incomplete" if cut else "completed",
            "incomplete_details": rp.IncompleteDetails(reason="max_output_tokens") if cut else None,
            "output": [message],
            "usage": None if usage is None else rp.ResponseUsage.of(usage),
        }
    )


async def _events(
    response: rp.Response,
    chunks: AsyncIterator[protocol.ChatCompletionChunk],
    logprobs: bool,
    renamed: _Renamer,
) -> AsyncIterator[rp.ResponseEvent]:
    """OpenAI's event sequence for one text message: created, in_progress, output_item.added,
    content_part.added, output_text.delta..., output_text.done, content_part.done, output_item.done, then
    completed (incomplete when cut by max_output_tokens). An error after the start is an `error` event then
    response.failed."""
    sequence = 0

    def numbered(event: rp.ResponseEvent) -> rp.ResponseEvent:
        nonlocal sequence
        event.sequence_number, sequence = sequence, sequence + 1
        return event

    message = rp.OutputMessage(status="in_progress", content=[])
    ids = {"item_id": message.id, "output_index": 0, "content_index": 0}
    yield numbered(rp.ResponseCreated(sequence_number=0, response=response))
    yield numbered(rp.ResponseInProgress(sequence_number=0, response=response))
    yield numbered(rp.OutputItemAdded(sequence_number=0, output_index=0, item=message))
    empty = rp.OutputText(text="", logprobs=[] if logprobs else None)
    yield numbered(rp.ContentPartAdded(sequence_number=0, part=empty, **ids))
    text: list[str] = []
    steps: list[rp.TokenLogprob] = []
    finish_reason: protocol.FinishReason | None = None
    usage: protocol.Usage | None = None
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish_reason = choice.finish_reason or finish_reason
                    new_steps = rp.output_logprobs(choice.logprobs) if logprobs else []
                    if choice.delta.content or new_steps:
                        text.append(choice.delta.content or "")
                        steps += new_steps
                        delta = rp.OutputTextDelta(
                            sequence_number=0,
                            delta=choice.delta.content or "",
                            logprobs=rp.delta_logprobs(new_steps),
                            **ids,
                        )
                        yield numbered(delta)
    except OpenAIError as exc:
        error = renamed(exc)
        yield numbered(
            rp.ErrorEvent(sequence_number=0, code=error.code, message=error.message, param=error.param)
        )
        failed = response.model_copy(
            update={
                "status": "failed",
                "error": rp.ResponseError(
                    code="server_error" if error.status >= 500 else "invalid_prompt", message=error.message
                ),
            }
        )
        yield numbered(rp.ResponseFailed(sequence_number=0, response=failed))
        return
    whole = "".join(text)
    part = rp.OutputText(text=whole, logprobs=steps if logprobs else None)
    final = _finished(response, [part], finish_reason, usage, message_id=message.id)
    (item,) = final.output
    stream_steps = rp.delta_logprobs(steps)
    yield numbered(rp.OutputTextDone(sequence_number=0, text=whole, logprobs=stream_steps, **ids))
    yield numbered(rp.ContentPartDone(sequence_number=0, part=part, **ids))
    yield numbered(rp.OutputItemDone(sequence_number=0, output_index=0, item=item))
    if final.status == "incomplete":
        yield numbered(rp.ResponseIncomplete(sequence_number=0, response=final))
    else:
        yield numbered(rp.ResponseCompleted(sequence_number=0, response=final))


@dataclass
class _Renamer:
    """The chat path's refusal, naming the response request's fields instead of the chat's. `offset` is how
    many messages came before `input`'s (1 for `instructions`)."""

    offset: int
    text_input: bool  # `input` was a string: its one message is `input` itself

    def __call__(self, exc: OpenAIError) -> OpenAIError:
        message = self._rename(exc.message)
        param = None if exc.param is None else self._rename(exc.param)
        if message == exc.message and param == exc.param:
            return exc
        return OpenAIError(message, status=exc.status, type=exc.type, param=param, code=exc.code)

    def _rename(self, text: str) -> str:
        def message_name(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return "input"
            index = int(match.group(1)) - self.offset
            if index < 0:
                return "instructions"
            return "input" if self.text_input else f"input[{index}]"

        return _CHAT_NAME.sub(lambda m: _CHAT_NAMES[m.group(1)], _MESSAGES.sub(message_name, text))
