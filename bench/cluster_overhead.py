"""What Ray Serve's proxy and our ingress cost: `python -m serve.cluster --replicas 1` against the plain
`python -m serve`, same engine, adapters and load.

`python -m bench.cluster_overhead [--quick]`; what its figures mean is the prose after its section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    add_load_options,
    add_run_options,
    int_list,
    mean_of_rounds,
    start_run,
    write_json,
)
from bench.fixtures import BASES, DEFAULT_BASE, make_adapters
from bench.report import header_markdown, publish_section
from bench.serve_vs_vllm import load_average, schedule
from bench.servers import DEFAULT_WORK_DIR, EngineSettings, Load, measure_cell, ratio, server_command, warm_up
from pipeline.launch import ServerProcess, free_port, running
from tuneserve.tables import markdown_table

NAME = "cluster_overhead"
SIDES = ("plain", "cluster")
SIDE_LABELS = {"plain": "`python -m serve`", "cluster": "`python -m serve.cluster --replicas 1`"}
DRIVER = "client-load"
# (key in the load's result, label, decimals); CPU is the whole process tree's: the cluster's Ray processes
# (controller, proxy, ingress, replica) are children of its command, as the plain server's engine core is.
FIGURES = (
    ("output_throughput", "output tok/s", 0),
    ("median_ttft_ms", "TTFT p50 (ms)", 1),
    ("p99_ttft_ms", "TTFT p99 (ms)", 1),
    ("median_tpot_ms", "TPOT p50 (ms)", 2),
    ("api_cpu_ms_per_request", "CPU ms/req, all processes", 1),
)


@dataclass
class WholeTree:
    """A running server whose CPU time counts every process under it."""

    url: str
    server: ServerProcess

    def cpu_seconds(self) -> float:
        return self.server.tree_cpu_seconds()


def cluster_command(
    base: Path, port: int, engine: EngineSettings, adapters: Sequence[tuple[str, Path]], served_name: str
) -> list[str]:
    """`python -m serve.cluster --replicas 1` with the plain server's flags; it starts its own local Ray."""
    plain = server_command("ours", base, port, engine, adapters, served_name)
    return [sys.executable, "-m", "serve.cluster", "--replicas", "1", *plain[3:]]


