"""Load benchmark of any OpenAI-compatible endpoint: fixed-concurrency sweeps over a mix of models/adapters.

Metrics are those of vLLM's serving benchmark (`vllm bench serve`), with its names and units, so the
figures compare.

How each figure maps to vLLM's (vllm/benchmarks/serve.py, lib/endpoint_request_func.py):
- A request starts when it gets a concurrency slot (vLLM's `start_time`) and is timed per streamed chunk.
  TTFT is the first token chunk; each later token chunk adds one gap to the ITL list; E2EL ends at the
  last token chunk (the trailing usage chunk carries no token). Completions: every chunk with choices is a
  token chunk, as in vLLM. Chat: only chunks whose delta carries text are; vLLM also counts the role-only
  opening chunk, which adds a near-zero gap to ITL and is left out here.
- Output tokens come from the stream's usage (`completion_tokens`), else from the token-chunk count;
  prompt tokens from usage, else from the prompt generator.
- Over successful requests only: TPOT = (E2EL - TTFT) / (output_tokens - 1), requests with one output
  token left out; ITL pools every gap of every request; mean, median, std (population) and the p90/p99
  percentiles are numpy's (linear interpolation) in ms, 0 when there is no value, exactly as vLLM.
- duration runs from the first request sent to the last one answered; request, output-token and
  total-token throughput divide completed requests, output tokens and input + output tokens by it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, cast

from pydantic import Field, field_validator
from pydantic_settings import CliSuppress

from client.cli import Commands, CommandSettings, add_command
from client.endpoint import EndpointError, served_models
from tuneserve import package_version

if TYPE_CHECKING:
    from openai import AsyncOpenAI

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]
PERCENTILES = (90, 99)  # reported as p90_*/p99_*; p50 is vLLM's median_*
LATENCY_METRICS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}

# Short words that most BPE vocabularies hold as one token (with the leading space), so a prompt of
# L of them is about L tokens when no tokenizer is given; the usage block reports the real count.
_COMMON_WORDS = (
    "the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "was", "at", "by", "it",
    "from", "be", "this", "an", "are", "or", "have", "not", "but", "they", "which", "one", "you", "all",
    "were", "we", "when", "there", "can", "more", "has", "their", "if", "will", "out", "so", "up", "what",
    "about", "who", "time", "people", "year", "new", "would", "first", "like", "other", "into", "some",
    "them", "than", "only", "two", "over", "also", "after", "make", "most", "made", "back", "work", "life",
    "day", "way", "world", "home", "water", "city", "room", "book", "light", "road", "house", "game",
    "music", "family", "money", "night", "school", "story", "small", "long", "great", "little", "good",
    "old", "right", "big", "high", "large", "next", "early", "young", "few", "public", "same", "able",
)  # fmt: skip


class LoadError(Exception):
    """The benchmark cannot start: its tokenizer does not load (the endpoint's faults are EndpointError)."""


# ----- configuration and results -----------------------------------------------------------------


class LoadConfig(CommandSettings):
    """One sweep: the same prompts at each concurrency level, requests spread round-robin over models."""

    base_url: str = Field(description="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    api_key: str | None = Field(None, description="bearer key, else $OPENAI_API_KEY")
    models: list[str] = Field(min_length=1, description="comma-separated model or adapter names")
    concurrency: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 8, 32], min_length=1, description="comma-separated levels"
    )
    num_prompts: int = Field(100, ge=1, description="requests per level")
    input_len: int = Field(256, ge=1, description="prompt tokens")
    output_len: int = Field(128, ge=1, description="max_tokens")
    ignore_eos: bool = Field(False, description="generate exactly --output-len tokens (vLLM extension)")
    # vLLM's default backend; input lengths are exact only here
    endpoint: Endpoint = Field("completions", description="API to load")
    seed: int = Field(0, description="prompt seed")
    tokenizer: str | None = Field(
        None,
        description="tokenizer path or hub id for exact input lengths (vLLM's random prompts); "
        "without it, prompts are common words, about --input-len tokens",
    )
    out: Path | None = Field(None, description="directory for load.json, load.md and load.png")
    timeout_s: CliSuppress[float] = Field(600.0, gt=0)  # per request

    @field_validator("base_url")
    @classmethod
    def _server_root(cls, url: str) -> str:
        url = url.rstrip("/").removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url

    @field_validator("models")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        names = [name.strip() for name in models if name.strip()]
        if not names:
            raise ValueError("must name at least one model")
        return names

    def public_args(self) -> dict[str, Any]:
        """The settings as written to load.json: everything but the API key and the output folder."""
        return self.model_dump(mode="json", exclude={"api_key", "out"})


