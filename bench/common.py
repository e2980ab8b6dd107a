"""What every benchmark shares to run: where results go, the run's header, the options they all take, and
the ABBA order and mean of repeated measurements. bench.report writes the results as markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tuneserve.machine import machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def results_dir(name: str) -> Path:
    """bench/results/NAME/: the benchmark's JSON, charts and logs (charts are linked from BENCHMARKS.md)."""
    path = RESULTS_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(
    module: str, argv: Sequence[str] | None, work_dir: Path, section: str, *, scratch: bool
) -> tuple[dict[str, Any], Path, Path]:
    """Logging on; the run's header (`python -m MODULE` and its exact arguments); its work folder, work_dir /
    section; and where its results go: bench/results/SECTION/, or under the work folder for a scratch run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = list(argv) if argv is not None else sys.argv[1:]
    header = run_header(f"python -m {module} {shlex.join(given)}".strip())
    work = work_dir / section
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "results" if scratch else results_dir(section)
    out_dir.mkdir(parents=True, exist_ok=True)
    return header, work, out_dir


def run_header(command: str) -> dict[str, Any]:
    """The exact command, the machine and the date: the first lines of every section."""
    date = datetime.now(UTC).isoformat(timespec="seconds")
    return {"command": command, "date": date, "machine": machine_info()}


T = TypeVar("T")


def turns(sides: Sequence[T], cell: int) -> list[T]:
    """The order the sides (servers, or bench.lora_scaling's mixes) take one cell's load in: as given for even
    cells, reversed for odd ones (ABBA), so that a steady drift of the machine's speed over the run weighs on
    all alike."""
    return list(sides) if cell % 2 == 0 else list(reversed(sides))


COUNTS = ("completed", "failed")


def mean_of_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, Any]:
    """One measurement from several rounds of it: the mean of each figure (request counts summed), and the
    rounds themselves under `rounds`."""
    row: dict[str, Any] = {
        key: sum(r[key] for r in rounds) / (1 if key in COUNTS else len(rounds)) for key in rounds[0]
    }
    row["rounds"] = list(rounds)
    return row


def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def int_list(text: str) -> list[int]:
    """`1,32` -> [1, 32]: the comma-separated counts options take."""
    return [int(part) for part in text.split(",")]


def add_load_options(parser: argparse.ArgumentParser, *, rounds: int, rounds_help: str) -> None:
    """--rounds, --input-len and --output-len: the load options of the serving benchmarks."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default: {rounds})")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: 64)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens, ignore_eos (default: 64)")


def add_run_options(
    parser: argparse.ArgumentParser, *, quick: str, work_dir: Path, work_dir_help: str
) -> None:
    """--quick, --work-dir, --no-markdown and --from-json: the options every serving benchmark takes."""
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}, BENCHMARKS.md untouched")
    parser.add_argument(
        "--work-dir", type=Path, default=work_dir, help=f"{work_dir_help} (default: {work_dir})"
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: redraw the chart and rewrite the section from a saved results.json",
    )
