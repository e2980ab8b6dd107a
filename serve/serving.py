"""The logic between the OpenAI API and vLLM: adapter resolution, prompt rendering, generation, streaming.

Routes (serve/routes.py) stay thin; the engine is anything with AsyncLLM's generate/add_lora/remove_lora.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.exceptions import VLLMClientError

from finetune.prompting import PromptError, encode_prompt
from serve import protocol
from serve.adapters import Adapter, AdapterError, AdapterRegistry
from serve.metrics import ServerMetrics
from serve.protocol import OpenAIError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineClient(Protocol):
    """What serving needs from vLLM's AsyncLLM (a fake engine implements it in unit tests)."""

    errored: bool

    def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None,
    ) -> AsyncGenerator[RequestOutput, None]: ...

    async def abort(self, request_id: str) -> None: ...

    async def add_lora(self, lora_request: LoRARequest) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...

    async def list_loras(self) -> set[int]: ...


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


@dataclass
class RefusedAdapter:
    name: str
    path: str
    reason: str


@dataclass
class Serving:
    engine: EngineClient
    tokenizer: Any
    registry: AdapterRegistry
    metrics: ServerMetrics
    model_id: str
    max_model_len: int
    unload_timeout_s: float = 60.0
    created: int = field(default_factory=lambda: int(time.time()))
    refused: list[RefusedAdapter] = field(default_factory=list)
    # lora_int_id -> engine requests running on it; an unload waits for its adapter's count to reach 0.
    _running: dict[int, int] = field(default_factory=dict)
    _idle: dict[int, asyncio.Event] = field(default_factory=dict)
    _longest_token: int | None = None  # characters of the vocabulary's longest token
    _served_names: set[str] = field(default_factory=set)  # every adapter name ever served (metric labels)
    _tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    )

    async def _tokenizing(self, work: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work on the one tokenizer thread: a long prompt takes seconds to render and
        tokenize, which on the event loop stalled every other request (and /health); one thread, because
        a fast tokenizer used from two threads at once fails ("Already borrowed")."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work, *args)

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

    # ------------------------------------------------------------------------------------- models
    def resolve(self, model: str) -> LoRARequest | None:
        """The LoRA request for an adapter name, None for the base; 404 for anything else."""
        if model == self.model_id:
            return None
        adapter = self.registry.get(model)
        if adapter is None:
            raise OpenAIError.model_not_found(model)  # not the list of models: any key could read it
        return adapter.lora_request()

    def has_served(self, model: str) -> bool:
        """The base or an adapter name this server serves or once served (bounded by admin loads)."""
        return model == self.model_id or model in self._served_names

    def list_models(self) -> protocol.ModelList:
        cards = [
            protocol.ModelCard(
                id=self.model_id,
                created=self.created,
                owned_by="tuneserve",
                root=self.model_id,
                parent=None,
                max_model_len=self.max_model_len,
            )
        ]
        cards += [
            protocol.ModelCard(
                id=adapter.name,
                created=self.created,
                owned_by="tuneserve",
                root=adapter.name,  # not its path: every API key sees this list; admins get paths elsewhere
                parent=self.model_id,
                max_model_len=self.max_model_len,
            )
            for adapter in sorted(self.registry, key=lambda a: a.name)
        ]
        return protocol.ModelList(data=cards)

    # ----------------------------------------------------------------------------------- adapters
    async def add_adapter(self, name: str, path: Any) -> Adapter:
        """Check an adapter statically, then have vLLM load it; only then is it served."""
        # Reading and checking every weight of a large adapter takes a while: not on the event loop.
        adapter = await asyncio.to_thread(self.registry.validate, name, path)
        try:
            await self.engine.add_lora(adapter.lora_request())
        except Exception as exc:  # vLLM raises plain exceptions for unloadable weights
            raise AdapterError(f"vLLM could not load adapter {name!r} from {adapter.path}: {exc}") from exc
        self.registry.register(adapter)
        self._served_names.add(name)
        log.info("serving adapter %s (rank %d) from %s", name, adapter.rank, adapter.path)
        return adapter

    async def remove_adapter(self, name: str) -> Adapter:
        """Stop routing requests to `name`, let the requests running on it finish, then drop it from vLLM.

        vLLM removes an adapter that running requests still use (its worker then fails on their next step,
        KeyError in convert_mapping, and the engine is dead for good), so the engine is asked only once no
        request of ours runs on it. If they do not finish within unload_timeout_s, the adapter stays served
        and the unload fails with 409.
        """
        adapter = self.registry.begin_removal(name)
        running = self._running.get(adapter.lora_int_id, 0)
        if running:
            log.info("unloading adapter %s: waiting for its %d running requests", name, running)
            idle = self._idle.setdefault(adapter.lora_int_id, asyncio.Event())
            try:
                await asyncio.wait_for(idle.wait(), self.unload_timeout_s)
            except TimeoutError:
                self.registry.cancel_removal(adapter)
                left = self._running.get(adapter.lora_int_id, 0)
                raise AdapterError(
                    f"adapter {name!r} still has {left} requests running "
                    f"after {self.unload_timeout_s:.0f} s; it stays loaded: retry the unload later "
                    "(or start the server with a longer --unload-timeout)",
                    status=409,
                ) from None
        try:
            await self.engine.remove_lora(adapter.lora_int_id)
        finally:
            self.registry.finish_removal(adapter)
            self._idle.pop(adapter.lora_int_id, None)
        log.info("unloaded adapter %s", name)
        return adapter

    def request_started(self, lora: LoRARequest | None, model: str) -> None:
        if lora is None:
            return
        adapter = self.registry.get(model)
        if adapter is None or adapter.lora_int_id != lora.lora_int_id:
            # Resolved before an unload, started after it (a stream's body runs after the response starts).
            raise OpenAIError(
                f"The model `{model}` was unloaded", status=404, param="model", code="model_not_found"
            )
        self._running[lora.lora_int_id] = self._running.get(lora.lora_int_id, 0) + 1

    def request_finished(self, lora: LoRARequest | None) -> None:
        if lora is None:
            return
        left = self._running[lora.lora_int_id] - 1
        if left:
            self._running[lora.lora_int_id] = left
            return
        del self._running[lora.lora_int_id]
        idle = self._idle.get(lora.lora_int_id)
        if idle is not None:
            idle.set()

    async def add_adapters(
        self, candidates: Sequence[tuple[str, Any]], *, confined: bool = False
    ) -> list[Adapter]:
        """Add each candidate; a bad one is refused (logged, kept in `refused`) and the rest still load.

        confined: the paths come from the adapters dir and must stay in it once symlinks are followed (the
        rule a runtime load request's lora_path follows).
        """
        added = []
        for name, path in candidates:
            try:
                if confined:
                    path = self.registry.resolve_runtime_path(path.name, name)
                added.append(await self.add_adapter(name, path))
            except AdapterError as exc:
                log.error("refused adapter %s (%s): %s", name, path, exc)
                self.refused = [r for r in self.refused if r.name != name]
                self.refused.append(RefusedAdapter(name=name, path=str(path), reason=str(exc)))
        return added

    async def refresh(self) -> list[Adapter]:
        """Serve adapter folders that appeared in the adapters dir since start-up."""
        return await self.add_adapters(self.registry.discover(), confined=True)

    # --------------------------------------------------------------------------------- generation
    async def chat(
        self, request: protocol.ChatCompletionRequest, raw: Request
    ) -> JSONResponse | StreamingResponse:
        lora = self.resolve(request.model)
        protocol.check_text(request)
        try:
            messages = protocol.chat_messages(request)
            self._refuse_surely_too_long(sum(len(m["content"]) for m in messages), "messages")
            prompt_ids = await self._tokenizing(encode_prompt, self.tokenizer, messages)
        except PromptError as exc:
            raise OpenAIError(str(exc), param="messages") from exc
        params = protocol.sampling_params(
            request, prompt_tokens=len(prompt_ids), max_model_len=self.max_model_len
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._start([prompt_ids], params, request_id, lora, request.model)
        if request.stream:
            return self._sse(self._chat_chunks(streams, request, request_id, request.include_usage))
        finals = await self._collect(streams, raw)
        return JSONResponse(self._chat_response(finals, request, request_id))

    async def completions(
        self, request: protocol.CompletionRequest, raw: Request
    ) -> JSONResponse | StreamingResponse:
        lora = self.resolve(request.model)
        protocol.check_text(request)
        prompts = await self._tokenizing(self._completion_prompts, request.prompt)
        longest = max(len(p) for p in prompts)
        params = protocol.sampling_params(request, prompt_tokens=longest, max_model_len=self.max_model_len)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._start(prompts, params, request_id, lora, request.model)
        if request.stream:
            return self._sse(
                self._completion_chunks(streams, request, request_id, prompts, request.include_usage)
            )
        finals = await self._collect(streams, raw)
        return JSONResponse(self._completion_response(finals, request, request_id, prompts))

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
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompts.append(ids)
        return prompts

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

    async def _collect(self, streams: list[TrackedStream], raw: Request) -> list[RequestOutput]:
        """Run every stream to its end; abort them all if the client disconnects first."""

        async def drain(stream: TrackedStream) -> RequestOutput:
            final = None
            async for output in stream:
                final = output
            assert final is not None
            return final

        work: asyncio.Future[list[RequestOutput]] = asyncio.gather(*(drain(s) for s in streams))
        disconnect: asyncio.Future[None] = asyncio.ensure_future(_wait_for_disconnect(raw))
        racing: list[asyncio.Future[Any]] = [work, disconnect]
        done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()  # cancelling engine.generate() aborts the request inside vLLM
            with _suppress_cancel():
                await work
            raise ClientDisconnected
        disconnect.cancel()
        return list(work.result())

    @staticmethod
    def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    # pydantic-core writes the JSON in one call (half the time of model_dump + json.dumps)
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except OpenAIError as exc:
                # Headers are gone already: report the error in-band, as OpenAI does.
                yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    # ----- chat shapes
    def _chat_response(
        self, finals: list[RequestOutput], request: protocol.ChatCompletionRequest, request_id: str
    ) -> dict[str, Any]:
        (final,) = finals
        choices = []
        for output in sorted(final.outputs, key=lambda o: o.index):
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
                    "message": {"role": "assistant", "content": output.text},
                    "logprobs": logprobs,
                    "finish_reason": protocol.finish_reason(output.finish_reason),
                }
            )
        usage = _usage(finals)
        return protocol.ChatCompletion(
            id=request_id, created=int(time.time()), model=request.model, choices=choices, usage=usage
        ).model_dump()

    async def _chat_chunks(
        self,
        streams: list[TrackedStream],
        request: protocol.ChatCompletionRequest,
        request_id: str,
        include_usage: bool,
    ) -> AsyncIterator[protocol.ChatCompletionChunk]:
        (stream,) = streams
        created = int(time.time())
        started: set[int] = set()

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
                if completion.text or logprobs:
                    yield chunk(completion.index, protocol.ChatDelta(content=completion.text), None, logprobs)
                if completion.finish_reason is not None:
                    finish = protocol.finish_reason(completion.finish_reason)
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
    ) -> dict[str, Any]:
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
        usage = _usage(finals)
        if not keep_generated:
            usage = {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
        return protocol.Completion(
            id=request_id, created=int(time.time()), model=request.model, choices=choices, usage=usage
        ).model_dump()

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
            usage = _add_usage([s.usage() for s in streams])
            yield protocol.CompletionChunk(
                id=request_id, created=created, model=request.model, choices=[], usage=usage
            )

    def _decode_token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


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
        self.serving.request_started(self.lora, self.model)
        try:
            with self.serving.metrics.track(self.model) as tracker:
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
                            tracker.first_token()
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
        finally:
            # After the engine request ended or was aborted: an unload waiting on this adapter may go on.
            self.serving.request_finished(self.lora)

    def _refused_param(self, exc: Exception) -> str | None:
        param = getattr(exc, "parameter", None)
        if param is None and self.params.structured_outputs is not None:
            # The schema is what vLLM validates for such a request (a bad regex, not a JSON Schema, ...).
            return "response_format"
        return str(param) if param is not None else None

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _usage(finals: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(f.prompt_token_ids or ()) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _add_usage(parts: list[dict[str, int]]) -> dict[str, int]:
    return {
        key: sum(part[key] for part in parts)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _suppress_cancel:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, asyncio.CancelledError | ClientDisconnected)