@dataclass(frozen=True)
class Prompt:
    text: str
    num_tokens: int  # exact with a tokenizer (vLLM's prompt_len); the word count otherwise


@dataclass
class RequestResult:
    """What one streamed request measured (vLLM's RequestFuncOutput); times in seconds."""

    model: str
    prompt_tokens: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL: request sent -> last token chunk
    start_time: float = 0.0  # perf_counter when the request was sent
    error: str = ""


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric in ms, as vLLM reports it."""

    mean: float
    median: float
    std: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        import numpy as np

        # vLLM summarises `values or 0`: an empty list reads as all zeros.
        data = np.asarray(values if values else [0.0], dtype=float) * 1000
        p90, p99 = (float(np.percentile(data, p)) for p in PERCENTILES)
        return cls(float(np.mean(data)), float(np.median(data)), float(np.std(data)), p90, p99)


@dataclass(frozen=True)
class LevelMetrics:
    """vLLM's BenchmarkMetrics for one concurrency level."""

    max_concurrency: int
    duration: float  # s
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # req/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # tok/s
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution

    def to_json(self) -> dict[str, Any]:
        """Flat, with vLLM's result keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms, ..."""
        out: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "max_concurrency",
                "duration",
                "completed",
                "failed",
                "total_input_tokens",
                "total_output_tokens",
                "request_throughput",
                "output_throughput",
                "total_token_throughput",
            )
        }
        for metric in LATENCY_METRICS:
            dist: Distribution = getattr(self, metric)
            out[f"mean_{metric}_ms"] = dist.mean
            out[f"median_{metric}_ms"] = dist.median
            out[f"std_{metric}_ms"] = dist.std
            out[f"p90_{metric}_ms"] = dist.p90
            out[f"p99_{metric}_ms"] = dist.p99
        return out


@dataclass
class LevelResult:
    metrics: LevelMetrics
    requests: list[RequestResult]

    def to_json(self) -> dict[str, Any]:
        """The metrics plus vLLM's per-request lists (seconds), and the model each request went to."""
        return {
            **self.metrics.to_json(),
            "input_lens": [r.prompt_tokens for r in self.requests],
            "output_lens": [r.output_tokens if r.success else 0 for r in self.requests],
            "ttfts": [r.ttft for r in self.requests],
            "itls": [r.itl for r in self.requests],
            "latencies": [r.latency for r in self.requests],
            "errors": [r.error for r in self.requests],
            "models": [r.model for r in self.requests],
        }


@dataclass
class LoadReport:
    config: LoadConfig
    served_models: list[str]  # the ids GET /v1/models listed
    date: str
    version: str  # tuneserve's
    levels: list[LevelResult]

    @property
    def failed(self) -> int:
        return sum(level.metrics.failed for level in self.levels)

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "tuneserve_version": self.version,
            "backend": "openai-chat" if self.config.endpoint == "chat" else "openai",  # vLLM's name
            "base_url": self.config.base_url,
            "models": self.config.models,
            "served_models": self.served_models,
            "tokenizer_id": self.config.tokenizer,
            "num_prompts": self.config.num_prompts,
            "args": self.config.public_args(),
            "levels": [level.to_json() for level in self.levels],
        }


# ----- metrics ---------------------------------------------------------------------------------------


def compute_metrics(requests: Sequence[RequestResult], duration: float, max_concurrency: int) -> LevelMetrics:
    """vLLM's calculate_metrics over one level's requests; failed requests count only as failed."""
    done = [r for r in requests if r.success]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return LevelMetrics(
        max_concurrency=max_concurrency,
        duration=duration,
        completed=len(done),
        failed=len(requests) - len(done),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(done) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        ttft=Distribution.of_seconds([r.ttft for r in done]),
        tpot=Distribution.of_seconds(tpots),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itl]),
        e2el=Distribution.of_seconds([r.latency for r in done]),
    )


