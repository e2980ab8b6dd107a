"""`python -m client bench`: send a suite's prompts to models at an OpenAI-compatible endpoint, then score.

The runner bounds concurrency, retries transient errors with exponential backoff and caches every answer
on disk; `run_bench` checks the endpoint and models first, then writes results.json, report.md and report.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from client.cache import Reply, ResponseCache, request_key
from client.suite import BenchPrompt, Suite, SuiteResult
from client.suites import SUITE_NAMES, Judge, build_suite

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Status codes worth asking again: request timeout, conflict, rate limit, and every server error.
RETRY_STATUSES = frozenset({408, 409, 429})


class BenchError(RuntimeError):
    """A benchmark cannot run (endpoint unreachable, unknown model, bad data); the message says what to do."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int | None = 0


@dataclass
class BenchConfig:
    """Everything one `bench` run needs; `__post_init__` rejects bad values naming the option."""

    base_url: str | None
    models: list[str]
    suite: str
    data: str | None = None
    api_key: str = "EMPTY"
    limit: int | None = None
    concurrency: int = 8
    sampling: SamplingParams = field(default_factory=SamplingParams)
    out: Path = Path("bench-out")
    cache_dir: Path | None = None  # None: <out>/cache
    use_cache: bool = True
    cache_scope: str | None = None  # names the endpoint in cache keys instead of its URL
    timeout: float = 120.0
    max_attempts: int = 5
    backoff_s: float = 1.0
    judge_base_url: str | None = None  # None: base_url
    judge_model: str | None = None
    judge_api_key: str | None = None  # None: api_key
    judge_max_tokens: int = 2048
    rescore: Path | None = None  # a results.json whose responses are scored again, no model asked
    progress: bool = True

    def __post_init__(self) -> None:
        if self.suite not in SUITE_NAMES:
            raise ValueError(f"--suite must be one of {', '.join(SUITE_NAMES)}; got {self.suite!r}")
        if not self.models and self.rescore is None:
            raise ValueError("--models must name at least one model (the first is the baseline)")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--models lists a model more than once: {','.join(self.models)}")
        if self.base_url is None and self.rescore is None:
            raise ValueError("--base-url is required (e.g. http://127.0.0.1:8000/v1)")
        for option, value in (
            ("--limit", self.limit),
            ("--concurrency", self.concurrency),
            ("--max-tokens", self.sampling.max_tokens),
            ("--judge-max-tokens", self.judge_max_tokens),
            ("--max-attempts", self.max_attempts),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.sampling.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.sampling.temperature}")
        if self.suite == "mtbench":
            if self.judge_model is None:
                raise ValueError(
                    "--suite mtbench needs --judge-model (and --judge-base-url if it is elsewhere)"
                )
            if (self.judge_base_url or self.base_url) is None:
                raise ValueError("--suite mtbench with --rescore needs --judge-base-url")


@dataclass
class BenchReport:
    """What a run produced: per-model results, run metadata, the files written and request counts."""

    results: dict[str, SuiteResult]
    meta: dict[str, Any]
    paths: dict[str, Path]
    requests: int = 0  # chat requests sent (retries included), models and judge together
    cache_hits: int = 0


