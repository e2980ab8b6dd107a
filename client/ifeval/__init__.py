"""IFEval for the client: `cli` for `python -m client score` and `ifeval-subset`, `nltk_data` for lm-eval.

The checkers and the scoring live in tuneserve.ifeval, shared with fine-tuning's task evaluation.
"""

from client.ifeval.cli import add_score_command
from tuneserve.ifeval.evaluation import (
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
from tuneserve.ifeval.instructions import INSTRUCTION_TYPES

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