# ----- prompts ---------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the prompt generator uses."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def num_special_tokens_to_add(self) -> int: ...


def random_token_prompts(tokenizer: Tokenizer, num_prompts: int, input_len: int, seed: int) -> list[Prompt]:
    """vLLM's RandomDataset (range ratio 0, no prefix): for the same tokenizer and seed, the same prompts.

    Prompt i is the run of non-special token ids starting at a random offset + i, decoded to text, then
    re-encoded and trimmed or topped up with random ids until it encodes to input_len tokens (less the
    special tokens the tokenizer adds, so the server counts input_len).
    """
    import numpy as np

    length = input_len - int(tokenizer.num_special_tokens_to_add())
    if length < 1:
        raise ValueError(f"input_len {input_len} leaves no room next to the tokenizer's special tokens")
    rng = np.random.default_rng(seed)
    # vLLM draws input lengths, output lengths, then offsets from one generator; with fixed lengths the
    # first two draws are constants but still advance it, so make them too to get vLLM's offsets.
    rng.integers(length, length + 1, size=num_prompts)
    rng.integers(1, 2, size=num_prompts)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num_prompts)
    allowed = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.all_special_ids)
    prompts = []
    for index, offset in enumerate(offsets):
        ids = allowed[(int(offset) + index + np.arange(length)) % len(allowed)].tolist()
        text, ids = _decode_to_length(tokenizer, ids, length, rng)
        prompts.append(Prompt(text=text, num_tokens=len(ids)))
    missed = sum(prompt.num_tokens != length for prompt in prompts)
    if missed:
        # vLLM accepts these too: some id runs re-encode to a length that the adjustment cannot reach.
        logger.warning("%d of %d prompts encode to other than %d tokens", missed, num_prompts, length)
    return prompts


def _decode_to_length(tokenizer: Tokenizer, ids: list[int], length: int, rng: Any) -> tuple[str, list[int]]:
    """vLLM's gen_prompt_decode_to_target_len: decode, re-encode, adjust; at most 10 adjustments."""
    for attempt in range(11):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length or attempt == 10:
            break
        if len(ids) < length:
            ids += rng.integers(0, tokenizer.vocab_size, size=length - len(ids)).tolist()
        else:
            ids = ids[:length]
    return text, ids


def random_word_prompts(num_prompts: int, input_len: int, seed: int) -> list[Prompt]:
    """Prompts of input_len random common English words: about input_len tokens with most tokenizers."""
    rng = random.Random(seed)
    return [
        Prompt(text=" ".join(rng.choices(_COMMON_WORDS, k=input_len)), num_tokens=input_len)
        for _ in range(num_prompts)
    ]


def make_prompts(config: LoadConfig) -> list[Prompt]:
    if config.tokenizer is None:
        return random_word_prompts(config.num_prompts, config.input_len, config.seed)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    except (OSError, ValueError) as error:
        raise LoadError(f"--tokenizer {config.tokenizer!r} could not be loaded: {error}") from error
    return random_token_prompts(cast(Tokenizer, tokenizer), config.num_prompts, config.input_len, config.seed)


# ----- requests ---------------------------------------------------------------------------------------


async def send_request(client: AsyncOpenAI, config: LoadConfig, prompt: Prompt, model: str) -> RequestResult:
    """Stream one request and time its chunks; any error ends it as a failure that keeps the message."""
    result = RequestResult(model=model, prompt_tokens=prompt.num_tokens)
    extra_body = {"ignore_eos": True} if config.ignore_eos else None
    token_chunks = 0
    usage_tokens = 0
    result.start_time = last = time.perf_counter()
    try:
        if config.endpoint == "chat":
            stream: Any = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt.text}],
                max_tokens=config.output_len,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra_body,
            )
        else:
            stream = await client.completions.create(
                model=model,
                prompt=prompt.text,
                max_tokens=config.output_len,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra_body,
            )
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and _carries_token(chunk.choices[0], config.endpoint):
                    if token_chunks == 0:
                        result.ttft = now - result.start_time
                    else:
                        result.itl.append(now - last)
                    last = now
                    token_chunks += 1
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                    result.prompt_tokens = chunk.usage.prompt_tokens
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    if token_chunks == 0:
        result.error = "the stream ended without a token chunk"
        return result
    result.success = True
    result.latency = last - result.start_time
    result.output_tokens = usage_tokens or token_chunks
    return result


