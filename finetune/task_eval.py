"""The task score during training: greedy replies of the model being trained to held-out verifiable prompts.

Eval loss can stay flat while the share of replies that follow their instructions moves (LLaMA-Factory
#3038), so a run can score a fixed sample of prompts whose replies are checked by rules, at every eval
pass, and choose its checkpoint or stop early by that score. The items are `python -m client tasks`'s
test.jsonl (`prompt` and `checks`) or IFEval's input format (`prompt`, `instruction_id_list`, `kwargs`)
as `python -m client distill` writes its held-out prompts; both are scored by the checkers the client's
benchmarks use (tuneserve), prompt-level and strict, so the score here is the one `client bench` reports.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.prompting import ChatTokenizer, Message, encode_prompt
from tuneserve.checks import CHECKS, check_reply
from tuneserve.ifeval.evaluation import IFEvalItem, parse_item, score_item
from tuneserve.jsonl import read_jsonl


class TaskEvalError(ValueError):
    """A task-eval file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class TaskPrompt:
    """One held-out prompt and how its reply is checked: `checks` (task checks) or `ifeval` (IFEval's)."""

    origin: str  # file:line
    prompt: str
    checks: dict[str, Any] | None = None
    ifeval: IFEvalItem | None = None

    def follows(self, reply: str) -> bool:
        """Whether `reply` passes every check of the prompt (IFEval: prompt-level strict)."""
        if self.ifeval is not None:
            return score_item(self.ifeval, reply).prompt_strict
        assert self.checks is not None
        return check_reply(self.checks, reply)[0]


def _task_prompt(record: Any, origin: str) -> TaskPrompt:
    if not isinstance(record, dict):
        raise TaskEvalError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    if "instruction_id_list" in record:
        try:
            item = parse_item(record, origin)
        except ValueError as error:
            raise TaskEvalError(str(error)) from None
        return TaskPrompt(origin=origin, prompt=item.prompt, ifeval=item)
    prompt, checks = record.get("prompt"), record.get("checks")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskEvalError(
            f"{origin}: needs a non-empty string 'prompt' and either 'checks' (as `python -m client tasks` "
            "writes test.jsonl) or IFEval's 'instruction_id_list' and 'kwargs'"
        )
    if not isinstance(checks, dict) or not checks:
        raise TaskEvalError(f"{origin}: 'checks' must be a non-empty object of checks: {', '.join(CHECKS)}")
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise TaskEvalError(f"{origin}: unknown checks {unknown}; known checks: {', '.join(CHECKS)}")
    return TaskPrompt(origin=origin, prompt=prompt, checks=checks)


def load_task_prompts(path: str | Path, n: int | None, seed: int) -> list[TaskPrompt]:
    """The prompts of a task-eval file: all of them, or a seeded sample of `n` (the same at every eval)."""
    path = Path(path)
    if not path.is_file():
        raise TaskEvalError(f"training.task_eval.path: {path} is not a file")
    try:
        rows = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise TaskEvalError(f"training.task_eval.path: {error}") from None
    prompts = [_task_prompt(record, f"{path}:{number}") for number, record in rows]
    if not prompts:
        raise TaskEvalError(f"training.task_eval.path: {path} holds no prompts")
    if n is not None and n < len(prompts):
        chosen = sorted(random.Random(f"task-eval:{seed}").sample(range(len(prompts)), n))
        prompts = [prompts[i] for i in chosen]
    return prompts


def prompt_ids(
    tokenizer: ChatTokenizer, prompts: Sequence[TaskPrompt], system_prompt: str | None
) -> list[list[int]]:
    """Each prompt rendered as training renders a user turn (with the data's system prompt, if any)."""
    rendered = []
    for item in prompts:
        messages: list[Message] = [{"role": "user", "content": item.prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered.append(encode_prompt(tokenizer, messages))
    return rendered


@torch.no_grad()
def greedy_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    stop_ids: set[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy replies, batched with left padding, each cut at its first end-of-turn token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
        )
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            replies.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return replies


def follow_flags(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[TaskPrompt],
    ids: Sequence[list[int]],
    stop_ids: set[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[bool]:
    """For each prompt, whether the model's greedy reply follows all of its instructions."""
    replies = greedy_replies(
        model, tokenizer, ids, stop_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device
    )
    return [item.follows(reply) for item, reply in zip(prompts, replies, strict=True)]
