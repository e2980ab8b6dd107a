"""Command line of the benchmark client: `python -m client <command> ...`.

`bench` runs an instruction-following suite (ifeval, tasks, reference, mtbench) against models at any
OpenAI-compatible endpoint and reports them side by side; `score` scores existing IFEval responses
offline; `load` is the serving load benchmark (vLLM's metric definitions); `tasks` writes the generated
instruction-following suite (training data and held-out test items); `distill` makes constraint-following
training data from a model's own answers; `ifeval-subset` writes a fixed subset of IFEval; `catalog` prints
the names `tasks` and `distill` accept.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from client.bench import add_bench_command
from client.catalog import add_catalog_command
from client.distill import add_distill_command
from client.ifeval.cli import add_score_command, add_subset_command
from client.load import add_load_command
from client.tasks import FAMILIES, GROUPS, write_task_data


def _add_tasks_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "tasks",
        help="write the generated instruction-following suite (train.jsonl and test.jsonl)",
        description="Write OUT/train.jsonl (chat records for fine-tuning) and OUT/test.jsonl (held-out "
        "items with their checks, for `bench --suite tasks`).",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory to write into (created if missing)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--families", help=f"comma-separated families (default: all): {', '.join(FAMILIES)}")
    which.add_argument("--group", help=f"a group of families: {', '.join(GROUPS)}")
    parser.add_argument("--n-train", type=int, default=2000, help="training items (default: 2000)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out test items (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.set_defaults(run=_run_tasks, parser=parser)


def _run_tasks(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.group is not None:
        if args.group not in GROUPS:
            parser.error(f"unknown group {args.group!r}; valid groups: {', '.join(GROUPS)}")
        families = list(GROUPS[args.group])
    elif args.families is not None:
        families = [name.strip() for name in args.families.split(",") if name.strip()]
        unknown = [name for name in families if name not in FAMILIES]
        if unknown or not families:
            parser.error(
                f"unknown families {unknown or [args.families]}; valid families: {', '.join(FAMILIES)}"
            )
        if len(set(families)) != len(families):
            parser.error(f"--families lists a family more than once: {args.families}")
    else:
        families = list(FAMILIES)
    for option, value in (("--n-train", args.n_train), ("--n-test", args.n_test)):
        if value < 0:
            parser.error(f"{option} must be >= 0, got {value}")
    paths = write_task_data(args.out, families, args.n_train, args.n_test, seed=args.seed)
    print(f"families: {', '.join(families)}")
    print(f"train: {args.n_train} items -> {paths['train']}")
    print(f"test: {args.n_test} items -> {paths['test']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench_command(commands)
    add_score_command(commands)
    add_load_command(commands)
    _add_tasks_command(commands)
    add_distill_command(commands)
    add_subset_command(commands)
    add_catalog_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
