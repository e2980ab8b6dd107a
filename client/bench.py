"""`python -m client bench`: send a suite's prompts to models at an OpenAI-compatible endpoint, then score.

The runner bounds concurrency, retries transient errors with exponential backoff and caches every answer
on disk; `run_bench` checks the endpoint and models first, then writes results.json, report.md and report.png.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliSuppress

from client.cache import Reply, ResponseCache, request_key
from client.cli import Commands, CommandSettings, add_command
from client.endpoint import EndpointError, served_models
from client.suite import BenchPrompt, Suite, SuiteResult
from client.suites import Judge, SuiteName, build_suite

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark cannot run (endpoint unreachable, unknown model, bad data); the message says what to do."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int | None = 0


class BenchConfig(CommandSettings):
    """Everything one `bench` run needs; its fields are the command's flags."""

    base_url: str | None = Field(None, description="the endpoint's API root, e.g. http://127.0.0.1:8000/v1")
    api_key: str = Field("EMPTY", description="bearer token for --base-url")
    models: list[str] = Field([], description="comma-separated model ids; the first is the baseline")
    suite: SuiteName | None = Field(None, description="the suite to run (or give --lineage)")
    lineage: list[Path] = Field(
        [],
        description="instead of --suite: adapter folders made by `finetune run`; each version of their "
        "lineages (init_from), served under its folder's name, and the base are scored on the held-out "
        "items of every data set in them (the test.jsonl beside each train file) and on IFEval (--data), "
        "each version tested against its parent (OUT/lineage.md, lineage.json, forgetting.png); "
        "--models may name the base",
    )
    data: str | None = Field(
        None,
        description="tasks: a test.jsonl from `python -m client tasks`; ifeval: JSONL or hub id such as "
        "google/IFEval (else the 541 prompts shipped in the package); reference: .json/.jsonl or hub "
        "ID[:SPLIT] (the whole of it is the held-out set); mtbench: FastChat's data folder (else the "
        "copy shipped in the package)",
    )
    limit: int | None = Field(None, ge=1, description="only the first N items")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    max_tokens: int = Field(256, ge=1, description="per reply")
    temperature: float = Field(0.0, ge=0, description="0 is greedy")
    seed: int = Field(0, description="sampling seed sent with each request")
    out: Path = Field(Path("bench-out"), description="output directory")
    cache_dir: Path | None = Field(None, description="response cache directory, else OUT/cache")
    no_cache: bool = Field(False, description="neither read nor write the response cache")
    cache_scope: str | None = Field(
        None,
        description="name the endpoint by this in cache keys instead of its URL, so answers of the same "
        "models served elsewhere (another port, a restarted server) are reused; give it only to unchanged "
        "models",
    )
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_attempts: int = Field(5, ge=1, description="tries per request on transient errors")
    judge_base_url: str | None = Field(None, description="mtbench: the judge's endpoint, else --base-url")
    judge_model: str | None = Field(None, description="mtbench: the judge model's id")
    judge_api_key: str | None = Field(None, description="mtbench: bearer token for the judge, else --api-key")
    judge_max_tokens: int = Field(2048, ge=1, description="mtbench: per judgment")
    rescore: Path | None = Field(
        None,
        description="an earlier results.json: score its responses again, asking no model (a judge still "
        "answers)",
    )
    tokenizer: str | None = Field(
        None,
        description="a local tokenizer (folder or hub id), e.g. the base an adapter was trained on: before "
        "any prompt, check through the endpoint's /tokenize that it renders chats into the same tokens",
    )
    gate: Path | None = Field(
        None,
        description="a gate file (YAML rules on the differences from the baseline): judge the run, write "
        "OUT/gate.json, exit 1 when a rule fails (`python -m client gate` judges a saved run)",
    )
    progress: CliSuppress[bool] = True  # progress bars (off in tests)

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[str]) -> list[str]:
        names = [name.strip() for name in models if name.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"lists a model more than once: {','.join(names)}")
        return names

    @model_validator(mode="after")
    def _needs(self) -> BenchConfig:
        if (self.suite is None) == (not self.lineage):
            raise ValueError("give --suite (one benchmark) or --lineage (adapter versions), one of them")
        if self.gate is not None:
            from client.gate import load_gate

            load_gate(self.gate)  # a bad gate file is refused before any request
        if self.lineage:
            if self.gate is not None:
                raise ValueError("--gate judges one suite's run; run it on a column's results.json instead")
            if self.rescore is not None:
                raise ValueError("--lineage asks the endpoint; it cannot --rescore an earlier run")
            if len(self.models) > 1:
                raise ValueError("with --lineage, --models names only the base (the versions come from it)")
            if self.base_url is None:
                raise ValueError("--base-url is required (e.g. http://127.0.0.1:8000/v1)")
            return self
        if not self.models and self.rescore is None:
            raise ValueError("--models must name at least one model (the first is the baseline)")
        if self.base_url is None and self.rescore is None:
            raise ValueError("--base-url is required (e.g. http://127.0.0.1:8000/v1)")
        if self.suite == "mtbench":
            if self.judge_model is None:
                raise ValueError(
                    "--suite mtbench needs --judge-model (and --judge-base-url if it is elsewhere)"
                )
            if (self.judge_base_url or self.base_url) is None:
                raise ValueError("--suite mtbench with --rescore needs --judge-base-url")
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed)


