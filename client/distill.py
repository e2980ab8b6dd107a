"""Instruction data made from a model's own answers: `python -m client distill`.

The model answers plain questions; each complete answer is rewritten to satisfy one verifiable constraint
(upper-cased, wrapped in quotes, turned into JSON, ...), the constraint is added to the question in words,
and the pair is kept only if IFEval's own checker passes the rewritten answer. So the data teaches the
constraint without changing what the model knows or how it writes. Held-out prompts use other topics and
other phrasings, in IFEval's input format, so `bench --suite ifeval --data test.jsonl` scores them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from client.cli import Commands, CommandSettings, add_command, known_names
from client.endpoint import EndpointError, served_models
from tuneserve.ifeval.instructions import build_instruction

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
OVERLAP_N = 8
"""Word n-gram length for the check against IFEval's prompts (n-gram contamination checks use 8-13)."""

# --- questions: templates x topics; topics split once, so held-out prompts are about unseen subjects ------

# Questions the base answers briefly and completely: asked for stories, poems or advice, a 135M model loops
# until max_tokens, and only complete answers are kept.
_TEMPLATES = (
    "Explain {topic} in a few sentences.",
    "Write a short paragraph describing {topic}.",
    "Describe {topic} in two or three sentences.",
    "In a few sentences, what is special about {topic}?",
    "Summarize what you know about {topic} in a short paragraph.",
    "Briefly explain what {topic} is.",
    "Write three sentences about {topic}.",
    "What is {topic}? Keep it short.",
)
_TOPICS = (
    "volcanoes", "coffee", "the ocean", "chess", "honeybees", "solar panels", "the moon", "bicycles",
    "rainforests", "bread baking", "the human heart", "earthquakes", "penguins", "electric cars", "gardening",
    "the piano", "deserts", "recycling", "sleep", "football", "glaciers", "owls", "the internet", "tea",
    "lighthouses", "mushrooms", "trains", "dolphins", "photography", "rivers", "vaccines", "kites",
    "the stock market", "libraries", "wind turbines", "spiders", "jazz", "mountains", "the printing press",
    "octopuses", "camping", "rainbows", "museums", "cheese", "robots", "elephants", "the alphabet", "clocks",
)  # fmt: skip


def _split_topics(split: Split) -> tuple[str, ...]:
    return tuple(topic for i, topic in enumerate(_TOPICS) if (i % 4 == 3) == (split == "test"))


def questions(split: Split) -> list[str]:
    """Every plain question of a split: each template about each of the split's topics."""
    return [template.format(topic=topic) for topic in _split_topics(split) for template in _TEMPLATES]


# --- constraints: how each is asked, how an answer is made to follow it, which IFEval checker checks it -----

# (question, answer, kwargs, rng) -> the answer rewritten to follow the constraint, or None if it cannot be
Rewrite = Callable[[str, str, dict[str, Any], random.Random], str | None]


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: phrasings per split, its IFEval checker, and the rewrite that satisfies it.

    A phrasing may hold `{value}`, filled with one of `values` of its split (which also go to `kwargs_key`).
    """

    name: str
    instruction_id: str
    phrasings: dict[Split, tuple[str, ...]]
    rewrite: Rewrite
    values: dict[Split, tuple[Any, ...]] = field(default_factory=dict)
    kwargs_key: str | None = None
    repeats_question: bool = False  # kwargs carry the question itself (IFEval's prompt_to_repeat)

    def draw(self, question: str, split: Split, rng: random.Random) -> tuple[str, dict[str, Any]]:
        """A phrasing of this constraint for `question` and the checker's kwargs."""
        phrasing = rng.choice(self.phrasings[split])
        kwargs: dict[str, Any] = {}
        if self.kwargs_key is not None:
            value = rng.choice(self.values[split])
            phrasing = phrasing.format(value=value)
            kwargs[self.kwargs_key] = value
        if self.repeats_question:
            kwargs["prompt_to_repeat"] = question
        return phrasing, kwargs

    def follows(self, response: str, kwargs: dict[str, Any]) -> bool:
        return bool(response.strip()) and build_instruction(self.instruction_id, kwargs).check(response)


