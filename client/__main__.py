"""Command line of the benchmark client: `python -m client <command> ...`.

`bench` runs an instruction-following suite (ifeval, tasks, reference, mtbench) against models at any
OpenAI-compatible endpoint and reports them side by side; `score` scores existing IFEval responses
offline; `load` is the serving load benchmark (vLLM's metric definitions); `tasks` writes the generated
instruction-following suite (training data and held-out test items); `distill` makes constraint-following
training data from a model's own answers; `generate` grows instruction data from seed tasks (Self-Instruct);
`ifeval-subset` writes a fixed subset of IFEval; `catalog` prints
the names `tasks` and `distill` accept; `lm-eval-tasks` prints the folder of the lm-eval task definitions
shipped here (lm-eval's IFEval on the packaged prompts) and `nltk-data` writes the NLTK model it needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from client.bench import add_bench_command
from client.catalog import add_catalog_command
from client.distill import add_distill_command
from client.gate import add_gate_command
from client.generate import add_generate_command
from client.ifeval.cli import add_lm_eval_commands, add_score_command, add_subset_command
from client.load import add_load_command
from client.tasks import add_tasks_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench_command(commands)
    add_score_command(commands)
    add_gate_command(commands)
    add_load_command(commands)
    add_tasks_command(commands)
    add_distill_command(commands)
    add_generate_command(commands)
    add_subset_command(commands)
    add_catalog_command(commands)
    add_lm_eval_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