def _carries_token(choice: Any, endpoint: Endpoint) -> bool:
    if endpoint == "completions":
        return True
    delta = choice.delta
    return bool(
        delta.content or getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
    )


async def run_level(
    client: AsyncOpenAI, config: LoadConfig, prompts: Sequence[Prompt], max_concurrency: int
) -> LevelResult:
    """Send every prompt, at most max_concurrency in flight, request i to model i mod len(models)."""
    from tqdm import tqdm

    slots = asyncio.Semaphore(max_concurrency)
    progress = tqdm(total=len(prompts), desc=f"concurrency {max_concurrency}", unit="req")

    async def limited(index: int, prompt: Prompt) -> RequestResult:
        async with slots:
            result = await send_request(client, config, prompt, config.models[index % len(config.models)])
        progress.update(1)
        return result

    start = time.perf_counter()
    try:
        requests = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
    finally:
        progress.close()
    duration = time.perf_counter() - start
    return LevelResult(compute_metrics(requests, duration, max_concurrency), list(requests))


async def run_load(config: LoadConfig, on_level: Callable[[LevelResult], None] | None = None) -> LoadReport:
    """Check the endpoint, then run the sweep; on_level sees each level as it finishes."""
    from openai import AsyncOpenAI

    date = datetime.now().astimezone().isoformat(timespec="seconds")
    async with AsyncOpenAI(
        base_url=f"{config.base_url}/v1",
        api_key=config.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        max_retries=0,  # a retry would hide a failure and stretch the latency it measures
        timeout=config.timeout_s,
    ) as client:
        served = [str(model["id"]) for model in await served_models(client, config.models)]
        prompts = make_prompts(config)
        levels = []
        for max_concurrency in config.concurrency:
            level = await run_level(client, config, prompts, max_concurrency)
            if on_level is not None:
                on_level(level)
            levels.append(level)
    return LoadReport(
        config=config, served_models=served, date=date, version=package_version(), levels=levels
    )


# ----- reports ---------------------------------------------------------------------------------------


def format_level(level: LevelResult) -> str:
    """vLLM's result block for one level, plus the first distinct errors."""
    m = level.metrics
    rows = [
        f"{f' Serving Benchmark Result (concurrency {m.max_concurrency}) ':=^60}",
        f"{'Successful requests:':<40} {m.completed}",
        f"{'Failed requests:':<40} {m.failed}",
        f"{'Maximum request concurrency:':<40} {m.max_concurrency}",
        f"{'Benchmark duration (s):':<40} {m.duration:.2f}",
        f"{'Total input tokens:':<40} {m.total_input_tokens}",
        f"{'Total generated tokens:':<40} {m.total_output_tokens}",
        f"{'Request throughput (req/s):':<40} {m.request_throughput:.2f}",
        f"{'Output token throughput (tok/s):':<40} {m.output_throughput:.2f}",
        f"{'Total token throughput (tok/s):':<40} {m.total_token_throughput:.2f}",
    ]
    for metric, header in LATENCY_METRICS.items():
        dist: Distribution = getattr(m, metric)
        name = metric.upper()
        rows.append(f"{header:-^60}")
        rows.append(f"{f'Mean {name} (ms):':<40} {dist.mean:.2f}")
        rows.append(f"{f'Median {name} (ms):':<40} {dist.median:.2f}")
        rows.append(f"{f'P90 {name} (ms):':<40} {dist.p90:.2f}")
        rows.append(f"{f'P99 {name} (ms):':<40} {dist.p99:.2f}")
    rows.append("=" * 60)
    errors = list(dict.fromkeys(r.error for r in level.requests if not r.success))
    rows += [f"error: {error}" for error in errors[:3]]
    return "\n".join(rows)