def _upper(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return answer.upper()


def _lower(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return answer.lower()


def _quoted(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return f'"{answer}"'


def _as_json(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    key = rng.choice(("answer", "response", "text"))
    return json.dumps({key: answer}, ensure_ascii=False, indent=rng.choice((None, 2)))


def _without_commas(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return re.sub(r"\s*,\s*", " ", answer).replace(",", "")


def _ending_with(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return f"{answer.rstrip()}\n\n{kwargs['end_phrase']}"


def _repeating(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str:
    return f"{question}\n\n{answer}"


def _bulleted(question: str, answer: str, kwargs: dict[str, Any], rng: random.Random) -> str | None:
    from tuneserve.ifeval.text import split_sentences

    n = int(kwargs["num_bullets"])
    sentences = [" ".join(s.split()) for s in split_sentences(answer) if s.strip()]
    if len(sentences) < n:
        return None
    # n bullets of consecutive sentences, as even as the sentence count allows.
    bounds = [round(i * len(sentences) / n) for i in range(n + 1)]
    bullets = [" ".join(sentences[start:end]) for start, end in itertools.pairwise(bounds)]
    return "\n".join(f"* {bullet.lstrip('*-• ')}" for bullet in bullets)


CONSTRAINTS: dict[str, Constraint] = {
    c.name: c
    for c in (
        Constraint(
            "uppercase",
            "change_case:english_capital",
            {
                "train": (
                    "Write your whole answer in uppercase.",
                    "Respond using capital letters only.",
                    "Please answer in all caps.",
                    "Use nothing but uppercase letters in your reply.",
                    "Every letter of your reply has to be a capital letter.",
                    "Type the full answer in CAPITALS.",
                    "Make sure your whole reply uses only capital letters.",
                    "The entire response must be written in English capital letters, no lowercase.",
                ),
                "test": (
                    "Give your reply entirely in upper case.",
                    "Answer with every single letter capitalized.",
                    "I want your response in block capitals from start to finish.",
                ),
            },
            _upper,
        ),
        Constraint(
            "lowercase",
            "change_case:english_lowercase",
            {
                "train": (
                    "Write your whole answer in lowercase.",
                    "Respond using small letters only.",
                    "Please avoid capital letters entirely in your reply.",
                    "Use nothing but lowercase letters.",
                    "Not a single letter of your reply may be capitalized.",
                    "Type the full answer without any uppercase letters.",
                    "Make sure your whole reply is in English lowercase letters only.",
                    "Write everything in lower case; capital letters are not permitted.",
                ),
                "test": (
                    "Give your reply entirely in lower case.",
                    "Answer with every single letter in lowercase.",
                    "I want your response without one capital letter from start to finish.",
                ),
            },
            _lower,
        ),
        Constraint(
            "quotation",
            "startend:quotation",
            {
                "train": (
                    "Put your whole answer inside double quotes.",
                    'Enclose the complete reply in double quotation marks (").',
                    "Begin and end your response with a double quote character.",
                    "Surround everything you write with double quotes.",
                    "Wrap the whole reply in double quotation marks.",
                    "Put a double quotation mark at the very start and the very end of your entire answer.",
                ),
                "test": (
                    "Place the entire reply between a pair of double quotation marks.",
                    'Your response must open and close with the " character.',
                ),
            },
            _quoted,
        ),
        Constraint(
            "json",
            "detectable_format:json_format",
            {
                "train": (
                    "Reply with valid JSON only.",
                    "Format the complete answer as a JSON object.",
                    "Return your answer as JSON and nothing else.",
                    "Your output should be a JSON object holding the answer.",
                    "Wrap the whole reply in JSON format.",
                    "Make sure the entire output is in JSON format, with nothing outside the JSON.",
                ),
                "test": (
                    "Give the whole response as parseable JSON.",
                    "Answer only with a JSON document.",
                ),
            },
            _as_json,
        ),
        Constraint(
            "no_comma",
            "punctuation:no_comma",
            {
                "train": (
                    "Do not put a single comma in your answer.",
                    "Write the reply without commas.",
                    "Avoid the comma character completely.",
                    "Commas are forbidden in your response.",
                    "In your whole reply, do not use any commas.",
                    "Refrain from using commas anywhere in the answer.",
                ),
                "test": (
                    "Your reply must contain zero commas.",
                    "Leave out every comma when you answer.",
                ),
            },
            _without_commas,
        ),
        Constraint(
            "end_phrase",
            "startend:end_checker",
            {
                "train": (
                    'Close your reply with the words "{value}"',
                    'The last words of your answer must be "{value}"',
                    'Finish with this sentence: "{value}"',
                    'Finish your reply with this exact phrase: "{value}". Nothing may follow it.',
                    'The very last words of your response must be "{value}", with no other words after them.',
                    "End your whole answer with the phrase {value}",
                ),
                "test": (
                    'End the response with exactly "{value}" and nothing after it.',
                    'Make "{value}" the final words of your reply.',
                ),
            },
            _ending_with,
            values={
                "train": (
                    "That is all for now.",
                    "Hope this helps!",
                    "Thanks for asking.",
                    "Good luck!",
                    "Enjoy learning more.",
                    "Have a great day.",
                    "Let me know what you think.",
                    "Any more questions for me?",
                    "Can I help with something else?",
                    "Stay curious!",
                    "I hope that answers your question.",
                    "Is that what you wanted to know?",
                    "Cheers!",
                    "Feel free to ask again.",
                    "That is my answer.",
                    "Would you like to hear more?",
                    "Take care.",
                    "What else would you like to learn?",
                ),
                "test": ("See you next time.", "Happy exploring!", "That covers it."),
            },
            kwargs_key="end_phrase",
        ),
        Constraint(
            "repeat_prompt",
            "combination:repeat_prompt",
            {
                "train": (
                    "Start by copying my question exactly as written (not this sentence), then answer it.",
                    "Repeat the question above word for word first, and only then give your answer.",
                    "Before you answer, restate the question above verbatim, leaving out this sentence.",
                    "First write out the request above exactly as it is, then respond. "
                    "Say nothing before it.",
                    "Repeat the request above without changing a word, "
                    "then give your reply (not this sentence).",
                ),
                "test": (
                    "Echo the question above unchanged at the very beginning, then respond.",
                    "Copy the question above exactly before replying to it (leave out this sentence).",
                ),
            },
            _repeating,
            repeats_question=True,
        ),
        Constraint(
            "bullets",
            "detectable_format:number_bullet_lists",
            {
                "train": (
                    "Reply with {value} bullet points exactly, each starting with *.",
                    "Use exactly {value} markdown bullets (* ...) for your reply.",
                    "Give precisely {value} bullet points, written as * item lines.",
                    "Your answer must hold exactly {value} bullet points in markdown, like:\n* point one",
                ),
                "test": (
                    "Structure the reply as {value} bullets, no more and no fewer, using the * symbol.",
                    "Your response should be exactly {value} lines that start with *.",
                ),
            },
            _bulleted,
            values={"train": (2, 3, 4), "test": (2, 3, 4)},
            kwargs_key="num_bullets",
        ),
    )
}


# --- n-gram overlap with IFEval's prompts ----------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@dataclass(frozen=True)
class Overlap:
    """How far prompts share word n-grams with reference prompts."""

    n: int
    prompts: int
    sharing: int  # prompts sharing at least one n-gram of length `n`
    longest: int  # the longest shared word n-gram over all prompts
    longest_example: str


class NgramIndex:
    """Every word n-gram (n <= max_n) of a set of reference texts."""

    def __init__(self, texts: Sequence[str], max_n: int = 32) -> None:
        self.max_n = max_n
        self.grams: set[tuple[str, ...]] = set()
        for text in texts:
            words = _words(text)
            for n in range(1, max_n + 1):
                self.grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    def longest_shared(self, text: str) -> tuple[int, str]:
        """The longest word n-gram of `text` found in the references (capped at max_n), and that n-gram."""
        words = _words(text)
        best, example = 0, ""
        for n in range(1, min(len(words), self.max_n) + 1):
            shared = next(
                (
                    words[i : i + n]
                    for i in range(len(words) - n + 1)
                    if tuple(words[i : i + n]) in self.grams
                ),
                None,
            )
            if shared is None:  # no n-gram shared, so no longer one either
                break
            best, example = n, " ".join(shared)
        return best, example

    def overlap(self, prompts: Sequence[str], n: int = OVERLAP_N) -> Overlap:
        found = [self.longest_shared(prompt) for prompt in prompts]
        longest, example = max(found, default=(0, ""))
        return Overlap(n, len(prompts), sum(length >= n for length, _ in found), longest, example)


def ifeval_index() -> NgramIndex:
    from client.ifeval import load_items
    from client.suites import default_data

    return NgramIndex([item.prompt for item in load_items(default_data("ifeval"))])


# --- building the data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    finish_reason: str | None

    @property
    def complete(self) -> bool:
        return self.finish_reason == "stop" and len(self.text.split()) >= 8


@dataclass
class FamilyCounts:
    answers: int = 0  # complete answers offered to the family
    not_applicable: int = 0  # the rewrite could not apply (e.g. too few sentences for the bullets)
    failed_check: int = 0  # rewritten, yet IFEval's checker refused it (e.g. langdetect)
    ifeval_overlap: int = 0  # the prompt shares an 8-gram with an IFEval prompt: dropped
    train: int = 0
    test: int = 0


def _prompt(question: str, phrasing: str) -> str:
    return f"{question} {phrasing}"


def build_train(
    constraint: Constraint,
    answers: Sequence[Answer],
    n: int,
    seed: int,
    index: NgramIndex | None,
    counts: FamilyCounts,
) -> list[dict[str, Any]]:
    """Up to `n` chat records: question + phrasing -> the answer rewritten, checked by IFEval's checker."""
    rng = random.Random(f"tuneserve-distill:{seed}:train:{constraint.name}")
    pool = [answer for answer in answers if answer.complete]
    rng.shuffle(pool)
    records: list[dict[str, Any]] = []
    for answer in pool:
        if len(records) == n:
            break
        counts.answers += 1
        phrasing, kwargs = constraint.draw(answer.question, "train", rng)
        rewritten = constraint.rewrite(answer.question, answer.text, kwargs, rng)
        if rewritten is None:
            counts.not_applicable += 1
            continue
        if not constraint.follows(rewritten, kwargs):
            counts.failed_check += 1
            continue
        prompt = _prompt(answer.question, phrasing)
        if index is not None and index.longest_shared(prompt)[0] >= OVERLAP_N:
            counts.ifeval_overlap += 1
            continue
        records.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": rewritten},
                ]
            }
        )
    counts.train = len(records)
    return records


def build_test(constraint: Constraint, n: int, seed: int, key_base: int) -> list[dict[str, Any]]:
    """`n` held-out prompts in IFEval's input format: unseen topics, unseen phrasings, IFEval's checker."""
    rng = random.Random(f"tuneserve-distill:{seed}:test:{constraint.name}")
    pool = questions("test")
    if n > len(pool):
        raise ValueError(f"--n-test {n}: there are only {len(pool)} held-out questions")
    items = []
    for i, question in enumerate(rng.sample(pool, n)):
        phrasing, kwargs = constraint.draw(question, "test", rng)
        items.append(
            {
                "key": key_base + i,
                "prompt": _prompt(question, phrasing),
                "instruction_id_list": [constraint.instruction_id],
                "kwargs": [kwargs],
            }
        )
    return items


def _interleave(lists: Sequence[Sequence[Any]]) -> list[Any]:
    longest = max((len(each) for each in lists), default=0)
    return [each[i] for i in range(longest) for each in lists if i < len(each)]


def _write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_distilled(
    out: Path,
    families: Sequence[str],
    answers: Sequence[Answer],
    n_train: int,
    n_test: int,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write OUT/<family>/{train,test}.jsonl, OUT/{train,test}.jsonl (all families) and OUT/stats.json."""
    index = ifeval_index()
    counts: dict[str, FamilyCounts] = {}
    trains, tests = [], []
    for number, name in enumerate(families):
        constraint = CONSTRAINTS[name]
        counts[name] = FamilyCounts()
        train = build_train(constraint, answers, n_train, seed, index, counts[name])
        test = build_test(constraint, n_test, seed, key_base=900_000 + 1000 * number)
        counts[name].test = len(test)
        if len(train) < n_train:
            logger.warning(
                "%s: only %d of %d training items (answers %d, not applicable %d, failed check %d); ask more "
                "questions (--questions) for more",
                name,
                len(train),
                n_train,
                counts[name].answers,
                counts[name].not_applicable,
                counts[name].failed_check,
            )
        _write_jsonl(out / name / "train.jsonl", train)
        _write_jsonl(out / name / "test.jsonl", test)
        trains.append(train)
        tests.append(test)
    train_all, test_all = _interleave(trains), _interleave(tests)
    _write_jsonl(out / "train.jsonl", train_all)
    _write_jsonl(out / "test.jsonl", test_all)
    _write_jsonl(out / "answers.jsonl", [asdict(answer) for answer in answers])
    train_overlap = index.overlap([r["messages"][0]["content"] for r in train_all])
    test_overlap = index.overlap([item["prompt"] for item in test_all])
    stats = {
        **(meta or {}),
        "families": {name: asdict(family_counts) for name, family_counts in counts.items()},
        "questions_asked": len(answers),
        "complete_answers": sum(answer.complete for answer in answers),
        "train_items": len(train_all),
        "test_items": len(test_all),
        "ifeval_overlap": {"train": asdict(train_overlap), "test": asdict(test_overlap)},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


async def ask_questions(
    base_url: str,
    model: str,
    asked: Sequence[str],
    *,
    api_key: str = "EMPTY",
    max_tokens: int = 192,
    concurrency: int = 16,
    seed: int = 0,
    cache_dir: Path | None = None,
    cache_scope: str | None = None,
    progress: bool = True,
) -> list[Answer]:
    """The model's greedy answer to each plain question (cached on disk, so a rerun asks only what is new)."""
    from tqdm import tqdm

    from client.bench import ChatRunner, SamplingParams
    from client.cache import ResponseCache

    cache = ResponseCache(cache_dir) if cache_dir is not None else None
    runner = ChatRunner(base_url, api_key, concurrency=concurrency, cache=cache, cache_scope=cache_scope)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed)
    try:
        await served_models(runner.client, [model], option="--model")
        with tqdm(total=len(asked), desc=f"answers of {model}", unit="question", disable=not progress) as bar:

            async def one(question: str) -> Answer:
                reply = await runner.complete(model, [{"role": "user", "content": question}], params)
                bar.update()
                return Answer(question, reply.text, reply.finish_reason)

            return list(await asyncio.gather(*(one(question) for question in asked)))
    finally:
        await runner.close()
        if cache is not None:
            cache.close()


# --- command line ------------------------------------------------------------------------------------------


class DistillConfig(CommandSettings):
    """One `distill` run: whose answers, which constraints, how many items."""

    base_url: str = Field(description="the endpoint's API root, e.g. http://127.0.0.1:8000/v1")
    api_key: str = Field("EMPTY", description="bearer token")
    model: str = Field(description="the model whose answers are rewritten (the base)")
    families: list[str] = Field(
        list(CONSTRAINTS), description=f"comma-separated constraint families: {', '.join(CONSTRAINTS)}"
    )
    out: Path = Field(description="output directory")
    n_train: int = Field(64, ge=1, description="training items per family")
    n_test: int = Field(24, ge=1, description="held-out prompts per family")
    questions: int | None = Field(
        None,
        ge=1,
        description="plain questions to ask, else n-train + a third (for the answers that do not finish)",
    )
    max_tokens: int = Field(192, ge=1, description="per answer; longer ones are dropped")
    concurrency: int = Field(16, ge=1, description="requests in flight")
    seed: int = Field(0, description="question and phrasing choice")
    cache_dir: Path | None = Field(None, description="answer cache, else OUT/cache")
    cache_scope: str | None = Field(
        None,
        description="name the endpoint by this in cache keys instead of its URL, so answers from an earlier "
        "server of the same model are reused (e.g. the model's content hash)",
    )

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        return known_names(families, list(CONSTRAINTS), "constraint families")

    @model_validator(mode="after")
    def _enough_questions(self) -> DistillConfig:
        available = len(questions("train"))
        if not 1 <= self.n_questions <= available:
            raise ValueError(
                f"--questions must be between 1 and {available} (the training questions), "
                f"got {self.n_questions}"
            )
        return self

    @property
    def n_questions(self) -> int:
        return self.questions if self.questions is not None else self.n_train + self.n_train // 3


def add_distill_command(commands: Commands) -> None:
    add_command(
        commands,
        "distill",
        DistillConfig,
        _run_distill,
        help="make constraint-following training data from a model's own answers",
        description=__doc__ or "",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _run_distill(config: DistillConfig) -> int:
    from client.bench import BenchError

    pool = questions("train")
    asked = random.Random(f"tuneserve-distill:{config.seed}:questions").sample(pool, config.n_questions)
    try:
        answers = asyncio.run(
            ask_questions(
                config.base_url,
                config.model,
                asked,
                api_key=config.api_key,
                max_tokens=config.max_tokens,
                concurrency=config.concurrency,
                seed=config.seed,
                cache_dir=config.cache_dir if config.cache_dir is not None else config.out / "cache",
                cache_scope=config.cache_scope,
            )
        )
    except (BenchError, EndpointError) as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return 2
    meta = {"model": config.model, "max_tokens": config.max_tokens, "seed": config.seed}
    stats = write_distilled(
        config.out, config.families, answers, config.n_train, config.n_test, config.seed, meta
    )
    print(f"{stats['complete_answers']} of {stats['questions_asked']} answers complete")
    for name, counts in stats["families"].items():
        print(f"{name}: {counts['train']} train, {counts['test']} test")
    overlap = stats["ifeval_overlap"]["train"]
    print(
        f"IFEval overlap: {overlap['sharing']} of {overlap['prompts']} training prompts share a word "
        f"{overlap['n']}-gram with IFEval's 541 prompts (longest shared: {overlap['longest']} words)"
    )
    print(f"data: {config.out}")
    return 0