@dataclass
class BenchReport:
    """What a run produced: per-model results, run metadata, the files written and request counts."""

    results: dict[str, SuiteResult]
    meta: dict[str, Any]
    paths: dict[str, Path]
    requests: int = 0  # chat requests made (the SDK's retries of one count once), models and judge together
    cache_hits: int = 0


async def _gather_or_cancel(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Results in order; on the first failure the other requests are cancelled, not left running."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class ChatRunner:
    """Chat completions against one endpoint: bounded concurrency, retries with backoff, on-disk cache."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_attempts: int = 5,
        cache: ResponseCache | None = None,
        cache_scope: str | None = None,
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        # Cache keys name the endpoint by its URL, or by a scope that stands for the same models anywhere.
        self.cache_scope = cache_scope if cache_scope is not None else self.base_url
        # The SDK retries connection errors, timeouts, 408, 409, 429 and 5xx with exponential backoff
        # (honouring Retry-After); other errors fail at once.
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_attempts - 1
        )
        self.semaphore = asyncio.Semaphore(concurrency)
        self.cache = cache
        self.requests = 0
        self.cache_hits = 0

    async def close(self) -> None:
        await self.client.close()

    async def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> str:
        """The assistant's reply to `messages` (from the cache if this exact request was answered before)."""
        return (await self.complete(model, messages, params)).text

    async def complete(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> Reply:
        """`chat`, with the reason generation stopped (None for answers cached before it was recorded)."""
        sampling = asdict(params)
        key = request_key(self.cache_scope, model, messages, sampling)
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            self.cache_hits += 1
            return cached

        import openai

        try:
            async with self.semaphore:
                self.requests += 1
                completion = await self.client.chat.completions.create(
                    model=model,
                    messages=cast("list[ChatCompletionMessageParam]", messages),
                    temperature=params.temperature,
                    max_tokens=params.max_tokens,
                    seed=params.seed if params.seed is not None else openai.omit,
                )
        except openai.APIError as err:
            raise BenchError(
                f"request to {model} at {self.base_url} failed: {err}; the answers received so far are "
                "cached, so running the same command again resumes from here"
            ) from err
        choice = completion.choices[0]
        reply = Reply(str(choice.message.content or ""), choice.finish_reason)
        if self.cache is not None:
            self.cache.put(key, reply, {"model": model, "messages": messages, "params": sampling})
        return reply

    async def converse(self, model: str, prompt: BenchPrompt, params: SamplingParams) -> list[str]:
        """One reply per user turn; each later turn is sent after the model's own earlier replies."""
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        replies = []
        for turn in prompt.turns:
            messages.append({"role": "user", "content": turn})
            reply = await self.chat(model, list(messages), params)
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        return replies

    async def run_prompts(
        self,
        model: str,
        prompts: Sequence[BenchPrompt],
        params: SamplingParams,
        progress: bool = True,
        position: int = 0,
    ) -> dict[str, list[str]]:
        """Replies of `model` to every prompt (prompt id -> one reply per turn), with a progress bar (at
        line `position`, for several models at once)."""
        from tqdm import tqdm

        with tqdm(
            total=len(prompts), desc=model, unit="prompt", disable=not progress, position=position
        ) as bar:

            async def one(prompt: BenchPrompt) -> tuple[str, list[str]]:
                replies = await self.converse(model, prompt, params)
                bar.update()
                return prompt.id, replies

            return dict(await _gather_or_cancel([one(prompt) for prompt in prompts]))

    async def run_conversations(
        self,
        model: str,
        conversations: Sequence[list[dict[str, str]]],
        params: SamplingParams,
        desc: str,
        progress: bool = True,
    ) -> list[str]:
        """One reply to each fixed conversation (e.g. judge requests), in order, with a progress bar."""
        from tqdm import tqdm

        with tqdm(total=len(conversations), desc=desc, unit="request", disable=not progress) as bar:

            async def one(messages: list[dict[str, str]]) -> str:
                reply = await self.chat(model, messages, params)
                bar.update()
                return reply

            return await _gather_or_cancel([one(messages) for messages in conversations])


def threadsafe_judge(
    runner: ChatRunner,
    model: str,
    params: SamplingParams,
    loop: asyncio.AbstractEventLoop,
    progress: bool = True,
) -> Judge:
    """A synchronous judge for `Suite.score`, run in a worker thread while `loop` sends its requests."""

    def judge(conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        future = asyncio.run_coroutine_threadsafe(
            runner.run_conversations(model, conversations, params, f"judge {model}", progress), loop
        )
        return future.result()

    return judge


def _responses_from_results(
    path: Path, models: Sequence[str]
) -> tuple[dict[str, dict[str, list[str]]], dict[str, Any]]:
    """Responses per model (prompt id -> replies) and the run metadata of an earlier results.json."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchError(f"--rescore {path}: cannot read results ({err})") from err
    available = list(previous["models"])
    missing = [model for model in models if model not in available]
    if missing:
        raise BenchError(
            f"--rescore {path}: no results for {', '.join(missing)}; it has {', '.join(available)}"
        )
    chosen = list(models) or available
    responses = {
        model: {item["id"]: item["responses"] for item in previous["models"][model]["items"]}
        for model in chosen
    }
    return responses, previous["meta"]


async def run_bench(config: BenchConfig) -> BenchReport:
    """Check the endpoint and models, ask every model every prompt, score and write the report."""
    from client.report import write_report
    from tuneserve import package_version

    started = datetime.now(UTC)
    cache = None
    if not config.no_cache:
        cache = ResponseCache(config.cache_dir if config.cache_dir is not None else config.out / "cache")
    runners: list[ChatRunner] = []

    def runner(base_url: str, api_key: str, cache_scope: str | None = None) -> ChatRunner:
        runners.append(
            ChatRunner(
                base_url,
                api_key,
                concurrency=config.concurrency,
                timeout=config.timeout,
                max_attempts=config.max_attempts,
                cache=cache,
                cache_scope=cache_scope,
            )
        )
        return runners[-1]

    try:
        judge: Judge | None = None
        judge_meta: dict[str, Any] = {}
        if config.suite == "mtbench":
            assert config.judge_model is not None  # BenchConfig checks this
            judge_url = config.judge_base_url or config.base_url
            assert judge_url is not None
            judge_runner = runner(judge_url, config.judge_api_key or config.api_key)
            await served_models(judge_runner.client, [config.judge_model], option="--judge-model")
            # As FastChat: the judge answers greedily, at length.
            judge_params = SamplingParams(
                temperature=0.0, max_tokens=config.judge_max_tokens, seed=config.sampling.seed
            )
            loop = asyncio.get_running_loop()
            judge = threadsafe_judge(judge_runner, config.judge_model, judge_params, loop, config.progress)
            judge_meta = {
                "base_url": judge_runner.base_url,
                "model": config.judge_model,
                "sampling": asdict(judge_params),
            }
        try:
            assert config.suite is not None  # BenchConfig checks this
            suite: Suite = build_suite(config.suite, config.data, config.limit, judge)
        except (ValueError, OSError) as err:  # SuiteDataError, or a loader's own complaint about the data
            raise BenchError(str(err)) from err
        prompts = suite.prompts()

        if config.rescore is not None:
            responses, previous_meta = _responses_from_results(config.rescore, config.models)
            models_listing = previous_meta.get("models_listing", [])
            base_url = previous_meta.get("base_url")
            sampling = previous_meta.get("sampling", {})
        else:
            assert config.base_url is not None
            model_runner = runner(config.base_url, config.api_key, config.cache_scope)
            models_listing = await served_models(model_runner.client, config.models)
            if config.tokenizer is not None:
                from client.rendering import check_rendering

                await check_rendering(model_runner.base_url, config.api_key, config.models, config.tokenizer)
            base_url = model_runner.base_url
            sampling = asdict(config.sampling)
            # Every model's prompts share the concurrency limit, so the server stays busy while one model's
            # slowest replies finish (they would otherwise hold back the next model's start).
            answered = await _gather_or_cancel(
                [
                    model_runner.run_prompts(model, prompts, config.sampling, config.progress, position)
                    for position, model in enumerate(config.models)
                ]
            )
            responses = dict(zip(config.models, answered, strict=True))

        results: dict[str, SuiteResult] = {}
        for model, model_responses in responses.items():
            missing = [prompt.id for prompt in prompts if prompt.id not in model_responses]
            if missing:
                raise BenchError(f"no responses of {model} to {len(missing)} prompt(s), e.g. {missing[:3]}")
            # In a worker thread: the mtbench judge sends its requests on this event loop meanwhile.
            results[model] = await asyncio.to_thread(suite.score, model_responses)
    finally:
        for each in runners:
            await each.close()
        if cache is not None:
            cache.close()

    meta = {
        "suite": config.suite,
        "data": config.data,
        "limit": config.limit,
        "base_url": base_url,
        "models": list(responses),
        "models_listing": models_listing,
        "sampling": sampling,
        "judge": judge_meta or None,
        "rescored_from": str(config.rescore) if config.rescore is not None else None,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "tuneserve_version": package_version(),
    }
    paths = write_report(config.out, meta, results)
    return BenchReport(
        results=results,
        meta=meta,
        paths=paths,
        requests=sum(each.requests for each in runners),
        cache_hits=sum(each.cache_hits for each in runners),
    )


# --- command line ---------------------------------------------------------------------------------


def add_bench_command(commands: Commands) -> None:
    add_command(
        commands,
        "bench",
        BenchConfig,
        _run_bench,
        help="benchmark models at an OpenAI-compatible endpoint (tasks, IFEval, reference outputs, MT-Bench)",
        description="Send a suite's prompts to every model in --models (the first is the baseline), score "
        "the replies and write OUT/results.json, OUT/report.md and OUT/report.png. Answers are cached under "
        "--cache-dir, so an interrupted run resumes where it stopped.",
    )


def _run_bench(config: BenchConfig) -> int:
    started = time.monotonic()
    try:
        if config.lineage:
            from client.lineage_bench import run_lineage_bench

            lineage = asyncio.run(run_lineage_bench(config))
            n_models = len(next(iter(lineage.cells.values())))
            what = f"lineage: {n_models} model(s) on {len(lineage.cells)} column(s)"
            paths, requests, cache_hits = lineage.paths, lineage.requests, lineage.cache_hits
        else:
            report = asyncio.run(run_bench(config))
            what = f"{len(report.results)} model(s) on {config.suite}"
            paths, requests, cache_hits = report.paths, report.requests, report.cache_hits
    except (BenchError, EndpointError) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{what} in {time.monotonic() - started:.0f}s: {requests} request(s) sent, {cache_hits} answered "
        "from the cache"
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    if config.gate is not None:
        from client.gate import GateError, run_gate

        try:
            return 0 if run_gate(config.gate, paths["results"]) else 1
        except GateError as err:  # a rule that names a metric or model this run does not have
            print(f"bench: error: {err}", file=sys.stderr)
            return 2
    return 0
