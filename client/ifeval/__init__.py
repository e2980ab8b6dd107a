"""IFEval (Zhou et al. 2023): its 25 verifiable instructions and the reference's strict and loose scoring.

A faithful port of google-research's `instruction_following_eval` that runs offline; see `instructions`
for the checkers, `evaluation` for loading and scoring, `cli` for `python -m client score`.
"""

from client.ifeval.cli import add_score_command
from client.ifeval.evaluation import (
    IFEvalItem,
    IFEvalScores,
    ItemOutcome,
    evaluate,
    format_scores,
    load_items,
    load_responses,
    select_subset,
    write_items,
)
from client.ifeval.instructions import INSTRUCTION_TYPES

__all__ = [
    "INSTRUCTION_TYPES",
    "IFEvalItem",
    "IFEvalScores",
    "ItemOutcome",
    "add_score_command",
    "evaluate",
    "format_scores",
    "load_items",
    "load_responses",
    "select_subset",
    "write_items",
]