def measure(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    bench_base = BASES[DEFAULT_BASE]
    base = bench_base.build()
    paths = make_adapters(base, args.adapters, root=bench_base.adapters_root())
    adapters = [(f"a{index}", path) for index, path in enumerate(paths)]
    models = [name for name, _ in adapters]
    engine = EngineSettings(max_loras=args.max_loras, **bench_base.engine_kwargs())
    load = Load(input_len=args.input_len, output_len=args.output_len)
    prompts = dict(zip(args.concurrency, args.num_prompts, strict=True))
    servers: dict[str, ServerProcess] = {}
    for side in SIDES:
        port = free_port()
        if side == "cluster":
            command = cluster_command(base, port, engine, adapters, bench_base.served_name)
        else:
            command = server_command("ours", base, port, engine, adapters, bench_base.served_name)
        servers[side] = ServerProcess(
            side, command, f"http://127.0.0.1:{port}", work_dir / f"{side}-server.log", cwd=REPO_ROOT
        )
    measured: dict[tuple[int, str], list[dict[str, float]]] = {}
    loads: dict[str, list[float]] = {side: [] for side in SIDES}
    with contextlib.ExitStack() as stack:
        for side, server in servers.items():  # one after the other: start-up is CPU-heavy
            stack.enter_context(running(server))
            warm_up(server.url, base, models, work_dir / f"{side}-warmup", max(args.concurrency))
        cells = [(DRIVER, level) for level in args.concurrency]
        for (_, level), side in schedule(cells, list(SIDES), args.rounds):
            loads[side].append(load_average())
            out = work_dir / "load" / f"{side}-c{level}"  # per-request detail: results.json has the figures
            level_load = replace(load, num_prompts=prompts[level])
            values = measure_cell(
                WholeTree(servers[side].url, servers[side]),
                DRIVER,
                level,
                base,
                models,
                level_load,
                out,
                bench_base.served_name,
            )
            measured.setdefault((level, side), []).append(values)
            time.sleep(1)
    cells_out = {
        str(level): {side: mean_of_rounds(measured[level, side]) for side in SIDES}
        for level in args.concurrency
    }
    return {
        "engine": asdict(engine),
        "load": asdict(load),
        "prompts_per_level": {str(level): count for level, count in prompts.items()},
        "adapters": len(adapters),
        "rounds": args.rounds,
        "concurrency": list(args.concurrency),
        "commands": {side: shlex.join(server.command) for side, server in servers.items()},
        "startup_s": {side: server.startup_s for side, server in servers.items()},
        "loadavg_1m": loads,
        "cells": cells_out,
    }


def section_markdown(header: dict[str, Any], document: dict[str, Any]) -> str:
    engine, load = document["engine"], document["load"]
    rows = []
    for level, sides in document["cells"].items():
        for side in SIDES:
            values = sides[side]
            failed = f" ({values['failed']:.0f} failed)" if values.get("failed") else ""
            cells = [f"{values.get(key, float('nan')):.{digits}f}" for key, _, digits in FIGURES]
            rows.append([level, SIDE_LABELS[side] + failed, *cells])
        ratios = [ratio(sides["cluster"][key], sides["plain"][key]) for key, _, _ in FIGURES]
        rows.append([level, "ratio cluster/plain", *(f"**{value:.2f}**" for value in ratios)])
    header_row = ["concurrency", "server", *(label for _, label, _ in FIGURES)]
    flags = " ".join(EngineSettings(**engine).flags())
    prompts = ", ".join(f"{count} at C={level}" for level, count in document["prompts_per_level"].items())
    lines = ["## Ray Serve cluster overhead: one replica behind the proxy vs the plain server", ""]
    lines += header_markdown(header)
    lines += [
        f"- model: {BASES[DEFAULT_BASE].description}, with {document['adapters']} random LoRA adapters, "
        "requests round-robin over them",
        f"- engine arguments, identical on both: `--enable-lora {flags}`; "
        "the cluster started its own local Ray (all CPUs), its one replica reserving 1",
        f"- load: our `client load`, streamed `/v1/completions`, random-token prompts ({prompts}), "
        f"{load['input_len']} tokens in, {load['output_len']} out (`ignore_eos`), after a warm-up; both up "
        f"together, taking turns (ABBA), {document['rounds']} rounds, figures the mean",
        f"- start-up to the first healthy answer: plain {document['startup_s']['plain']:.0f} s, cluster "
        f"{document['startup_s']['cluster']:.0f} s",
        "",
        *markdown_table(header_row, rows, "ll" + "r" * len(FIGURES)),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster_overhead",
        description="`python -m serve.cluster --replicas 1` against `python -m serve`: same engine, adapters "
        "and load; writes bench/results/cluster_overhead/ and its section of BENCHMARKS.md.",
    )
    parser.add_argument(
        "--num-prompts",
        type=int_list,
        default=[48, 192],
        help="requests per --concurrency level, one count per level (default: 48,192)",
    )
    parser.add_argument(
        "--concurrency", type=int_list, default=[1, 32], help="concurrency levels (default: 1,32)"
    )
    add_load_options(
        parser, rounds=2, rounds_help="runs of each level on each side, order reversed each time"
    )
    parser.add_argument("--adapters", type=int, default=3, help="LoRA adapters served (default: 3)")
    parser.add_argument("--max-loras", type=int, default=4, help="engine LoRA slots (default: 4)")
    add_run_options(
        parser,
        quick="8 prompts per level, one round, results under --work-dir only",
        work_dir=DEFAULT_WORK_DIR,
        work_dir_help="server logs and warm-up output; --quick results too",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.num_prompts) != len(args.concurrency):
        parser.error("--num-prompts: give one count per --concurrency level")
    if args.quick:
        args.num_prompts = [min(count, 8) for count in args.num_prompts]
        args.rounds = 1
        args.no_markdown = True
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        publish_section(NAME, section_markdown(document["header"], document), write=not args.no_markdown)
        return 0
    header, work_dir, out_dir = start_run(
        "bench.cluster_overhead", argv, args.work_dir, NAME, scratch=args.quick
    )
    document = {"header": header, **measure(args, work_dir)}
    write_json(out_dir / "results.json", document)
    publish_section(NAME, section_markdown(header, document), write=not args.no_markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
