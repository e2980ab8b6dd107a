"""Command line of the pipeline: `python -m pipeline <command> ...`.

`demo` runs the whole product end to end (fine-tune, serve, bench, load, report) through the command lines
of finetune, serve and client; `base NAME` builds (or reuses) a base in its cache folder (.cache/NAME);
`image` builds the server's container image.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence

from pipeline.bases import REPO_ROOT, build_base_command
from pipeline.demo import add_demo_command
from pipeline.image import add_image_command


def _add_base_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "base",
        help="build (or reuse) a base where the pipeline, tests and benchmarks look for it (.cache/NAME)",
        description="Run `python -m finetune base NAME --out .cache/NAME` (`tiny`: .cache/tiny-base).",
    )
    parser.add_argument("name", help="a base `python -m finetune base` builds: tiny, smollm2-135m-instruct")
    parser.set_defaults(run=lambda args: subprocess.call(build_base_command(args.name), cwd=REPO_ROOT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)
    _add_base_command(commands)
    add_image_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
