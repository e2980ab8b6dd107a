"""Generated instruction-following tasks whose replies are checked by rules (IFEval-style), not by a judge.

One generator writes both the demo's instruction-tuning data and the held-out benchmark items that
`python -m client bench --suite tasks` scores; `verify` is the scorer for both.

Checks look only at the form of a reply (JSON keys, bullet count, case, length, start/end words,
keywords), never at world knowledge, so a tiny model can learn them. Each prompt names a topic noun
drawn from a word pool that is split once: test prompts use topic nouns and keywords that never occur
in training prompts, so train and test are disjoint by construction. Instruction parameters (bullet
counts, word limits, JSON keys, start words, end phrases) are shared by both splits: the held-out
question is "does the tuned model follow the instruction about a subject it never saw".
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from client.cli import Commands, CommandSettings, add_command, known_names
from tuneserve.checks import CHECKS, check_reply

Split = Literal["train", "test"]

# --- word pools ---------------------------------------------------------------------------------
# Every 4th word (index % 4 == 3) of a content pool belongs to the test split, the rest to train.
# Content pools must not share words with each other or with the prompt templates; a test checks this.

_TOPIC_NOUNS = (
    "anchor", "apple", "arrow", "badge", "balloon", "barrel", "basket", "beacon",
    "bell", "bench", "blanket", "boat", "bottle", "bridge", "broom", "bucket",
    "cabin", "camel", "candle", "canoe", "carpet", "castle", "cave", "chair",
    "cherry", "chimney", "clock", "cloud", "coat", "comet", "compass", "cottage",
    "crown", "cup", "curtain", "desk", "dragon", "drum", "eagle", "engine",
    "feather", "fence", "ferry", "fiddle", "flag", "flute", "fountain", "fox",
    "glove", "goat", "guitar", "hammer", "harbor", "hat", "helmet", "hive",
    "horse", "island", "jacket", "jar", "kettle", "kite", "ladder", "lamp",
    "lantern", "lemon", "lighthouse", "lion", "mirror", "mountain", "needle", "nest",
    "oak", "orchard", "owl", "paddle", "parrot", "pebble", "pencil", "piano",
    "pillow", "planet", "pond", "puppet", "rabbit", "raft", "ribbon", "robot",
    "rocket", "saddle", "sail", "scarf", "shell", "ship", "sled", "snail",
    "spoon", "squirrel", "stool", "stove", "sweater", "table", "teapot", "tent",
    "tiger", "torch", "tower", "tractor", "trumpet", "tulip", "turtle", "umbrella",
    "valley", "violin", "wagon", "wall", "whale", "wheel", "window", "wolf",
)  # fmt: skip

_KEYWORDS = (
    "amber", "autumn", "banner", "bramble", "breeze", "button", "canyon", "cedar",
    "cinnamon", "copper", "coral", "crystal", "dune", "ember", "fable", "fern",
    "forest", "frost", "glacier", "granite", "harvest", "hazel", "honey", "ivory",
    "jasmine", "journey", "lagoon", "maple", "marble", "meadow", "melody", "mint",
    "moss", "nectar", "ocean", "olive", "opal", "pearl", "pepper", "pine",
    "prairie", "quartz", "reef", "river", "saffron", "sand", "shadow", "silk",
    "silver", "spice", "stone", "summer", "sunset", "thunder", "timber", "velvet",
    "village", "willow", "wind", "wool",
)  # fmt: skip

# Shared by both splits: they appear in prompts of train and test alike.
_PLACES = (
    "at dawn", "at night", "in winter", "in spring", "in the rain", "after the storm",
    "at the fair", "on the shelf", "near the sea", "in the city", "on the farm", "in the attic",
)  # fmt: skip
_START_WORDS = ("Indeed", "Yes", "Well", "Sure", "Today", "Clearly", "Certainly", "Honestly")
_END_PHRASES = (
    "That is all.", "Thank you for reading.", "The end.", "Have a nice day.",
    "See you soon.", "Nothing more to say.", "That is my answer.", "Goodbye for now.",
)  # fmt: skip
_JSON_VALUES = {
    "color": ("red", "blue", "green", "yellow", "white", "black", "brown", "gray"),
    "size": ("small", "medium", "large", "tiny", "huge"),
    "mood": ("calm", "happy", "sleepy", "proud", "busy"),
    "shape": ("round", "square", "long", "flat", "curved"),
    "sound": ("loud", "soft", "silent", "sharp", "low"),
}

# Only in reference replies, never in prompts.
_ADJECTIVES = (
    "bright", "quiet", "small", "warm", "soft", "calm", "old", "tall", "round", "heavy",
    "clean", "green", "blue", "red", "happy", "gentle", "busy", "simple", "strong", "shiny",
    "smooth", "tiny", "wide", "sleepy", "lovely", "proud", "brave", "golden", "silent", "light",
)  # fmt: skip


def _split_pool(pool: Sequence[str], split: Split) -> tuple[str, ...]:
    return tuple(word for i, word in enumerate(pool) if (i % 4 == 3) == (split == "test"))


def content_words(split: Split) -> frozenset[str]:
    """The topic nouns and keywords that prompts of `split` may use (disjoint from the other split's)."""
    _check_split(split)
    return frozenset(_split_pool(_TOPIC_NOUNS, split) + _split_pool(_KEYWORDS, split))


@dataclass(frozen=True)
class _Pools:
    nouns: tuple[str, ...]
    keywords: tuple[str, ...]


def _pools(split: Split) -> _Pools:
    return _Pools(nouns=_split_pool(_TOPIC_NOUNS, split), keywords=_split_pool(_KEYWORDS, split))


# --- families: each builds (prompt, checks, reference) from a seeded rng and its split's pools ----

_Draft = tuple[str, dict[str, Any], str]


def _topic(rng: random.Random, pools: _Pools) -> tuple[str, str]:
    """A topic noun and the phrase the prompt uses for it, e.g. ("kite", "kite at dawn")."""
    noun = rng.choice(pools.nouns)
    return noun, noun if rng.random() < 0.4 else f"{noun} {rng.choice(_PLACES)}"


def _adjectives(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_ADJECTIVES, k)


def _join_quoted(words: Sequence[str]) -> str:
    quoted = [f'"{word}"' for word in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _json_object(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    keys = ["name", *rng.sample(sorted(_JSON_VALUES), rng.randint(1, 2))]
    rng.shuffle(keys)
    template = rng.choice(
        (
            "Reply with only a JSON object with the keys {keys} that describes the {topic}.",
            "Describe the {topic} as a JSON object with the keys {keys}. Output only the JSON.",
        )
    )
    values = {key: noun if key == "name" else rng.choice(_JSON_VALUES[key]) for key in keys}
    checks = {"json_object": True, "json_keys": keys}
    return template.format(keys=_join_quoted(keys), topic=topic), checks, json.dumps(values)


def _bullet_list(rng: random.Random, pools: _Pools) -> _Draft:
    _, topic = _topic(rng, pools)
    n = rng.randint(2, 5)
    template = rng.choice(
        (
            'List exactly {n} short facts about the {topic}, one per line, each starting with "- ".',
            'Give {n} bullet points about the {topic}. Start each line with "- ".',
        )
    )
    reference = "\n".join(f"- it is {adjective}" for adjective in _adjectives(rng, n))
    return template.format(n=n, topic=topic), {"bullet_count": n}, reference


def _uppercase(rng: random.Random, pools: _Pools) -> _Draft:
    # The reference does not repeat the topic: upper-casing a word never seen in training is a
    # different skill from following the instruction, and too hard for the demo's tiny model.
    _, topic = _topic(rng, pools)
    template = rng.choice(
        (
            "Describe the {topic} in one short sentence, written entirely in capital letters.",
            "Say something about the {topic}. Use only uppercase letters.",
            "Write a short sentence about the {topic} in all capital letters.",
        )
    )
    first, second = _adjectives(rng, 2)
    return template.format(topic=topic), {"all_uppercase": True}, f"IT IS {first} AND {second}.".upper()


def _wrap_in_quotes(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    template = rng.choice(
        (
            "Write one short sentence about the {topic} and wrap your whole reply in double quotation marks.",
            "Describe the {topic} in one sentence. Put your entire answer inside double quotes.",
        )
    )
    reference = f'"the {noun} is {rng.choice(_ADJECTIVES)}."'
    return template.format(topic=topic), {"wrapped_in_quotes": True}, reference


def _word_count_max(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    n = rng.randint(4, 12)
    template = rng.choice(
        (
            "Describe the {topic} in at most {n} words.",
            "Tell me about the {topic} using no more than {n} words.",
        )
    )
    first, second = _adjectives(rng, 2)
    reference = f"the {noun} is {first} and {second}." if n >= 6 else f"the {noun} is {first}."
    return template.format(topic=topic, n=n), {"max_words": n}, reference


def _end_with_phrase(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    phrase = rng.choice(_END_PHRASES)
    template = rng.choice(
        (
            'Write one sentence about the {topic}. End your reply with the exact phrase "{phrase}"',
            'Describe the {topic} briefly. Your reply must end with "{phrase}"',
        )
    )
    reference = f"the {noun} is {rng.choice(_ADJECTIVES)}. {phrase}"
    return template.format(topic=topic, phrase=phrase), {"ends_with": phrase}, reference


def _start_with_word(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    word = rng.choice(_START_WORDS)
    template = rng.choice(
        (
            'Describe the {topic} in one sentence. Start your reply with the word "{word}".',
            'Begin your answer with "{word}" and then say something about the {topic}.',
        )
    )
    reference = f"{word}, the {noun} is {rng.choice(_ADJECTIVES)}."
    return template.format(topic=topic, word=word), {"starts_with_word": word}, reference


def _include_keywords(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    first, second = rng.sample(pools.keywords, 2)
    template = rng.choice(
        (
            'Write one sentence about the {topic} that uses the words "{first}" and "{second}".',
            'Describe the {topic} and include the words "{first}" and "{second}" in your reply.',
        )
    )
    reference = f"the {noun} is near the {first} and the {second}."
    prompt = template.format(topic=topic, first=first, second=second)
    return prompt, {"includes_keywords": [first, second]}, reference


def _lowercase(rng: random.Random, pools: _Pools) -> _Draft:
    noun, topic = _topic(rng, pools)
    n = rng.randint(6, 12)
    template = rng.choice(
        (
            "Describe the {topic} in at most {n} words, using only lowercase letters.",
            "Write about the {topic} in lowercase letters only, in no more than {n} words.",
        )
    )
    first, second = _adjectives(rng, 2)
    checks = {"all_lowercase": True, "max_words": n}
    return template.format(topic=topic, n=n), checks, f"the {noun} is {first} and {second}."


@dataclass(frozen=True)
class Family:
    """A kind of instruction: `build` draws one (prompt, checks, reference) from a seeded rng."""

    name: str
    description: str
    build: Callable[[random.Random, _Pools], _Draft]


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("json_object", "reply is only a JSON object with exactly the given keys", _json_object),
        Family("bullet_list", 'reply has exactly N lines starting with "- "', _bullet_list),
        Family("uppercase", "reply is entirely in capital letters", _uppercase),
        Family("wrap_in_quotes", "reply starts and ends with a double quote", _wrap_in_quotes),
        Family("word_count_max", "reply has at most N words", _word_count_max),
        Family("end_with_phrase", "reply ends with an exact phrase", _end_with_phrase),
        Family("start_with_word", "reply's first word is a given word", _start_with_word),
        Family("include_keywords", "reply contains two given words", _include_keywords),
        Family("lowercase", "reply is all lowercase and at most N words", _lowercase),
    )
}

GROUPS: dict[str, tuple[str, ...]] = {
    "format": ("json_object", "bullet_list", "uppercase", "wrap_in_quotes"),
    "constraints": ("word_count_max", "end_with_phrase", "start_with_word", "include_keywords", "lowercase"),
}


def families_of(name: str) -> tuple[str, ...]:
    """The families a task name stands for: a group's families, or the family of that name."""
    if name in GROUPS:
        return GROUPS[name]
    if name in FAMILIES:
        return (name,)
    raise ValueError(
        f"unknown task {name!r}: give a family ({', '.join(FAMILIES)}) or a group ({', '.join(GROUPS)})"
    )


# --- items ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    """One prompt, the rule-based checks a reply must pass, and a reply that passes them."""

    id: str
    family: str
    prompt: str
    checks: dict[str, Any]
    reference: str


def verify(item: TaskItem, response: str) -> tuple[bool, dict[str, bool]]:
    """Score `response` (surrounding whitespace ignored): overall pass, and each check's outcome."""
    try:
        return check_reply(item.checks, response)
    except ValueError as error:
        raise ValueError(f"item {item.id!r}: {error}") from None


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check_families(families: Sequence[str]) -> None:
    if not families:
        raise ValueError(f"no families given; choose from: {', '.join(FAMILIES)}")
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from: {', '.join(FAMILIES)}")
    if len(set(families)) != len(families):
        raise ValueError(f"task families listed more than once: {list(families)}")


def _item_id(family: str, prompt: str) -> str:
    return f"{family}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


def _generate_family(family: Family, n: int, split: Split, seed: int) -> list[TaskItem]:
    # One rng per (seed, split, family): a family's items do not depend on which others are requested.
    rng = random.Random(f"tuneserve-tasks:{seed}:{split}:{family.name}")
    pools = _pools(split)
    items: list[TaskItem] = []
    seen: set[str] = set()
    for _ in range(20 * n + 100):
        if len(items) == n:
            break
        prompt, checks, reference = family.build(rng, pools)
        if prompt in seen:
            continue
        seen.add(prompt)
        item = TaskItem(_item_id(family.name, prompt), family.name, prompt, checks, reference)
        if not verify(item, reference)[0]:
            raise RuntimeError(f"bug in family {family.name!r}: reference fails its own checks: {item}")
        items.append(item)
    if len(items) < n:
        raise ValueError(
            f"family {family.name!r} has only about {len(items)} distinct {split} prompts; asked for {n}. "
            "Ask for fewer items."
        )
    return items


def generate(families: Sequence[str], n: int, split: Split, seed: int = 0) -> list[TaskItem]:
    """`n` items spread evenly over `families` (interleaved, so any prefix stays balanced).

    Deterministic in (families, n, split, seed); prompts are distinct within a split, and no test
    prompt can equal a train prompt because the two splits draw topics from disjoint word pools.
    """
    _check_families(families)
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = [n // len(families) + int(i < n % len(families)) for i in range(len(families))]
    per_family = [
        _generate_family(FAMILIES[name], count, split, seed)
        for name, count in zip(families, counts, strict=True)
    ]
    return [
        family_items[i] for i in range(max(counts)) for family_items in per_family if i < len(family_items)
    ]


def write_task_data(
    out_dir: Path, families: Sequence[str], n_train: int, n_test: int, seed: int = 0
) -> dict[str, Path]:
    """Write `train.jsonl` (chat records: user prompt, assistant reference) and `test.jsonl` (full items)."""
    train = generate(families, n_train, "train", seed)
    test = generate(families, n_test, "test", seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    with paths["train"].open("w", encoding="utf-8") as f:
        for item in train:
            messages = [
                {"role": "user", "content": item.prompt},
                {"role": "assistant", "content": item.reference},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    with paths["test"].open("w", encoding="utf-8") as f:
        for item in test:
            f.write(json.dumps(asdict(item)) + "\n")
    return paths


_ITEM_FIELDS = ("id", "family", "prompt", "checks", "reference")


def load_items(path: Path) -> list[TaskItem]:
    """Read items written by `write_task_data` (`test.jsonl`); errors name the file and line."""
    items: list[TaskItem] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or set(record) != set(_ITEM_FIELDS):
                raise ValueError(f"{where}: expected an object with exactly the fields {list(_ITEM_FIELDS)}")
            checks = record["checks"]
            if not isinstance(checks, dict) or not checks or set(checks) - set(CHECKS):
                raise ValueError(
                    f"{where}: 'checks' must be a non-empty object using only the checks {', '.join(CHECKS)}"
                )
            items.append(TaskItem(**{field: record[field] for field in _ITEM_FIELDS}))
    return items


# --- command line ------------------------------------------------------------------------------------


class TasksConfig(CommandSettings):
    """One `tasks` run: which families, how many items, where to."""

    out: Path = Field(description="directory to write into (created if missing)")
    families: list[str] | None = Field(
        None, description=f"comma-separated families (default: all): {', '.join(FAMILIES)}"
    )
    group: str | None = Field(None, description=f"a group of families: {', '.join(GROUPS)}")
    n_train: int = Field(2000, ge=0, description="training items")
    n_test: int = Field(200, ge=0, description="held-out test items")
    seed: int = Field(0, description="generator seed")

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str] | None) -> list[str] | None:
        return None if families is None else known_names(families, list(FAMILIES), "families")

    @field_validator("group")
    @classmethod
    def _known_group(cls, group: str | None) -> str | None:
        if group is not None and group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; choose from: {', '.join(GROUPS)}")
        return group

    @model_validator(mode="after")
    def _one_choice(self) -> TasksConfig:
        if self.families is not None and self.group is not None:
            raise ValueError("give --families or --group, not both")
        return self

    @property
    def chosen_families(self) -> list[str]:
        if self.group is not None:
            return list(GROUPS[self.group])
        return self.families if self.families is not None else list(FAMILIES)


def add_tasks_command(commands: Commands) -> None:
    add_command(
        commands,
        "tasks",
        TasksConfig,
        _run_tasks,
        help="write the generated instruction-following suite (train.jsonl and test.jsonl)",
        description="Write OUT/train.jsonl (chat records for fine-tuning) and OUT/test.jsonl (held-out "
        "items with their checks, for `bench --suite tasks`).",
    )


def _run_tasks(config: TasksConfig) -> int:
    families = config.chosen_families
    paths = write_task_data(config.out, families, config.n_train, config.n_test, seed=config.seed)
    print(f"families: {', '.join(families)}")
    print(f"train: {config.n_train} items -> {paths['train']}")
    print(f"test: {config.n_test} items -> {paths['test']}")
    return 0
