"""`python -m client score --suite ifeval`: score a responses file on IFEval and print the table;
`python -m client ifeval-subset`: write a fixed, stratified subset of IFEval's prompts."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from client.ifeval.evaluation import (
    evaluate,
    format_scores,
    load_items,
    load_responses,
    select_subset,
    write_items,
)

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


def add_subset_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "ifeval-subset",
        help="write a fixed, stratified subset of IFEval (prompts of chosen instruction types, then others)",
        description="Write OUT: PER_FOCUS prompts carrying each --focus instruction type, then PER_OTHER "
        "prompts of every other type among prompts with no focus type, drawn with --seed, in IFEval's order "
        "and input format (for `bench --suite ifeval --data OUT`). The same arguments give the same subset.",
    )
    parser.add_argument(
        "--focus", required=True, help="comma-separated instruction types, e.g. change_case:english_capital"
    )
    parser.add_argument("--per-focus", type=int, required=True, help="prompts per focus type")
    parser.add_argument("--per-other", type=int, required=True, help="prompts per other instruction type")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn (default: 0)")
    parser.add_argument(
        "--data", help="IFEval JSONL or hub id (default: the 541 prompts shipped in the package)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.set_defaults(run=_run_subset, parser=parser)


def _run_subset(args: argparse.Namespace) -> int:
    from client.suites import default_data

    parser: argparse.ArgumentParser = args.parser
    if args.per_focus < 0 or args.per_other < 0:
        parser.error("--per-focus and --per-other must be >= 0")
    focus = [kind.strip() for kind in args.focus.split(",") if kind.strip()]
    try:
        items = load_items(args.data or default_data("ifeval"))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    known = {kind for item in items for kind in item.instruction_id_list}
    unknown = [kind for kind in focus if kind not in known]
    if unknown:
        parser.error(f"--focus: no prompt carries {unknown}; types: {', '.join(sorted(known))}")
    subset = select_subset(items, focus, args.per_focus, args.per_other, seed=args.seed)
    print(f"IFEval subset: {len(subset)} of {len(items)} prompts -> {write_items(subset, args.out)}")
    return 0