def _is_transient(error: Exception) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return False


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
        backoff_s: float = 1.0,
        cache: ResponseCache | None = None,
        cache_scope: str | None = None,
    ) -> None:
        import openai

        self.base_url = base_url.rstrip("/")
        # Cache keys name the endpoint by its URL, or by a scope that stands for the same models anywhere.
        self.cache_scope = cache_scope if cache_scope is not None else self.base_url
        # The SDK's own retries are off: this class retries, so tests can count every attempt.
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0
        )
        self.semaphore = asyncio.Semaphore(concurrency)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.cache = cache
        self.requests = 0
        self.cache_hits = 0

    async def close(self) -> None:
        await self.client.close()

    async def list_models(self) -> list[dict[str, Any]]:
        """GET /v1/models, failing fast (no retries on connection errors) with what to check."""
        import openai

        try:
            page = await self._with_retries(self.client.models.list, retry_connection_errors=False)
        except openai.APIConnectionError as err:
            raise BenchError(
                f"cannot reach the endpoint at {self.base_url} ({err.__cause__ or err}); is the server "
                "running, and does --base-url end with its API root (e.g. http://127.0.0.1:8000/v1)?"
            ) from err
        except openai.AuthenticationError as err:
            raise BenchError(f"{self.base_url} refused the API key (401); pass the right --api-key") from err
        except openai.APIStatusError as err:
            raise BenchError(
                f"GET {self.base_url}/models failed with HTTP {err.status_code}: {err.message}"
            ) from err
        return [model.model_dump() for model in page.data]

    async def check_models(self, wanted: Sequence[str], option: str = "--models") -> list[dict[str, Any]]:
        """The endpoint's model listing; raises BenchError naming any model in `wanted` it does not serve."""
        listing = await self.list_models()
        served = [str(model["id"]) for model in listing]
        missing = [name for name in wanted if name not in served]
        if missing:
            raise BenchError(
                f"{option}: {', '.join(missing)} not served at {self.base_url}; "
                f"it serves: {', '.join(served)}"
            )
        return listing

    async def _with_retries(self, call: Any, *, retry_connection_errors: bool = True) -> Any:
        import openai

        for attempt in range(1, self.max_attempts + 1):
            try:
                return await call()
            except openai.APIError as err:
                if not _is_transient(err) or attempt == self.max_attempts:
                    raise
                if isinstance(err, openai.APIConnectionError) and not retry_connection_errors:
                    raise
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.info(
                    "%s (attempt %d of %d); retrying in %.2fs", err, attempt, self.max_attempts, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

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

        async def create() -> Any:
            self.requests += 1
            return await self.client.chat.completions.create(
                model=model,
                messages=cast("list[ChatCompletionMessageParam]", messages),
                temperature=params.temperature,
                max_tokens=params.max_tokens,
                seed=params.seed if params.seed is not None else openai.omit,
            )

        try:
            async with self.semaphore:
                completion = await self._with_retries(create)
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
    from client.report import package_version, write_report

    started = datetime.now(UTC)
    cache = None
    if config.use_cache:
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
                backoff_s=config.backoff_s,
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
            await judge_runner.check_models([config.judge_model], option="--judge-model")
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
            models_listing = await model_runner.check_models(config.models)
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


def add_bench_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark models at an OpenAI-compatible endpoint (tasks, IFEval, reference outputs, MT-Bench)",
        description="Send a suite's prompts to every model in --models (the first is the baseline), score "
        "the replies and write OUT/results.json, OUT/report.md and OUT/report.png. Answers are cached under "
        "--cache-dir, so an interrupted run resumes where it stopped.",
    )
    parser.add_argument("--base-url", help="the endpoint's API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="bearer token for --base-url (default: EMPTY)")
    parser.add_argument("--models", default="", help="comma-separated model ids; the first is the baseline")
    parser.add_argument("--suite", required=True, choices=SUITE_NAMES)
    parser.add_argument(
        "--data",
        help="tasks: a test.jsonl from `python -m client tasks`; ifeval: JSONL or hub id such as "
        "google/IFEval (default: the 541 prompts shipped in the package); reference: .json/.jsonl or hub "
        "ID[:SPLIT] (the whole of it is the held-out set); mtbench: FastChat's data folder (default: the "
        "copy shipped in the package)",
    )
    parser.add_argument("--limit", type=int, help="only the first N items")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=256, help="per reply (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed sent with each request (default: 0)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)"
    )
    parser.add_argument("--cache-dir", type=Path, help="response cache directory (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the response cache")
    parser.add_argument(
        "--cache-scope",
        help="name the endpoint by this in cache keys instead of its URL, so answers of the same models "
        "served elsewhere (another port, a restarted server) are reused; give it only to unchanged models",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    parser.add_argument(
        "--max-attempts", type=int, default=5, help="tries per request on transient errors (default: 5)"
    )
    parser.add_argument("--judge-base-url", help="mtbench: the judge's endpoint (default: --base-url)")
    parser.add_argument("--judge-model", help="mtbench: the judge model's id")
    parser.add_argument("--judge-api-key", help="mtbench: bearer token for the judge (default: --api-key)")
    parser.add_argument(
        "--judge-max-tokens", type=int, default=2048, help="mtbench: per judgment (default: 2048)"
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="RESULTS_JSON",
        help="score the responses of an earlier results.json again, asking no model (a judge still answers)",
    )
    parser.set_defaults(run=_run_bench, parser=parser)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url,
        api_key=args.api_key,
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        suite=args.suite,
        data=args.data,
        limit=args.limit,
        concurrency=args.concurrency,
        sampling=SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed),
        out=args.out,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        cache_scope=args.cache_scope,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        judge_base_url=args.judge_base_url,
        judge_model=args.judge_model,
        judge_api_key=args.judge_api_key,
        judge_max_tokens=args.judge_max_tokens,
        rescore=args.rescore,
    )


def _run_bench(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    started = time.monotonic()
    try:
        report = asyncio.run(run_bench(config))
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{len(report.results)} model(s) on {config.suite} in {time.monotonic() - started:.0f}s: "
        f"{report.requests} request(s) sent, {report.cache_hits} answered from the cache"
    )
    for name, path in report.paths.items():
        print(f"{name}: {path}")
    return 0
