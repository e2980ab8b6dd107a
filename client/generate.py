"""New instruction data from a few seed tasks, Self-Instruct style: `python -m client generate`.

The endpoint is shown three tasks drawn from the seeds and what has been kept so far, and asked for a fourth;
a candidate is kept only if it is of a sensible length, names nothing a text model cannot do (Self-Instruct's
blocklist: images, files, audio, ...), and is not too like any task already kept (ROUGE-L F1 below 0.7, as
in Self-Instruct). Some kept tasks get a verifiable constraint (IFEval's own checkers, as `distill` words
them); their answers are asked again up to --max-tries times until the checker passes (rejection sampling),
and dropped if it never does. Any answer cut off by max_tokens is dropped too. Writes OUT/train.jsonl (chat
records `finetune run` reads) and OUT/report.json (what was asked, kept, and why the rest was dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from client.cli import Commands, CommandSettings, UsageError, add_command, known_names
from client.distill import CONSTRAINTS
from client.endpoint import EndpointError, served_models

SIMILARITY_LIMIT = 0.7  # Self-Instruct's ROUGE-L threshold
# Self-Instruct's filter: tasks a language model cannot do from text alone.
BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
    "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
EXAMPLES_SHOWN = 3
PROMPT = (
    "Come up with a new task for an AI assistant, different from these examples. Write only the task.\n\n"
)


@dataclass(frozen=True)
class Seed:
    instruction: str
    output: str


def default_seeds() -> Path:
    return Path(__file__).parent / "data" / "self_instruct" / "seed_tasks.jsonl"


def load_seeds(path: Path) -> list[Seed]:
    """Seed tasks, one JSON object per line with `instruction` and `output`; a bad line names itself."""
    if not path.is_file():
        raise UsageError(f"--seeds: {path} does not exist")
    seeds = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            seeds.append(Seed(str(row["instruction"]).strip(), str(row["output"]).strip()))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"--seeds: {path}:{number}: needs a JSON object with instruction and output ({exc})"
            ) from None
    if len(seeds) < EXAMPLES_SHOWN:
        raise UsageError(f"--seeds: {path} holds {len(seeds)} seed tasks; give at least {EXAMPLES_SHOWN}")
    return seeds


def proposal_prompt(examples: list[str]) -> str:
    listed = "".join(f"Task {i}: {text}\n" for i, text in enumerate(examples, start=1))
    return f"{PROMPT}{listed}Task {len(examples) + 1}:"


def parse_proposal(text: str) -> str:
    """The task in a reply: its first non-empty line, without a leading "Task 4:" or list marker."""
    for line in text.strip().splitlines():
        line = re.sub(
            r"^\s*(?:task\s*\d+\s*[:.)-]|\d+\s*[.)]|[-*])\s*", "", line, flags=re.IGNORECASE
        ).strip()
        if line:
            return line
    return ""


class Filter:
    """Why a proposed task is dropped (None: kept); remembers the kept ones for the similarity check."""

    def __init__(self, existing: list[str], min_words: int, max_words: int) -> None:
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.kept: list[str] = list(existing)
        self.min_words, self.max_words = min_words, max_words

    def reason(self, task: str) -> str | None:
        words = task.split()
        if len(words) < self.min_words:
            return "too_short"
        if len(words) > self.max_words:
            return "too_long"
        lowered = task.lower()
        if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in BLOCKLIST):
            return "blocklist"
        if not task[0].isalnum():
            return "format"
        if any(self.scorer.score(task, kept)["rougeL"].fmeasure >= SIMILARITY_LIMIT for kept in self.kept):
            return "similar"
        return None

    def keep(self, task: str) -> None:
        self.kept.append(task)


@dataclass
class Kept:
    task: str
    instruction: str  # the task, with its constraint's words when it has one
    family: str | None
    kwargs: dict[str, Any]
    response: str = ""
    tries: int = 0


async def generate(config: GenerateConfig, seeds: list[Seed]) -> dict[str, Any]:
    """Propose, filter and answer tasks until --num-instructions are kept or --max-proposals are spent."""
    from tqdm import tqdm

    from client.bench import ChatRunner, SamplingParams
    from client.cache import ResponseCache

    rng = random.Random(f"tuneserve-generate:{config.seed}")
    cache = ResponseCache(config.cache_dir or config.out / "cache") if config.cache else None
    runner = ChatRunner(config.base_url, config.api_key, concurrency=config.concurrency, cache=cache)
    filters = Filter([seed.instruction for seed in seeds], config.min_words, config.max_words)
    dropped: collections.Counter[str] = collections.Counter()
    tries: collections.Counter[str] = collections.Counter()
    kept: list[Kept] = []
    proposed = surplus = 0
    try:
        await served_models(runner.client, [config.model], option="--model")
        with tqdm(total=config.num_instructions, desc="kept", unit="task") as bar:
            while len(kept) < config.num_instructions and proposed < config.proposal_budget:
                batch = min(config.concurrency, config.proposal_budget - proposed)
                pool = [seed.instruction for seed in seeds] + [k.task for k in kept]
                prompts = [proposal_prompt(rng.sample(pool, EXAMPLES_SHOWN)) for _ in range(batch)]
                params = [
                    SamplingParams(
                        temperature=config.temperature,
                        max_tokens=96,
                        seed=config.seed * 1_000_003 + proposed + i,
                    )
                    for i in range(batch)
                ]
                replies = await asyncio.gather(
                    *(
                        runner.complete(config.model, [{"role": "user", "content": p}], s)
                        for p, s in zip(prompts, params, strict=True)
                    )
                )
                proposed += batch
                accepted = []
                for reply in replies:  # in order, so each is compared with the ones kept before it
                    task = parse_proposal(reply.text)
                    why = "empty" if not task else filters.reason(task)
                    if why is not None:
                        dropped[why] += 1
                        continue
                    filters.keep(task)
                    accepted.append(_with_constraint(task, config, rng))
                answered = await asyncio.gather(*(_answer(runner, config, item, tries) for item in accepted))
                for item, why in zip(accepted, answered, strict=True):
                    if why is not None:
                        dropped[why] += 1
                    elif len(kept) < config.num_instructions:
                        kept.append(item)
                        bar.update()
                    else:
                        surplus += 1  # answered after the last place was taken
    finally:
        await runner.close()
        if cache is not None:
            cache.close()
    config.out.mkdir(parents=True, exist_ok=True)
    with (config.out / "train.jsonl").open("w", encoding="utf-8") as f:
        for item in kept:
            messages = [
                {"role": "user", "content": item.instruction},
                {"role": "assistant", "content": item.response},
            ]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    report = {
        "model": config.model,
        "seeds": len(seeds),
        "proposed": proposed,
        "kept": len(kept),
        "kept_with_constraint": sum(item.family is not None for item in kept),
        "dropped": dict(sorted(dropped.items())),
        "surplus": surplus,
        "answer_tries": dict(sorted(tries.items())),
        # Each kept task: its constraint (if any), the checker's arguments, and the answers it took.
        "items": [{"task": k.task, "family": k.family, "kwargs": k.kwargs, "tries": k.tries} for k in kept],
        "settings": config.model_dump(mode="json", exclude={"api_key"}),
    }
    (config.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _with_constraint(task: str, config: GenerateConfig, rng: random.Random) -> Kept:
    if not config.constraints or rng.random() >= config.constrained_fraction:
        return Kept(task, task, None, {})
    family = rng.choice(config.constraints)
    phrasing, kwargs = CONSTRAINTS[family].draw(task, "train", rng)
    return Kept(task, f"{task} {phrasing}", family, kwargs)


async def _answer(
    runner: Any, config: GenerateConfig, item: Kept, tries: collections.Counter[str]
) -> str | None:
    """Fill item.response; the reason it is dropped, or None."""
    from client.bench import SamplingParams

    attempts = config.max_tries if item.family is not None else 1
    why = "incomplete"
    for attempt in range(attempts):
        params = SamplingParams(
            temperature=config.temperature if attempt else config.answer_temperature,
            max_tokens=config.max_tokens,
            seed=config.seed * 1_000_003 + attempt,
        )
        reply = await runner.complete(config.model, [{"role": "user", "content": item.instruction}], params)
        item.tries = attempt + 1
        tries["answers"] += 1
        text = reply.text.strip()
        if not text:
            why = "empty_answer"
            continue
        if reply.finish_reason != "stop":
            why = "incomplete"
            continue
        if item.family is not None and not CONSTRAINTS[item.family].follows(text, item.kwargs):
            why = "checker_failed"
            tries[f"{item.family}:failed"] += 1
            continue
        if item.family is not None:
            tries[f"{item.family}:passed"] += 1
        item.response = text
        return None
    return why


class GenerateConfig(CommandSettings):
    """One `generate` run; its fields are the command's flags."""

    base_url: str = Field(description="the endpoint's API root, e.g. http://127.0.0.1:8000/v1")
    api_key: str = Field("EMPTY", description="bearer token")
    model: str = Field(description="the model that proposes tasks and answers them")
    out: Path = Field(description="output directory (train.jsonl, report.json, cache/)")
    seeds: Path | None = Field(
        None, description="seed tasks (JSONL: instruction, output), else the shipped set"
    )
    num_instructions: int = Field(50, ge=1, description="tasks to keep")
    max_proposals: int | None = Field(
        None, ge=1, description="proposals to ask at most (default 10 per task kept)"
    )
    constraints: list[str] = Field(
        ["lowercase", "uppercase", "quotation", "no_comma"],
        description=f"constraint families for verifiable tasks: {', '.join(CONSTRAINTS)} (empty: none)",
    )
    constrained_fraction: float = Field(0.5, ge=0, le=1, description="share of kept tasks given a constraint")
    max_tries: int = Field(3, ge=1, description="answers asked per constrained task until its checker passes")
    min_words: int = Field(3, ge=1, description="shortest task kept, in words")
    max_words: int = Field(150, ge=1, description="longest task kept, in words")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of proposals and retried answers")
    answer_temperature: float = Field(0.0, ge=0, description="temperature of each task's first answer")
    max_tokens: int = Field(256, ge=1, description="per answer; an answer cut off there is dropped")
    concurrency: int = Field(16, ge=1, description="requests in flight")
    seed: int = Field(0, description="example choice, constraints and sampling seeds")
    cache: bool = Field(True, description="cache replies on disk (--no-cache: ask every time)")
    cache_dir: Path | None = Field(None, description="reply cache, else OUT/cache")

    @field_validator("constraints", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [] if value in ("", [""]) else value

    @field_validator("constraints")
    @classmethod
    def _known(cls, families: list[str]) -> list[str]:
        return known_names(families, list(CONSTRAINTS), "constraint families") if families else []

    @property
    def proposal_budget(self) -> int:
        return self.max_proposals if self.max_proposals is not None else 10 * self.num_instructions


def add_generate_command(commands: Commands) -> None:
    add_command(
        commands,
        "generate",
        GenerateConfig,
        _run_generate,
        help="generate new instruction data from seed tasks (Self-Instruct) with any endpoint",
        description=__doc__ or "",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _run_generate(config: GenerateConfig) -> int:
    from client.bench import BenchError

    seeds = load_seeds(config.seeds or default_seeds())
    try:
        report = asyncio.run(generate(config, seeds))
    except (BenchError, EndpointError) as error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    dropped = ", ".join(f"{why} {count}" for why, count in report["dropped"].items()) or "none"
    constrained = report["kept_with_constraint"]
    print(f"kept {report['kept']} of {report['proposed']} proposed tasks ({constrained} with a constraint)")
    print(f"dropped: {dropped}")
    print(f"data: {config.out / 'train.jsonl'}")
    return 0
