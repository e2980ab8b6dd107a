"""`python -m client score --suite ifeval`: score a responses file on IFEval and print the table."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from client.ifeval.evaluation import evaluate, format_scores, load_items, load_responses

SUITES = ("ifeval",)


def add_score_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "score",
        help="score a responses file on IFEval (strict and loose accuracy)",
        description='Score RESPONSES (one {"prompt", "response"} JSON object per line, the format of '
        "google-research's instruction_following_eval) on the IFEval prompts in DATA, print prompt- and "
        "instruction-level accuracy (strict and loose) and the per-instruction-type table; with --out, "
        "also write OUT/scores.json with every item's outcome.",
    )
    parser.add_argument("--suite", required=True, choices=SUITES, help="the benchmark to score")
    parser.add_argument(
        "--data",
        required=True,
        help="IFEval prompts: a local input_data.jsonl, or a hub dataset id such as google/IFEval",
    )
    parser.add_argument("--responses", type=Path, required=True, help="responses JSONL to score")
    parser.add_argument("--limit", type=int, help="score only the first LIMIT items of DATA")
    parser.add_argument("--out", type=Path, help="directory to write scores.json into (created if missing)")
    parser.set_defaults(run=_run_score, parser=parser)


def _run_score(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if not args.responses.is_file():
        parser.error(f"--responses {args.responses}: no such file")
    try:
        items = load_items(args.data, limit=args.limit)
        scores = evaluate(items, load_responses(args.responses))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(format_scores(scores))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "scores.json"
        summary = {
            "suite": args.suite,
            "data": str(args.data),
            "responses": str(args.responses),
            "prompt_strict": scores.prompt_strict,
            "prompt_loose": scores.prompt_loose,
            "instruction_strict": scores.instruction_strict,
            "instruction_loose": scores.instruction_loose,
            "per_type": scores.per_type,
            "items": [asdict(outcome) for outcome in scores.outcomes],
        }
        path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"scores -> {path}")
    return 0