def format_markdown(report: LoadReport) -> str:
    config = report.config
    prompts = f"tokenizer {config.tokenizer!r}" if config.tokenizer else "approximate: common words"
    eos = " (ignore_eos)" if config.ignore_eos else ""
    lines = [
        "# Load benchmark",
        "",
        f"- endpoint: `{config.base_url}` ({config.endpoint}), {report.date}, tuneserve {report.version}",
        f"- models (round-robin): {', '.join(f'`{name}`' for name in config.models)}",
        f"- {config.num_prompts} prompts per level, input {config.input_len} tokens ({prompts}), "
        f"output {config.output_len} tokens{eos}, seed {config.seed}",
        "",
        "## Throughput",
        "",
        "| concurrency | completed | failed | duration (s) | req/s | output tok/s | total tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in report.levels:
        m = level.metrics
        lines.append(
            f"| {m.max_concurrency} | {m.completed} | {m.failed} | {m.duration:.2f} | "
            f"{m.request_throughput:.2f} | {m.output_throughput:.1f} | {m.total_token_throughput:.1f} |"
        )
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| concurrency | metric | mean | median | p90 | p99 | std |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for level in report.levels:
        for metric in LATENCY_METRICS:
            d: Distribution = getattr(level.metrics, metric)
            lines.append(
                f"| {level.metrics.max_concurrency} | {metric.upper()} | {d.mean:.2f} | {d.median:.2f} | "
                f"{d.p90:.2f} | {d.p99:.2f} | {d.std:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: LoadReport, path: Path) -> None:
    """Throughput, and TTFT/TPOT p50 and p99, against concurrency."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = [level.metrics for level in report.levels]
    x = [m.max_concurrency for m in levels]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    throughput, latency = figure.subplots(1, 2)
    throughput.plot(x, [m.output_throughput for m in levels], "o-", label="output tokens/s")
    throughput.plot(x, [m.total_token_throughput for m in levels], "s--", label="total tokens/s")
    throughput.set_ylabel("tokens/s")
    throughput.set_title("Throughput")
    for metric, color in (("ttft", "tab:blue"), ("tpot", "tab:orange")):
        dists: list[Distribution] = [getattr(m, metric) for m in levels]
        latency.plot(x, [d.median for d in dists], "o-", color=color, label=f"{metric.upper()} p50")
        latency.plot(x, [d.p99 for d in dists], "^--", color=color, label=f"{metric.upper()} p99")
    latency.set_ylabel("ms")
    latency.set_title("Latency")
    for axes in (throughput, latency):
        if len(set(x)) > 1 and max(x) / min(x) >= 4:
            axes.set_xscale("log", base=2)
        axes.set_xticks(x, [str(level) for level in x])
        axes.set_xlabel("concurrency (requests in flight)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{report.config.base_url}: {', '.join(report.config.models)}")
    figure.savefig(path, dpi=120)


def write_report(report: LoadReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "load.json", "md": out / "load.md", "png": out / "load.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    paths["md"].write_text(format_markdown(report))
    plot_report(report, paths["png"])
    return paths


# ----- command line ----------------------------------------------------------------------------------


def add_load_command(commands: Commands) -> None:
    add_command(
        commands,
        "load",
        LoadConfig,
        _run_load_command,
        help="load-test an OpenAI-compatible endpoint (vLLM's serving-benchmark metrics)",
        description="Send random prompts round-robin over --models at each --concurrency level and report "
        "throughput, TTFT, TPOT, ITL and end-to-end latency as vLLM's serving benchmark defines them.",
    )


def _run_load_command(config: LoadConfig) -> int:
    try:
        report = asyncio.run(run_load(config, on_level=lambda level: print(format_level(level), flush=True)))
    except (LoadError, EndpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_markdown(report))
    if config.out is not None:
        for path in write_report(report, config.out).values():
            print(f"wrote {path}")
    if report.failed:
        sent = sum(len(level.requests) for level in report.levels)
        print(f"error: {report.failed} of {sent} requests failed (first errors above)", file=sys.stderr)
        return 1
    return 0
