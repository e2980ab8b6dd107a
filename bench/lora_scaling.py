"""Multi-LoRA scaling of our server: throughput and TTFT with requests on the base, 1, 4, 16 or 64 adapters.

`python -m bench.lora_scaling [--base tiny|smollm2] [--quick]`; one server per config, each mix a ratio to
base-only (with bench.lora_engine's engine-only side). BENCHMARKS.md says how it measures and what it found.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    add_load_options,
    add_run_options,
    int_list,
    mean_of_rounds,
    start_run,
    turns,
    write_json,
)
from bench.fixtures import BASES, DEFAULT_BASE, add_base_option, base_for_document, make_adapters
from bench.report import header_markdown, publish_section
from bench.servers import (
    DEFAULT_WORK_DIR,
    SERVED_BASE_NAME,
    EngineSettings,
    EngineSpec,
    Load,
    measure_cell,
    ratio,
    server_command,
    warm_up,
)
from pipeline.launch import ServerProcess, free_port, running, tail_lines
from tuneserve.tables import markdown_table

log = logging.getLogger("bench.lora_scaling")

NAME = "lora_scaling"
MIXES = (0, 1, 4, 16, 64)  # distinct adapters the requests spread over; 0 = the base only
# Configs compared: serve's defaults (16 slots, host cache = slots) with rank-16 adapters, and the same with
# rank-1 adapters, whose weights are the same share of the tiny base's (0.63%) as rank 16 is of Qwen2.5-7B's
# (0.62%, `lora_weight_share`); BENCHMARKS.md says what other slot counts and host caches did.
DEFAULT_CONFIGS = "default,default/r1"
# On SmolLM2 (30 layers, hidden 576) rank 16, what `finetune` trains, is 4.6% of its linear weights; rank 1
# (0.29%) is the nearest to the 0.62% rank 16 is of Qwen2.5-7B's among the ranks vLLM serves (rank 2 would
# be served at --max-lora-rank 8). 64 prompts per run and no 64-adapter mix: a run of 128 prompts at 32 in
# flight takes about a minute on 2 cores, and the whole bench stays near 20 minutes.
SMOLLM2_CONFIGS, SMOLLM2_MIXES, SMOLLM2_PROMPTS = "default,default/r1", (0, 1, 4, 16), 64
# Every mix is measured once per round, the mixes in forward order in even rounds and reversed in odd ones
# (bench.common.turns), and reported as the mean of its rounds: with an even number of rounds a steady
# drift of the machine's speed weighs on every mix alike. One round of 128 prompts is ~2.5 s of load per mix.
ROUNDS = 2
TARGET_MIX, TARGET_RATIO = 16, 0.8
CONFIG_COLUMN = (
    "server (adapter rank, engine slots)"  # the target: 16 adapters keep >= 0.8 of base throughput
)


@dataclass(frozen=True)
class SlotConfig:
    """`--max-loras` and `--max-cpu-loras` of one server run (None: the server's default), and the rank of its
    adapters (also its `--max-lora-rank`)."""

    max_loras: int | None = None
    max_cpu_loras: int | None = None
    rank: int = EngineSettings.max_lora_rank

    @classmethod
    def parse(cls, text: str) -> SlotConfig:
        """`default`, `M` or `M:C` (C may be `default`), optionally followed by `/rR` (adapter rank R)."""
        slots, _, rank_text = text.partition("/")
        if rank_text and not (rank_text.startswith("r") and rank_text[1:].isdigit()):
            raise ValueError(f"{text!r}: the rank is written /rR, e.g. default/r1")
        rank = int(rank_text[1:]) if rank_text else cls.rank
        if slots == "default":
            return cls(rank=rank)
        loras, _, cpu = slots.partition(":")
        return cls(int(loras), int(cpu) if cpu and cpu != "default" else None, rank)

    def resolved(self) -> tuple[int, int | None]:
        """(max_loras, max_cpu_loras) with serve's defaults filled in (max_cpu_loras None: vLLM's default,
        which is max_loras)."""
        from serve.settings import ServeSettings

        fields = ServeSettings.model_fields
        loras = self.max_loras if self.max_loras is not None else int(fields["max_loras"].default)
        cpu = self.max_cpu_loras if self.max_cpu_loras is not None else fields["max_cpu_loras"].default
        return loras, cpu

    def label(self) -> str:
        loras, cpu = self.resolved()
        default = " (serve's defaults)" if (loras, cpu) == SlotConfig().resolved() else ""
        cpu_text = str(cpu) if cpu is not None else f"{loras} (engine default)"
        return f"rank {self.rank}, --max-loras {loras} --max-cpu-loras {cpu_text}{default}"


def parse_configs(text: str) -> list[SlotConfig]:
    """--configs: comma-separated SlotConfig.parse texts (argparse shows a bad one's message)."""
    try:
        return [SlotConfig.parse(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def lora_weight_share(architecture: dict[str, Any], rank: int) -> float:
    """One all-linear LoRA adapter's weights as a share of the base's transformer linear weights (embeddings
    and lm_head left out) for a Llama/Qwen2-style `architecture` (config.json fields): in a decode step over N
    adapters, every layer reads about N times this share of its own weights on top."""
    hidden, inter = architecture["hidden_size"], architecture["intermediate_size"]
    heads = architecture["num_attention_heads"]
    head_dim = architecture.get("head_dim") or hidden // heads
    kv_heads = architecture.get("num_key_value_heads") or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [
        (hidden, q),
        (hidden, kv),
        (hidden, kv),
        (q, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    return rank * sum(i + o for i, o in shapes) / sum(i * o for i, o in shapes)


def mix_models(mix: int, adapters: Sequence[str], base_name: str = SERVED_BASE_NAME) -> list[str]:
    """The model names one mix's requests go to, round-robin: the base, or the first `mix` adapters."""
    if mix == 0:
        return [base_name]
    if mix > len(adapters):
        raise ValueError(f"mix of {mix} adapters, but only {len(adapters)} are served")
    return list(adapters[:mix])


def mix_label(mix: int) -> str:
    return "base only" if mix == 0 else f"{mix} adapter" + ("s" if mix > 1 else "")


def relative(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Each mix's throughput and TTFT p50 as a ratio to the base-only row (mix 0)."""
    if 0 not in rows:
        return {}
    keys = [key for key in ("output_throughput", "median_ttft_ms") if key in rows[0]]
    return {mix: {key: ratio(row[key], rows[0][key]) for key in keys} for mix, row in rows.items()}


def measure_config(config: SlotConfig, base: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bench_base = BASES[args.base]
    served_name = bench_base.served_name
    paths = make_adapters(base, max(args.mixes), rank=config.rank, root=bench_base.adapters_root())
    adapters = [(path.name, path) for path in paths]
    loras, cpu = config.resolved()
    engine = EngineSettings(
        max_loras=loras, max_cpu_loras=cpu, max_lora_rank=config.rank, **bench_base.engine_kwargs()
    )
    load = Load(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    port = free_port()
    tag = f"loras{loras}-cpu{cpu}-r{config.rank}"
    server = ServerProcess(
        name=f"ours {tag}",
        command=server_command("ours", base, port, engine, adapters, served_name),
        url=f"http://127.0.0.1:{port}",
        log_path=work / f"server-{tag}.log",
        cwd=REPO_ROOT,
    )
    names = [name for name, _ in adapters]
    measured: dict[int, list[dict[str, float]]] = {mix: [] for mix in args.mixes}
    with running(server):
        warm_up(server.url, base, [served_name, *names], work / f"warmup-{tag}", args.concurrency)
        for round_ in range(args.rounds):
            for mix in turns(args.mixes, round_):
                out = work / f"{tag}-mix{mix}-round{round_}"
                started = time.monotonic()
                models = mix_models(mix, names, served_name)
                row = measure_cell(
                    server, "client-load", args.concurrency, base, models, load, out, served_name
                )
                row["wall_s"] = time.monotonic() - started
                measured[mix].append(row)
                log.info(
                    "%s, round %d, %s: %.0f output tok/s",
                    tag,
                    round_ + 1,
                    mix_label(mix),
                    row["output_throughput"],
                )
    rows = {mix: mean_of_rounds(rounds) for mix, rounds in measured.items()}
    engine_only = None
    if args.engine:
        spec = EngineSpec(
            serve_args=server.command[3:],  # after `python -m serve`
            mixes=list(args.mixes),
            rounds=args.rounds,
            num_prompts=args.num_prompts,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
        )
        engine_only = measure_engine_only(spec, work / f"engine-{tag}")
    return {
        "label": config.label(),
        "max_loras": loras,
        "max_cpu_loras": cpu,
        "rank": config.rank,
        "lora_weight_share": lora_weight_share(json.loads((base / "config.json").read_text()), config.rank),
        "engine": asdict(engine),
        "server_command": shlex.join(server.command),
        "startup_s": server.startup_s,
        "rows": {str(mix): row for mix, row in rows.items()},
        "relative": {str(mix): values for mix, values in relative(rows).items()},
        "engine_only": engine_only,
    }


def measure_engine_only(spec: EngineSpec, work: Path, timeout: float = 1800) -> dict[str, Any]:
    """bench.lora_engine in its own process (the server of this config stopped): its rows and their ratios
    to base-only."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / "spec.json", work / "result.json", work / "engine.log"
    spec_path.write_text(spec.to_json())
    command = [sys.executable, "-m", "bench.lora_engine", str(spec_path), str(out_path)]
    log.info("engine only: %s (log %s)", shlex.join(command), log_path)
    with log_path.open("wb") as handle:
        done = subprocess.run(
            command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        )
    if done.returncode != 0:
        raise RuntimeError(f"bench.lora_engine exited with {done.returncode}:\n{tail_lines(log_path)}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    rows = {int(mix): row for mix, row in result["rows"].items()}
    result["relative"] = {str(mix): values for mix, values in relative(rows).items()}
    return result


def table(runs: Sequence[dict[str, Any]]) -> list[str]:
    rows = []
    for run in runs:
        for mix_key, row in run["rows"].items():
            rel = run["relative"].get(mix_key, {})
            failed = f" ({row['failed']:.0f} failed)" if row["failed"] else ""
            per_round = ", ".join(f"{r['output_throughput']:.0f}" for r in row.get("rounds", [row]))
            rows.append(
                [
                    f"`{run['label']}`",
                    mix_label(int(mix_key)) + failed,
                    f"{row['output_throughput']:.0f}",
                    f"**{rel.get('output_throughput', float('nan')):.2f}**",
                    per_round,
                    f"{row['request_throughput']:.2f}",
                    f"{row['median_ttft_ms']:.0f}",
                    f"{rel.get('median_ttft_ms', float('nan')):.2f}",
                    f"{row['p99_ttft_ms']:.0f}",
                    f"{row['median_tpot_ms']:.2f}",
                    f"{row['api_cpu_ms_per_request']:.2f}",
                ]
            )
    header = [CONFIG_COLUMN, "requests on", "output tok/s", "x base", "tok/s per round", "req/s"]
    header += ["TTFT p50 (ms)", "x base", "TTFT p99 (ms)", "TPOT p50 (ms)", "API CPU ms/req"]
    return markdown_table(header, rows, "ll" + "r" * 9)


def engine_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The engine-only side (bench.lora_engine) beside the served ratios; empty when no run has it."""
    rows = []
    for run in runs:
        engine = run.get("engine_only")
        if not engine:
            continue
        for mix_key, row in engine["rows"].items():
            rel = engine["relative"].get(mix_key, {}).get("output_throughput", float("nan"))
            served = run["relative"].get(mix_key, {}).get("output_throughput", float("nan"))
            per_round = ", ".join(f"{value:.0f}" for value in row["rounds"])
            rows.append(
                [
                    f"`{run['label']}`",
                    mix_label(int(mix_key)),
                    f"{row['output_throughput']:.0f}",
                    f"**{rel:.2f}**",
                    per_round,
                    f"{served:.2f}",
                ]
            )
    header = [CONFIG_COLUMN, "requests on", "engine-only tok/s", "x base, engine only", "tok/s per round"]
    return markdown_table([*header, "x base, served"], rows, "llrrrr") if rows else []


def engine_section(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The engine-only table with its introduction, and a blank line; nothing when no run has it."""
    rows = engine_table(runs)
    if not rows:
        return []
    intro = "Engine only (`bench.lora_engine`): the same mixes on vLLM's offline engine, without the server."
    return [intro, "", *rows, ""]


def plot(runs: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput and TTFT p50 relative to base-only, against the number of adapters, one line per config
    (served, and dashed the engine-only throughput)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    throughput, ttft = figure.subplots(1, 2)
    for run in runs:
        points = {int(key): values for key, values in run["relative"].items()}
        labels = [mix_label(mix).replace(" adapters", "").replace(" adapter", "") for mix in points]
        xs = list(range(len(points)))
        label = (
            f"rank {run.get('rank', 16)}, max_loras {run['max_loras']}, "
            f"max_cpu_loras {run['max_cpu_loras'] or run['max_loras']}"
        )
        (line,) = throughput.plot(xs, [v["output_throughput"] for v in points.values()], "o-", label=label)
        ttft.plot(xs, [v["median_ttft_ms"] for v in points.values()], "o-", label=label)
        engine = (run.get("engine_only") or {}).get("relative", {})
        if engine:
            throughput.plot(
                xs,
                [engine[str(mix)]["output_throughput"] for mix in points],
                "s--",
                color=line.get_color(),
                label=f"{label}, engine only",
            )
        for axes in (throughput, ttft):
            axes.set_xticks(xs, labels)
    throughput.axhline(TARGET_RATIO, color="tab:red", linestyle=":", label=f"target {TARGET_RATIO} at 16")
    throughput.set_title("Output-token throughput / base-only")
    ttft.set_title("TTFT p50 / base-only")
    for axes in (throughput, ttft):
        axes.set_xlabel("distinct adapters the requests spread over")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", framealpha=0.7)
    figure.suptitle(f"Our server, {title}, 64 in / 64 out, fixed concurrency")
    figure.savefig(path, dpi=120)


def interpretation(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The target check for each config, from the data."""
    lines = []
    for run in runs:
        rel = run["relative"].get(str(TARGET_MIX))
        if rel is None:
            continue
        kept = rel["output_throughput"]
        status = "meets" if kept >= TARGET_RATIO else "misses"
        one = run["relative"].get("1", {}).get("output_throughput")
        versus_one = f"; {kept / one:.2f} of the 1-adapter throughput" if one else ""
        base_rounds = [r["output_throughput"] for r in run["rows"]["0"].get("rounds", [])]
        drift = (
            " Base-only throughput per round: "
            + ", ".join(f"{value:.0f}" for value in base_rounds)
            + f" (last / first {ratio(base_rounds[-1], base_rounds[0]):.2f}: the machine's drift and noise)."
            if len(base_rounds) > 1
            else ""
        )
        share = run.get("lora_weight_share")
        weights = (
            f" Each adapter's weights are {100 * share:.2f}% of the base's linear weights, so a step over "
            f"{TARGET_MIX} adapters reads {100 * TARGET_MIX * share:.0f}% of them again in LoRA weights."
            if share is not None
            else ""
        )
        engine_rel = (run.get("engine_only") or {}).get("relative", {}).get(str(TARGET_MIX))
        engine = ""
        if engine_rel is not None:
            engine_kept = engine_rel["output_throughput"]
            engine_status = "meets" if engine_kept >= TARGET_RATIO else "misses"
            engine = (
                f" Engine only (offline, no HTTP): {engine_kept:.2f} of base ({engine_status} the target)."
            )
        lines.append(
            f"- `{run['label']}`: {TARGET_MIX} adapters keep {kept:.2f} of base throughput ({status} the "
            f"target {TARGET_RATIO}){versus_one}.{engine}{weights}{drift}"
        )
    return lines


def section_markdown(header: dict[str, Any], document: dict[str, Any], chart: str) -> str:
    load, runs = document["load"], document["runs"]
    bench_base = base_for_document(document)
    engine = runs[0]["engine"]
    on = "" if bench_base.name == DEFAULT_BASE else f" on {bench_base.title}"
    lines = [f"## Multi-LoRA scaling{on}", "", *header_markdown(header)]
    lines += [
        f"- model: {bench_base.description}, with {document['adapters']} PEFT LoRA adapters (all linear "
        "layers, random weights, of the run's rank), all registered at start-up; other engine arguments "
        f"(`--max-lora-rank` = the adapters' rank, `--max-model-len {engine['max_model_len']} --dtype "
        f"{engine['dtype']} --kv-cache-memory-bytes {engine['kv_cache_memory_bytes']} --enforce-eager`)",
        f"- load (`client load`, streamed /v1/completions): {load['num_prompts']} prompts per mix and round, "
        f"{document.get('rounds', 1)} round(s) (mixes in forward, then reverse order), "
        f"{load['input_len']} tokens in, {load['output_len']} out (ignore_eos), concurrency "
        f"{document['concurrency']}, requests round-robin over the mix's models, after one warm-up request "
        "on every model",
        "",
        *table(runs),
        "",
        *engine_section(runs),
        f"![LoRA scaling]({chart})",
        "",
        *interpretation(runs),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lora_scaling",
        description="Throughput and TTFT of our server with requests on the base, on 1 adapter and spread "
        "over 4, 16 and 64 adapters, as ratios to base-only; writes bench/results/lora_scaling/ and the "
        "lora_scaling section of BENCHMARKS.md (lora_scaling-smollm2 with --base smollm2).",
    )
    add_base_option(parser)
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=None,
        help="comma-separated server configs, each `default` (serve's slots) or MAX_LORAS[:MAX_CPU_LORAS], "
        "then optionally /rRANK (adapter rank, default 16); "
        f"one server run each (default: {DEFAULT_CONFIGS}; on smollm2 {SMOLLM2_CONFIGS})",
    )
    parser.add_argument(
        "--mixes",
        type=int_list,
        default=None,
        help="comma-separated adapter counts, 0 = base only (default: 0,1,4,16,64; on smollm2 0,1,4,16)",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"requests per mix (default: 128; on smollm2 {SMOLLM2_PROMPTS})",
    )
    add_load_options(
        parser,
        rounds=ROUNDS,
        rounds_help="times each mix is measured, mixes in forward then reverse order; figures are the mean",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: 32)")
    parser.add_argument(
        "--no-engine",
        dest="engine",
        action="store_false",
        help="skip the engine-only side (bench.lora_engine: the same mixes on vLLM's offline engine)",
    )
    add_run_options(
        parser,
        quick="32 prompts per mix, results under --work-dir only",
        work_dir=DEFAULT_WORK_DIR,
        work_dir_help="logs and raw load output",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tiny = args.base == DEFAULT_BASE
    if args.configs is None:
        args.configs = parse_configs(DEFAULT_CONFIGS if tiny else SMOLLM2_CONFIGS)
    if args.mixes is None:
        args.mixes = list(MIXES if tiny else SMOLLM2_MIXES)
    if args.num_prompts is None:
        args.num_prompts = 128 if tiny else SMOLLM2_PROMPTS
    if args.quick:
        args.num_prompts = min(args.num_prompts, 32)
        args.no_markdown = True
    if 0 not in args.mixes:
        parser.error("--mixes must include 0 (base only): every figure is a ratio to it")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        return publish(document, args.from_json.parent, markdown=not args.no_markdown)
    section = BASES[args.base].section(NAME)
    header, work, out_dir = start_run("bench.lora_scaling", argv, args.work_dir, section, scratch=args.quick)
    base = BASES[args.base].build()
    runs = [measure_config(config, base, args, work) for config in args.configs]
    document = {
        "header": header,
        "base": args.base,
        "adapters": max(args.mixes),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "load": asdict(
            Load(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
        ),
        "runs": runs,
    }
    write_json(out_dir / "results.json", document)
    return publish(document, out_dir, markdown=not args.no_markdown)


def publish(document: dict[str, Any], out_dir: Path, *, markdown: bool) -> int:
    """Chart into out_dir, the section printed and (with markdown) written to BENCHMARKS.md."""
    bench_base = base_for_document(document)
    section = bench_base.section(NAME)
    plot(document["runs"], out_dir / "lora_scaling.png", bench_base.title)
    text = section_markdown(document["header"], document, f"bench/results/{section}/lora_scaling.png")
    publish_section(section, text, write=markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
