"""Score responses to IFEval prompts: strict and loose, per prompt, per instruction and per instruction type.

A port of google-research `instruction_following_eval/evaluation_lib.py`: items come from IFEval's JSONL
(or the hub copy), responses from the reference's `{"prompt", "response"}` JSONL, keyed by prompt text.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.ifeval.instructions import InstructionArgumentError, build_instruction
from tuneserve.jsonl import read_jsonl

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt and the instructions (with their kwargs, None-valued keys dropped) it carries."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


@dataclass
class ItemOutcome:
    """Which of an item's instructions a response follows, strictly and loosely, in list order."""

    key: int
    prompt: str
    response: str
    instruction_id_list: list[str]
    follow_strict: list[bool]
    follow_loose: list[bool]
    prompt_strict: bool
    prompt_loose: bool


@dataclass
class IFEvalScores:
    """Accuracies in [0, 1]; `per_type` maps an instruction id to {"strict", "loose", "count"}."""

    prompt_strict: float
    prompt_loose: float
    instruction_strict: float
    instruction_loose: float
    per_type: dict[str, dict[str, float]]
    outcomes: list[ItemOutcome]


def parse_item(record: Any, where: str) -> IFEvalItem:
    """An item from one dataset record; errors start with `where` (file:line or hub id and row)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
    key, prompt, ids, kwargs = (
        record["key"],
        record["prompt"],
        record["instruction_id_list"],
        record["kwargs"],
    )
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"{where}: field 'key' must be an integer, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: field 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: field 'kwargs' must be a list of objects")
    if len(kwargs) != len(ids):
        raise ValueError(
            f"{where}: field 'kwargs' has {len(kwargs)} entries for {len(ids)} instructions; "
            "it needs one object per instruction"
        )
    cleaned = tuple({name: value for name, value in k.items() if value is not None} for k in kwargs)
    for index, (instruction_id, instruction_kwargs) in enumerate(zip(ids, cleaned, strict=True)):
        try:
            build_instruction(instruction_id, instruction_kwargs)
        except InstructionArgumentError as error:
            raise ValueError(f"{where}: field 'kwargs[{index}]' (key {key}): {error}") from None
    return IFEvalItem(key=key, prompt=prompt, instruction_id_list=tuple(ids), kwargs=cleaned)


def load_items(source: str | os.PathLike[str], limit: int | None = None) -> list[IFEvalItem]:
    """IFEval items from a local JSONL file (the reference's input_data.jsonl) or a hub dataset id
    such as "google/IFEval"; the first `limit` of them when given."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(source)
    if path.is_file():
        records = [(f"{path}:{number}", record) for number, record in read_jsonl(path)]
    elif not path.exists() and _HUB_ID.match(str(source)) and path.suffix != ".jsonl":
        from datasets import load_dataset

        rows = load_dataset(str(source), split="train")
        records = [(f"{source} row {index}", dict(row)) for index, row in enumerate(rows)]
    else:
        raise FileNotFoundError(
            f"{source}: no such file; pass IFEval's input_data.jsonl or a hub id such as google/IFEval"
        )
    items = [parse_item(record, where) for where, record in records[:limit]]
    if not items:
        raise ValueError(f"{source}: no IFEval items")
    return items


def select_subset(
    items: Sequence[IFEvalItem], focus: Sequence[str], per_focus: int, per_other: int, seed: int = 0
) -> list[IFEvalItem]:
    """A fixed, stratified subset: `per_focus` prompts carrying each `focus` instruction type, then
    `per_other` prompts for every other type among those left (prompts with no focus type), drawn with
    `seed`; returned in the items' order. The same arguments give the same subset on every machine."""
    import random

    rng = random.Random(f"ifeval-subset:{seed}")
    chosen: set[int] = set()

    def draw(kind: str, count: int, allowed: Callable[[IFEvalItem], bool]) -> None:
        candidates = [
            item
            for item in items
            if kind in item.instruction_id_list and item.key not in chosen and allowed(item)
        ]
        chosen.update(item.key for item in rng.sample(candidates, min(count, len(candidates))))

    for kind in focus:
        draw(kind, per_focus, lambda item: True)
    kinds = sorted({kind for item in items for kind in item.instruction_id_list} - set(focus))
    for kind in kinds:
        draw(kind, per_other, lambda item: not set(focus) & set(item.instruction_id_list))
    return [item for item in items if item.key in chosen]


def write_items(items: Sequence[IFEvalItem], path: Path) -> Path:
    """Items as IFEval's input JSONL, which `load_items` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            record = {
                "key": item.key,
                "prompt": item.prompt,
                "instruction_id_list": list(item.instruction_id_list),
                "kwargs": list(item.kwargs),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def load_responses(path: Path) -> dict[str, str]:
    """Responses keyed by prompt text, from one {"prompt", "response"} object per line.

    As in the reference, a prompt given twice keeps its last response.
    """
    responses: dict[str, str] = {}
    for number, record in read_jsonl(Path(path)):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'response'")
        for field in ("prompt", "response"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {record.get(field)!r}")
        if record["prompt"] in responses:
            logger.warning("%s: a second response to the same prompt replaces the first", where)
        responses[record["prompt"]] = record["response"]
    return responses


def loose_variants(response: str) -> list[str]:
    """The reference's eight loose readings of a response: as is, without its first line, last line or
    both, each with and without asterisks (markdown emphasis)."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def score_item(item: IFEvalItem, response: str) -> ItemOutcome:
    """Check one response against each of the item's instructions, strictly and loosely."""
    variants = loose_variants(response)
    follow_strict, follow_loose = [], []
    for instruction_id, kwargs in zip(item.instruction_id_list, item.kwargs, strict=True):
        instruction = build_instruction(instruction_id, kwargs)
        # A blank response follows nothing, whatever the checker would say about it.
        follow_strict.append(bool(response.strip()) and instruction.check(response))
        follow_loose.append(any(variant.strip() and instruction.check(variant) for variant in variants))
    return ItemOutcome(
        key=item.key,
        prompt=item.prompt,
        response=response,
        instruction_id_list=list(item.instruction_id_list),
        follow_strict=follow_strict,
        follow_loose=follow_loose,
        prompt_strict=all(follow_strict),
        prompt_loose=all(follow_loose),
    )


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def evaluate(items: Sequence[IFEvalItem], responses: Mapping[str, str]) -> IFEvalScores:
    """Score `responses` (keyed by prompt text) on `items`; every item needs a response."""
    if not items:
        raise ValueError("no IFEval items to score")
    missing = [item.key for item in items if item.prompt not in responses]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(items)} IFEval items have no response (responses are matched by "
            f"exact prompt text); missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    outcomes = [score_item(item, responses[item.prompt]) for item in items]
    strict_by_type: dict[str, list[bool]] = {}
    loose_by_type: dict[str, list[bool]] = {}
    for outcome in outcomes:
        for instruction_id, strict, loose in zip(
            outcome.instruction_id_list, outcome.follow_strict, outcome.follow_loose, strict=True
        ):
            strict_by_type.setdefault(instruction_id, []).append(strict)
            loose_by_type.setdefault(instruction_id, []).append(loose)
    per_type: dict[str, dict[str, float]] = {
        instruction_id: {
            "strict": _mean(strict_by_type[instruction_id]),
            "loose": _mean(loose_by_type[instruction_id]),
            "count": len(strict_by_type[instruction_id]),
        }
        for instruction_id in sorted(strict_by_type)
    }
    return IFEvalScores(
        prompt_strict=_mean([outcome.prompt_strict for outcome in outcomes]),
        prompt_loose=_mean([outcome.prompt_loose for outcome in outcomes]),
        instruction_strict=_mean([flag for outcome in outcomes for flag in outcome.follow_strict]),
        instruction_loose=_mean([flag for outcome in outcomes for flag in outcome.follow_loose]),
        per_type=per_type,
        outcomes=outcomes,
    )


def format_scores(scores: IFEvalScores) -> str:
    """The four accuracies, then instruction-level accuracy per instruction type, as a text table."""
    n_prompts = len(scores.outcomes)
    n_instructions = sum(len(outcome.instruction_id_list) for outcome in scores.outcomes)
    width = max([len("instruction type"), *map(len, scores.per_type)])
    lines = [
        f"IFEval: {n_prompts} prompts, {n_instructions} instructions",
        f"{'':<{width}}  {'count':>5}  {'strict':>6}  {'loose':>6}",
        f"{'prompt-level':<{width}}  {n_prompts:>5}  "
        f"{scores.prompt_strict:>6.4f}  {scores.prompt_loose:>6.4f}",
        f"{'instruction-level':<{width}}  {n_instructions:>5}  "
        f"{scores.instruction_strict:>6.4f}  {scores.instruction_loose:>6.4f}",
        "",
        f"{'instruction type':<{width}}  {'count':>5}  {'strict':>6}  {'loose':>6}",
    ]
    for instruction_id, row in scores.per_type.items():
        lines.append(
            f"{instruction_id:<{width}}  {int(row['count']):>5}  {row['strict']:>6.4f}  {row['loose']:>6.4f}"
        )
    return "\n".join(lines)
