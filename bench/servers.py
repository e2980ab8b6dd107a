"""What the serving benchmarks share: the servers' commands and engine flags, and the load generators.

bench.serve_vs_vllm, bench.lora_scaling and bench.batch_invariance start servers and load them through these.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.fixtures import BASES, DEFAULT_BASE

log = logging.getLogger(__name__)

DEFAULT_WORK_DIR = Path("/tmp/bench-serve")
SERVED_BASE_NAME = BASES[DEFAULT_BASE].served_name
SERVERS = ("ours", "vllm")

# The figures compared, as (key in both tools' result JSON, label, higher is better).
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("output_throughput", "output tok/s", True),
    ("request_throughput", "req/s", True),
    ("median_ttft_ms", "TTFT p50 (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("median_tpot_ms", "TPOT p50 (ms)", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", False),
    ("api_cpu_ms_per_request", "API-process CPU ms/req", False),
)


@dataclass(frozen=True)
class EngineSettings:
    """Engine arguments given to both servers, under the flag names both of them take."""

    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_model_len: int = 512
    dtype: str = "float32"
    kv_cache_memory_bytes: int = 256 << 20
    enforce_eager: bool = True
    seed: int = 0

    def flags(self) -> list[str]:
        """`--max-loras 4 --max-lora-rank 16 ... --enforce-eager`: valid for `python -m serve` and vLLM."""
        out: list[str] = []
        for key, value in asdict(self).items():
            flag = "--" + key.replace("_", "-")
            if value is None or value is False:
                continue
            out += [flag] if value is True else [flag, str(value)]
        return out


def server_command(
    server: str,
    base: Path,
    port: int,
    engine: EngineSettings,
    adapters: Sequence[tuple[str, Path]],
    served_name: str = SERVED_BASE_NAME,
) -> list[str]:
    """The command of `server`, "ours" (`python -m serve`) or "vllm" (vLLM's OpenAI server), serving `base` as
    `served_name` with `adapters` (name, folder) on 127.0.0.1:`port`, with the same engine flags."""
    listen = ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    if server == "ours":
        command = [sys.executable, "-m", "serve", "--base-model", str(base), *listen]
        for name, path in adapters:
            command += ["--lora", f"{name}={path}"]
    elif server == "vllm":
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), *listen]
        command += ["--enable-lora"]
        if adapters:
            command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    else:
        raise ValueError(f"unknown server {server!r}; choose from {', '.join(SERVERS)}")
    return command + engine.flags()


class RunningServer(Protocol):
    """What a measurement needs of a started server (the launcher's ServerProcess is one)."""

    url: str

    def cpu_seconds(self) -> float: ...


@dataclass(frozen=True)
class Load:
    num_prompts: int = 200
    input_len: int = 64
    output_len: int = 64
    seed: int = 0


def run_vllm_bench(
    url: str,
    base: Path,
    models: Sequence[str],
    concurrency: int,
    load: Load,
    out: Path,
    served_name: str = SERVED_BASE_NAME,
) -> dict[str, Any]:
    """vLLM's serving benchmark (random dataset, openai completions backend), in this process."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    # The served name as --model: the benchmark sends it to /tokenize, which (ours and vLLM's) knows no path.
    argv = ["--backend", "openai", "--base-url", url, "--model", served_name]
    argv += ["--served-model-name", served_name, "--tokenizer", str(base)]
    argv += ["--dataset-name", "random", "--random-input-len", str(load.input_len)]
    argv += ["--random-output-len", str(load.output_len), "--ignore-eos", "--seed", str(load.seed)]
    argv += ["--num-prompts", str(load.num_prompts), "--max-concurrency", str(concurrency)]
    argv += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    if models:
        argv += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    argv += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    argv += ["--disable-tqdm"]
    out.parent.mkdir(parents=True, exist_ok=True)
    main(parser.parse_args(argv))
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_client_load(
    url: str,
    base: Path,
    models: Sequence[str],
    concurrency: Sequence[int],
    load: Load,
    out: Path,
    served_name: str = SERVED_BASE_NAME,
) -> list[dict[str, Any]]:
    """Our `client load` (its Python API), all levels in one sweep; one metrics dict per level."""
    from client.load import LoadConfig, run_load, write_report

    config = LoadConfig(
        base_url=url,
        models=list(models) or [served_name],
        concurrency=list(concurrency),
        num_prompts=load.num_prompts,
        input_len=load.input_len,
        output_len=load.output_len,
        ignore_eos=True,
        seed=load.seed,
        tokenizer=str(base),
    )
    report = asyncio.run(run_load(config))
    write_report(report, out)
    failed = report.failed
    if failed:
        log.warning("client load: %d requests failed (see %s)", failed, out / "load.json")
    return [level.metrics.to_json() for level in report.levels]


def warm_up(url: str, base: Path, models: Sequence[str], out: Path, concurrency: int) -> None:
    """Before anything is timed: a request on every model (8 at least), so every adapter is loaded, then two
    rounds at the measured `concurrency`, so the engine has run batches of every size the load makes (the
    first measured run after a lighter warm-up was up to 20% slower than the same run later)."""
    small = Load(num_prompts=max(8, len(models)), input_len=64, output_len=16)
    run_client_load(url, base, models, [min(16, len(models))], small, out / "models")
    full = Load(num_prompts=2 * concurrency, input_len=64, output_len=16)
    run_client_load(url, base, models, [concurrency], full, out / "batches")


def figures(result: dict[str, Any]) -> dict[str, float]:
    """The compared metrics of one vLLM-bench result or one client-load level (the same keys)."""
    return {key: float(result[key]) for key, _, _ in METRICS if key in result} | {
        "completed": float(result.get("completed", 0)),
        "failed": float(result.get("failed", 0)),
    }


def per_request_ms(cpu_seconds: float, requests: float) -> float:
    """CPU milliseconds per completed request; NaN without requests."""
    return 1000 * cpu_seconds / requests if requests else float("nan")


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when theirs is 0 (nothing to compare with)."""
    return ours / theirs if theirs else float("nan")


def measure_cell(
    server: RunningServer,
    driver: str,
    level: int,
    base: Path,
    models: Sequence[str],
    load: Load,
    out: Path,
    served_name: str = SERVED_BASE_NAME,
) -> dict[str, float]:
    """One server's run of one (load generator, concurrency) cell: its figures and API CPU per request. The
    load generator's own output goes to `out` (vLLM's benchmark: a JSON file; `client load`: a folder)."""
    cpu_before = server.cpu_seconds()
    if driver == "vllm-bench":
        result = run_vllm_bench(server.url, base, models, level, load, out, served_name)
    else:
        (result,) = run_client_load(server.url, base, models, [level], load, out, served_name)
    values = figures(result)
    values["api_cpu_ms_per_request"] = per_request_ms(server.cpu_seconds() - cpu_before, values["completed"])
    return values


@dataclass(frozen=True)
class EngineSpec:
    """What bench.lora_scaling asks bench.lora_engine to measure, as JSON (`to_json`) for its process."""

    serve_args: list[str]  # `python -m serve` flags of the config's server
    mixes: list[int]
    rounds: int
    num_prompts: int
    concurrency: int
    input_len: int
    output_len: int
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> EngineSpec:
        return cls(**json.loads(text))
