"""The logic between the OpenAI API and vLLM: prompt rendering and tokenization, generation, and the response
models (or async iterators of chunks) that serve/routes.py sends as JSON or server-sent events.

No HTTP here (an import-linter contract keeps FastAPI and Starlette out); which model a request names is
serve/models.py's; the engine is anything with AsyncLLM's generate (serve.engine.EngineClient).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vllm.exceptions import VLLMClientError

from finetune.prompting import PromptError, encode_prompt, encode_text, render_prompt
from serve import protocol
from serve.engine import EngineClient
from serve.metrics import ServerMetrics
from serve.models import ServedModels
from serve.protocol import OpenAIError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.parser.abstract_parser import Parser

    from serve.settings import ServeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Serving:
    """Chat and text completions on the engine, for the models `models` resolves."""

    engine: EngineClient
    tokenizer: Any
    models: ServedModels
    metrics: ServerMetrics
    max_model_len: int
    tool_calling: ToolCalling | None = None  # None: tools are rendered, never parsed (ToolCalling.none)
    _longest_token: int | None = None  # characters of the vocabulary's longest token
    _tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    )

    async def _tokenizing(self, work: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work on the one tokenizer thread: a long prompt takes seconds to render and
        tokenize, which on the event loop stalled every other request (and /health); one thread, because
        a fast tokenizer used from two threads at once fails ("Already borrowed")."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work, *args)

    def close(self) -> None:
        """Stop the tokenizer thread (a tokenization under way finishes on its own)."""
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _refuse_surely_too_long(self, characters: int, param: str) -> None:
        """Refuse text that cannot fit the context whatever it tokenizes to, without tokenizing it: no
        token is longer than the vocabulary's longest entry (a 10 MB prompt took 14 s to tokenize)."""
        if self._longest_token is None:
            self._longest_token = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        if characters > self.max_model_len * self._longest_token:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens; your {param} hold "
                f"{characters} characters, more than that many tokens can (at most {self._longest_token} "
                f"characters each). Shorten the {param}.",
                param=param,
                code="context_length_exceeded",
            )

    # --------------------------------------------------------------------------------- generation
    async def chat(
        self, request: protocol.ChatCompletionRequest, request_id: str | None = None
    ) -> protocol.ChatCompletion | AsyncIterator[protocol.ChatCompletionChunk]:
        """The completion, or with stream=true its chunks; cancelling this (or closing the chunks) aborts
        the engine request. Its id is `chatcmpl-<request_id>` (the HTTP request's X-Request-Id, as in vLLM),
        or a new one."""
        lora = self.models.resolve(request.model)
        protocol.check_text(request)
        tool_calling = self.tool_calling or ToolCalling.none(self.tokenizer)
        tools = tool_calling.start(request)
        prompt_tools = request.prompt_tools(exclude_when_none=tool_calling.exclude_tools_when_none)
        try:
            messages = protocol.chat_messages(request)
            self._refuse_surely_too_long(_chat_characters(messages, prompt_tools), "messages")
            prompt_ids = await self._tokenizing(encode_prompt, self.tokenizer, messages, prompt_tools)
        except PromptError as exc:
            raise OpenAIError(str(exc), param=exc.param or "messages") from exc
        params = request.to_sampling_params(
            prompt_tokens=len(prompt_ids),
            max_model_len=self.max_model_len,
            tool_constraint=tools.constraint if tools is not None else None,
        )
        request_id = f"chatcmpl-{request_id or uuid.uuid4().hex}"
        streams = self._start([prompt_ids], params, request_id, lora, request.model)
        if request.stream:
            return self._chat_chunks(streams, request, request_id, request.include_usage, tools)
        finals = await _collect(streams)
        return self._chat_response(finals, request, request_id, _usage(streams), tools)

    async def completions(
        self, request: protocol.CompletionRequest, request_id: str | None = None
    ) -> protocol.Completion | AsyncIterator[protocol.CompletionChunk]:
        """The completion, or with stream=true its chunks; cancelling this (or closing the chunks) aborts
        the engine requests. Its id is `cmpl-<request_id>`, or a new one."""
        lora = self.models.resolve(request.model)
        protocol.check_text(request)
        prompts = await self._tokenizing(self._completion_prompts, request.prompt)
        longest = max(len(p) for p in prompts)
        params = request.to_sampling_params(prompt_tokens=longest, max_model_len=self.max_model_len)
        request_id = f"cmpl-{request_id or uuid.uuid4().hex}"
        streams = self._start(prompts, params, request_id, lora, request.model)
        if request.stream:
            return self._completion_chunks(streams, request, request_id, prompts, request.include_usage)
        finals = await _collect(streams)
        return self._completion_response(finals, request, request_id, prompts, _usage(streams))

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        # The four prompt shapes OpenAI accepts: str, [str], [int], [[int]].
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise OpenAIError("prompt must not be empty", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                self._refuse_surely_too_long(len(item), "prompt")
            # An empty string may still tokenize to a BOS token; the published schema refuses it either way.
            ids = list(self.tokenizer(item)["input_ids"]) if isinstance(item, str) and item else list(item)
            if not ids:
                raise OpenAIError("prompt must not be empty", param="prompt")
            self._check_token_ids(ids, "prompt")
            prompts.append(ids)
        return prompts

    # --------------------------------------------------------------------------------- tokenizer
    async def tokenize(self, request: protocol.TokenizeRequest) -> protocol.TokenizeResponse:
        """vLLM's /tokenize: a text prompt's ids as /v1/completions makes them, or a conversation's as
        /v1/chat/completions renders it (finetune.prompting; with the defaults, exactly the ids it generates
        from). `model` must be served (404 otherwise); the base and its adapters share one tokenizer."""
        if request.model is not None:
            self.models.resolve(request.model)
        protocol.check_text(request)
        if isinstance(request, protocol.TokenizeChatRequest):
            if request.tools == []:
                raise OpenAIError("`tools` must not be an empty array", param="tools")
            tools = [tool.template_dict() for tool in request.tools or ()] or None
            try:
                messages = protocol.chat_messages(request)
                ids = await self._tokenizing(
                    self._chat_tokens,
                    messages,
                    tools,
                    request.add_generation_prompt,
                    request.add_special_tokens,
                )
            except PromptError as exc:
                raise OpenAIError(str(exc), param=exc.param or "messages") from exc
        else:
            ids = await self._tokenizing(self._text_tokens, request.prompt, request.add_special_tokens)
        strings = list(self.tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return protocol.TokenizeResponse(
            count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strings
        )

    async def detokenize(self, request: protocol.DetokenizeRequest) -> protocol.DetokenizeResponse:
        """vLLM's /detokenize: the text of token ids (special tokens kept, as vLLM decodes them)."""
        if request.model is not None:
            self.models.resolve(request.model)
        self._check_token_ids(request.tokens, "tokens")
        text = await self._tokenizing(self.tokenizer.decode, request.tokens)
        return protocol.DetokenizeResponse(prompt=str(text))

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise OpenAIError(f"{param} token ids must be in [0, {vocab})", param=param)

    def _chat_tokens(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        add_special_tokens: bool,
    ) -> list[int]:
        text = render_prompt(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
        if add_special_tokens:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return encode_text(self.tokenizer, text)

    def _text_tokens(self, prompt: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def _start(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        lora: LoRARequest | None,
        model: str,
    ) -> list[TrackedStream]:
        from vllm.inputs import TokensPrompt

        return [
            TrackedStream(
                self,
                TokensPrompt(prompt_token_ids=ids),
                params,
                f"{request_id}-{index}",
                lora,
                model,
            )
            for index, ids in enumerate(prompts)
        ]

    # ----- chat shapes
    def _chat_response(
        self,
        finals: list[RequestOutput],
        request: protocol.ChatCompletionRequest,
        request_id: str,
        usage: protocol.Usage,
        tools: ChatToolCalls | None,
    ) -> protocol.ChatCompletion:
        (final,) = finals
        choices = []
        for output in sorted(final.outputs, key=lambda o: o.index):
            message = {"role": "assistant", "content": output.text}
            finish = protocol.finish_reason(output.finish_reason)
            if tools is not None:
                message, finish = tools.message(output, final.prompt_token_ids)
            logprobs = None
            if request.logprobs and output.logprobs is not None:
                logprobs = protocol.chat_logprobs(
                    output.token_ids,
                    output.logprobs,
                    self._decode_token,
                    top_logprobs=request.top_logprobs or 0,
                )
            choices.append(
                {
                    "index": output.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            )
        return protocol.ChatCompletion(
            id=request_id, created=int(time.time()), model=request.model, choices=choices, usage=usage
        )

    async def _chat_chunks(
        self,
        streams: list[TrackedStream],
        request: protocol.ChatCompletionRequest,
        request_id: str,
        include_usage: bool,
        tools: ChatToolCalls | None,
    ) -> AsyncIterator[protocol.ChatCompletionChunk]:
        (stream,) = streams
        created = int(time.time())
        started: set[int] = set()
        parsers: dict[int, StreamedToolCalls] = {}  # one per choice: vLLM's parsers keep state

        def chunk(
            index: int, delta: protocol.ChatDelta, finish: protocol.FinishReason | None, logprobs: Any = None
        ) -> protocol.ChatCompletionChunk:
            choice = protocol.ChatCompletionChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish
            )
            return protocol.ChatCompletionChunk(
                id=request_id, created=created, model=request.model, choices=[choice]
            )

        last: RequestOutput | None = None
        async for output in stream:
            last = output
            for completion in output.outputs:
                if completion.index not in started:
                    started.add(completion.index)
                    yield chunk(completion.index, protocol.ChatDelta(role="assistant", content=""), None)
                logprobs = None
                if request.logprobs and completion.logprobs:
                    logprobs = protocol.chat_logprobs(
                        completion.token_ids,
                        completion.logprobs,
                        self._decode_token,
                        top_logprobs=request.top_logprobs or 0,
                    )
                if tools is None:
                    delta = protocol.ChatDelta(content=completion.text) if completion.text else None
                    finish = protocol.finish_reason(completion.finish_reason)
                else:
                    if completion.index not in parsers:
                        parsers[completion.index] = tools.streamed()
                    delta, finish = parsers[completion.index].delta(completion, output.prompt_token_ids)
                if delta is not None or logprobs:
                    yield chunk(completion.index, delta or protocol.ChatDelta(), None, logprobs)
                if finish is not None:
                    yield chunk(completion.index, protocol.ChatDelta(), finish)
        if include_usage and last is not None:
            yield protocol.ChatCompletionChunk(
                id=request_id, created=created, model=request.model, choices=[], usage=stream.usage()
            )

    # ----- completion shapes
    def _completion_response(
        self,
        finals: list[RequestOutput],
        request: protocol.CompletionRequest,
        request_id: str,
        prompts: list[list[int]],
        usage: protocol.Usage,
    ) -> protocol.Completion:
        choices = []
        n = request.n
        # echo with max_tokens=0 scores the prompt only: the one token the engine had to make is dropped.
        keep_generated = not request.echo_only
        for prompt_index, final in enumerate(finals):
            prompt_ids = prompts[prompt_index]
            prefix = self.tokenizer.decode(prompt_ids) if request.echo else ""
            for output in sorted(final.outputs, key=lambda o: o.index):
                token_ids = list(output.token_ids) if keep_generated else []
                logprobs = None
                if request.logprobs is not None:
                    steps = list(output.logprobs or [])[: len(token_ids)]
                    if request.echo:
                        token_ids = prompt_ids + token_ids
                        steps = list(final.prompt_logprobs or [None] * len(prompt_ids)) + steps
                    logprobs = protocol.completion_logprobs(
                        token_ids, steps, self._decode_token, top_logprobs=request.logprobs
                    )
                choices.append(
                    {
                        "index": prompt_index * n + output.index,
                        "text": prefix + (output.text if keep_generated else ""),
                        "logprobs": logprobs,
                        "finish_reason": protocol.finish_reason(output.finish_reason),
                    }
                )
        if not keep_generated:
            usage = protocol.Usage.of(usage.prompt_tokens, 0)
        return protocol.Completion(
            id=request_id, created=int(time.time()), model=request.model, choices=choices, usage=usage
        )

    async def _completion_chunks(
        self,
        streams: list[TrackedStream],
        request: protocol.CompletionRequest,
        request_id: str,
        prompts: list[list[int]],
        include_usage: bool,
    ) -> AsyncIterator[protocol.CompletionChunk]:
        from vllm.utils.async_utils import merge_async_iterators

        created = int(time.time())
        n = request.n
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        async for prompt_index, output in merge_async_iterators(*(s.__aiter__() for s in streams)):
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                text = completion.text
                if request.echo and index not in echoed:
                    echoed.add(index)
                    text = self.tokenizer.decode(prompts[prompt_index]) + text
                logprobs = None
                if request.logprobs is not None and completion.logprobs:
                    logprobs = protocol.completion_logprobs(
                        completion.token_ids,
                        completion.logprobs,
                        self._decode_token,
                        top_logprobs=request.logprobs,
                        text_offset=offsets.get(index, 0),
                    )
                offsets[index] = offsets.get(index, 0) + len(text)
                choice = protocol.CompletionChunkChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=protocol.finish_reason(completion.finish_reason),
                )
                yield protocol.CompletionChunk(
                    id=request_id, created=created, model=request.model, choices=[choice]
                )
        if include_usage:
            usage = _usage(streams)
            yield protocol.CompletionChunk(
                id=request_id, created=created, model=request.model, choices=[], usage=usage
            )

    def _decode_token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


class ToolCalling:
    """Tool calls as vLLM's OpenAI server makes them, with vLLM's own parser (--enable-auto-tool-choice
    --tool-call-parser NAME): its ParserManager composes the parser class once; each request gets its own
    parser, which also builds the grammar that forces a call for tool_choice "required" or a named function
    (vLLM's adjust_request). Without a parser, tools are only rendered (tool_choice "none")."""

    def __init__(
        self, tokenizer: Any, parser_cls: type[Parser] | None, *, exclude_tools_when_none: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.parser_cls = parser_cls
        self.exclude_tools_when_none = exclude_tools_when_none

    @classmethod
    def none(cls, tokenizer: Any) -> ToolCalling:
        return cls(tokenizer, None)

    @classmethod
    def from_settings(cls, settings: ServeSettings, tokenizer: Any) -> ToolCalling:
        """The server's tool calling; vLLM's check that the parser works with this tokenizer fails start-up
        (a TypeError naming the flag), as it does vLLM's."""
        parser_cls = None
        if settings.enable_auto_tool_choice:
            from vllm.parser import ParserManager

            parser_cls = ParserManager.get_parser(
                tool_parser_name=settings.tool_call_parser,
                enable_auto_tools=True,
                model_name=settings.base_model,
                tokenizer=tokenizer,
            )
        return cls(
            tokenizer, parser_cls, exclude_tools_when_none=settings.exclude_tools_when_tool_choice_none
        )

    def start(self, request: protocol.ChatCompletionRequest) -> ChatToolCalls | None:
        """Check the request's tools against vLLM's rules (400s naming the field); the tool calls to parse
        out of its answer, or None where there are none to parse (no tools, or tool_choice "none", whose
        answer vLLM's parser passes through as text)."""
        request.check_tools(auto_tools=self.parser_cls is not None)
        if self.parser_cls is None or request.effective_tool_choice == "none":
            return None
        return ChatToolCalls(self.tokenizer, self.parser_cls, request)


class ChatToolCalls:
    """One request's tool calls: vLLM's ChatCompletionRequest for its parser (which reads tools, tool_choice
    and parallel_tool_calls from it), adjusted by the parser, and the answers parsed as vLLM's
    OpenAIServingChat parses them (vllm/entrypoints/openai/chat_completion/serving.py)."""

    def __init__(
        self, tokenizer: Any, parser_cls: type[Parser], request: protocol.ChatCompletionRequest
    ) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionNamedToolChoiceParam,
            ChatCompletionRequest,
        )

        self.tokenizer = tokenizer
        self.parser_cls = parser_cls
        body = request.model_dump(
            include={"model", "messages", "tools", "parallel_tool_calls", "skip_special_tokens", "stream"},
            exclude_none=True,
        )
        body["tool_choice"] = _dumped(request.effective_tool_choice)
        vllm_request = ChatCompletionRequest.model_validate(body)
        # The parser sets the grammar of a forced call (structured_outputs) and keeps special tokens where its
        # markup is made of them; a parser instance is stateful, so each choice gets its own later.
        self.vllm_request = parser_cls(tokenizer, list(vllm_request.tools or ())).adjust_request(vllm_request)
        self.named = isinstance(self.vllm_request.tool_choice, ChatCompletionNamedToolChoiceParam)
        self.required = self.vllm_request.tool_choice == "required"
        self.constraint = protocol.ToolConstraint(
            structured=self.vllm_request.structured_outputs,
            skip_special_tokens=bool(self.vllm_request.skip_special_tokens),
        )

    def parser(self) -> Parser:
        return self.parser_cls(self.tokenizer, list(self.vllm_request.tools or ()))

    def message(
        self, output: Any, prompt_ids: list[int] | None
    ) -> tuple[dict[str, Any], protocol.FinishReason | None]:
        """One choice's message and finish_reason: "tool_calls" when the model called a tool on its own or
        as tool_choice "required" asked ("stop" for a named function, as OpenAI)."""
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
        from vllm.renderers.chat_utils import make_tool_call_id

        parser = self.parser()
        if prompt_ids is not None:
            parser.set_prompt_token_ids(prompt_ids)
        _, content, calls = parser.parse(
            output.text, self.vllm_request, enable_auto_tools=True, model_output_token_ids=output.token_ids
        )
        calls = maybe_filter_parallel_tool_calls(list(calls or []), self.vllm_request)
        tool_calls = [
            {"id": call.id or make_tool_call_id(), "type": "function", "function": call.model_dump()}
            for call in calls
        ]
        finish = protocol.finish_reason(output.finish_reason)
        message: dict[str, Any]
        if self.named or self.required:
            message = {"role": "assistant", "content": content or "", "tool_calls": tool_calls}
        else:
            message = {"role": "assistant", "content": content, "tool_calls": tool_calls or None}
        if (tool_calls and not self.named) or (self.required and output.finish_reason == "stop"):
            finish = "tool_calls"
        return message, finish

    def streamed(self) -> StreamedToolCalls:
        return StreamedToolCalls(self, self.parser())


class StreamedToolCalls:
    """One streamed choice through vLLM's parser: content deltas, then tool-call deltas (the call's id and
    name first, then pieces of its arguments) as vLLM's server streams them."""

    def __init__(self, calls: ChatToolCalls, parser: Parser) -> None:
        self.calls = calls
        self.parser = parser
        self.called = False

    def delta(
        self, completion: Any, prompt_ids: list[int] | None
    ) -> tuple[protocol.ChatDelta | None, protocol.FinishReason | None]:
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        finished = completion.finish_reason is not None
        message = self.parser.parse_delta(
            delta_text=completion.text,
            delta_token_ids=list(completion.token_ids),
            request=self.calls.vllm_request,
            prompt_token_ids=prompt_ids,
            finished=finished,
        )
        delta = None
        if message is not None:
            message = maybe_filter_parallel_tool_calls(message, self.calls.vllm_request)
            tool_calls = [
                protocol.DeltaToolCall.model_validate(call.model_dump()) for call in message.tool_calls
            ]
            self.called = self.called or bool(tool_calls)
            if message.content or tool_calls:
                delta = protocol.ChatDelta(content=message.content, tool_calls=tool_calls or None)
        finish = protocol.finish_reason(completion.finish_reason)
        if self.called and not self.calls.named and completion.finish_reason == "stop":
            finish = "tool_calls"
        return delta, finish


def _dumped(choice: str | BaseModel) -> Any:
    return choice if isinstance(choice, str) else choice.model_dump()


def _chat_characters(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """The text a chat renders from: messages, their tool calls and the tools' definitions."""
    characters = sum(len(m["content"]) for m in messages) + (len(json.dumps(tools)) if tools else 0)
    for message in messages:
        characters += sum(len(json.dumps(call)) for call in message.get("tool_calls", ()))
    return characters


class TrackedStream:
    """One engine request: iterating it yields vLLM outputs while metrics and token counts follow along."""

    def __init__(
        self,
        serving: Serving,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        lora: LoRARequest | None,
        model: str,
    ) -> None:
        self.serving = serving
        self.prompt = prompt
        self.params = params
        self.request_id = request_id
        self.lora = lora
        self.model = model
        self.prompt_tokens = len(prompt["prompt_token_ids"])
        self.completion_tokens = 0

    async def __aiter__(self) -> AsyncGenerator[RequestOutput, None]:
        engine = self.serving.engine
        if engine.errored:
            raise OpenAIError("the engine has stopped; restart the server", status=503, type="server_error")
        self.lora = self.serving.models.request_started(self.lora, self.model)
        try:
            tracker = self.serving.metrics.track(self.model, self.lora.lora_int_id if self.lora else None)
            generated: dict[int, int] = {}
            delta = self.params.output_kind.name == "DELTA"  # DELTA outputs carry new tokens only
            finished = False
            outputs = engine.generate(self.prompt, self.params, self.request_id, lora_request=self.lora)
            try:
                async for output in outputs:
                    for completion in output.outputs:
                        count = len(completion.token_ids)  # FINAL_ONLY outputs: the whole sequence
                        generated[completion.index] = (
                            generated.get(completion.index, 0) + count if delta else count
                        )
                    if any(generated.values()):
                        tracker.first_token(output)
                    if output.finished:
                        tracker.finished(output)
                    finished = output.finished
                    yield output
            except (ValueError, VLLMClientError) as exc:  # vLLM's input validation: the request never ran
                finished = True
                raise OpenAIError(str(exc), param=self._refused_param(exc)) from exc
            finally:
                if not finished:
                    # The consumer went away (closed stream, cancelled task): closing vLLM's generator
                    # aborts the request in the engine, so nothing keeps generating for nobody.
                    await outputs.aclose()
                    tracker.aborted()
                self.completion_tokens = sum(generated.values())
                tracker.tokens(self.prompt_tokens, self.completion_tokens)
                tracker.close()
        finally:
            # After the engine request ended or was aborted: an unload waiting on this adapter may go on.
            self.serving.models.request_finished(self.lora)

    def _refused_param(self, exc: Exception) -> str | None:
        param = getattr(exc, "parameter", None)
        if param is None and self.params.structured_outputs is not None:
            # The schema is what vLLM validates for such a request (a bad regex, not a JSON Schema, ...).
            return "response_format"
        return str(param) if param is not None else None

    def usage(self) -> protocol.Usage:
        return protocol.Usage.of(self.prompt_tokens, self.completion_tokens)


async def _collect(streams: list[TrackedStream]) -> list[RequestOutput]:
    """Run every stream to its end (the final output of each); cancelled, they all abort."""

    async def drain(stream: TrackedStream) -> RequestOutput:
        final = None
        async for output in stream:
            final = output
        assert final is not None
        return final

    return list(await asyncio.gather(*(drain(s) for s in streams)))


def _usage(streams: list[TrackedStream]) -> protocol.Usage:
    """What the engine requests of one API request used, once they have ended."""
    return protocol.Usage.total(stream.usage() for stream in streams)
