"""The benchmark suites `bench` runs: generated tasks, IFEval, reference outputs and MT-Bench.

Each implements `client.suite.Suite`; `build_suite` loads one from its data (a file, a folder or a hub id).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from client.suite import BenchPrompt, Suite, SuiteResult
from client.tasks import TaskItem, verify
from tuneserve.jsonl import read_jsonl
from tuneserve.stats import PairedInterval, paired_bootstrap_of

if TYPE_CHECKING:
    from client.ifeval import IFEvalItem

logger = logging.getLogger(__name__)

SuiteName = Literal["ifeval", "tasks", "reference", "mtbench"]
SUITE_NAMES: tuple[SuiteName, ...] = get_args(SuiteName)
IFEVAL_HUB_ID = "google/IFEval"

# A judge takes a batch of conversations (OpenAI chat messages) and returns the judge's reply to each.
Judge = Callable[[Sequence[list[dict[str, str]]]], list[str]]


class SuiteDataError(ValueError):
    """The data given for a suite is missing or malformed; the message says which file and what to do."""


def packaged_data_dir() -> Path:
    """The benchmark data shipped inside the `client` package (IFEval, MT-Bench; see its NOTICE.md)."""
    return Path(str(files("client") / "data"))


def default_data(suite: str) -> str:
    """Where `--data` points when it is not given; raises SuiteDataError for suites that need it."""
    if suite == "ifeval":
        return str(packaged_data_dir() / "ifeval" / "input_data.jsonl")
    if suite == "mtbench":
        return str(packaged_data_dir() / "mtbench")
    raise SuiteDataError(f"--suite {suite} needs --data (a file or, for reference, a hub dataset id)")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _read_jsonl(path: Path) -> list[Any]:
    return [record for _, record in read_jsonl(path)]


# --- tasks: the project's generated verifiable instructions --------------------------------------


class TasksSuite:
    """Held-out items of `client.tasks` (`test.jsonl`), each passed or failed by its rule-based checks."""

    name = "tasks"

    def __init__(self, items: Sequence[TaskItem]) -> None:
        self.items = list(items)

    def prompts(self) -> list[BenchPrompt]:
        return [
            BenchPrompt(id=item.id, turns=(item.prompt,), meta={"family": item.family}) for item in self.items
        ]

    def score(self, responses: dict[str, list[str]]) -> SuiteResult:
        outcomes: list[dict[str, Any]] = []
        by_family: dict[str, list[bool]] = defaultdict(list)
        for item in self.items:
            response = responses[item.id][0]
            passed, checks = verify(item, response)
            by_family[item.family].append(passed)
            outcomes.append(
                {
                    "id": item.id,
                    "family": item.family,
                    "prompt": item.prompt,
                    "responses": [response],
                    "passed": passed,
                    "checks": checks,
                }
            )
        return SuiteResult(
            suite=self.name,
            metrics={"accuracy": _mean([passed for family in by_family.values() for passed in family])},
            breakdown={
                family: {"accuracy": _mean(passed), "count": len(passed)}
                for family, passed in by_family.items()
            },
            items=outcomes,
        )


# --- ifeval: Google's IFEval, scored by client.ifeval --------------------------------------------


class IFEvalSuite:
    """IFEval prompts; strict and loose accuracy, per prompt and per instruction (client.ifeval scores)."""

    name = "ifeval"

    def __init__(self, items: Sequence[IFEvalItem]) -> None:
        self.items = list(items)

    def prompts(self) -> list[BenchPrompt]:
        return [BenchPrompt(id=str(item.key), turns=(item.prompt,)) for item in self.items]

    def score(self, responses: dict[str, list[str]]) -> SuiteResult:
        from client.ifeval import evaluate

        by_prompt = {item.prompt: responses[str(item.key)][0] for item in self.items}
        scores = evaluate(self.items, by_prompt)
        return SuiteResult(
            suite=self.name,
            metrics={
                "prompt_strict": scores.prompt_strict,
                "prompt_loose": scores.prompt_loose,
                "instruction_strict": scores.instruction_strict,
                "instruction_loose": scores.instruction_loose,
            },
            breakdown={kind: dict(values) for kind, values in scores.per_type.items()},
            items=[
                {
                    "id": str(outcome.key),
                    "prompt": outcome.prompt,
                    "responses": [outcome.response],
                    "instruction_id_list": list(outcome.instruction_id_list),
                    "prompt_strict": outcome.prompt_strict,
                    "prompt_loose": outcome.prompt_loose,
                    "follow_strict": list(outcome.follow_strict),
                    "follow_loose": list(outcome.follow_loose),
                }
                for outcome in scores.outcomes
            ],
        )


# --- reference: any records with a reference output ----------------------------------------------


@dataclass(frozen=True)
class ReferenceItem:
    id: str
    prompt: str
    reference: str
    system: str | None = None


def normalize_text(text: str) -> str:
    """What exact match compares: case folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per pair (rouge-score's tokenizer: lowercase alphanumeric tokens, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (default 13a tokenizer), divided by 100 to share the [0, 1] scale."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) / 100


def paired_bleu(
    baseline_items: Sequence[dict[str, Any]], model_items: Sequence[dict[str, Any]], *, seed: int = 0
) -> PairedInterval | None:
    """The paired bootstrap interval of the difference in corpus BLEU (on the [0, 1] scale) between two
    models' replies to the same reference items (paired by id). Each reply's BLEU sufficient statistics
    (n-gram matches and totals, lengths) are taken once with sacrebleu; a resample's corpus BLEU is
    sacrebleu's score of their sums, as sacrebleu's own paired bootstrap computes it."""
    from sacrebleu.metrics import BLEU

    model_by_id = {str(item["id"]): item for item in model_items}
    pairs = [
        (b, model_by_id[str(b["id"])])
        for b in baseline_items
        if "reference" in b and b.get("responses") and model_by_id.get(str(b["id"]), {}).get("responses")
    ]
    if not pairs:
        return None
    import numpy as np

    bleu = BLEU()
    references = [[str(b["reference"]) for b, _ in pairs]]
    baseline_stats = np.array(
        bleu._extract_corpus_statistics([str(b["responses"][0]) for b, _ in pairs], references)
    )
    model_stats = np.array(
        bleu._extract_corpus_statistics([str(m["responses"][0]) for _, m in pairs], references)
    )

    def score(stats: Any, indices: Any) -> float:
        return float(bleu._compute_score_from_stats(stats[indices].sum(axis=0).tolist()).score) / 100

    everything = np.arange(len(pairs))
    return paired_bootstrap_of(
        len(pairs),
        score(baseline_stats, everything),
        score(model_stats, everything),
        lambda indices: score(model_stats, indices) - score(baseline_stats, indices),
        seed=seed,
    )


def _reference_item(record: Any, index: int) -> ReferenceItem | None:
    """One record in any of the three shapes; None for a multi-turn chat (no single prompt to send)."""
    item_id = str(index)
    if not isinstance(record, dict):
        raise SuiteDataError(f"record {index}: expected an object, got {type(record).__name__}")
    if "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        return ReferenceItem(item_id, prompt, str(record["output"]))
    if "messages" in record:
        messages = record["messages"]
        system = None
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0]["content"], messages[1:]
        roles = [message.get("role") for message in messages]
        if roles != ["user", "assistant"]:
            if len(roles) > 2 and roles[-1] == "assistant":
                return None
            raise SuiteDataError(
                f"record {index}: 'messages' must be [system?, user, assistant], the assistant turn being "
                f"the reference; got roles {roles}"
            )
        return ReferenceItem(item_id, messages[0]["content"], messages[1]["content"], system)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return ReferenceItem(item_id, record["prompt"], record["completion"])
    raise SuiteDataError(
        f"record {index}: expected alpaca fields instruction/input/output, chat 'messages' ending with the "
        f"assistant reference, or prompt/completion strings; got fields {sorted(record)}"
    )


def _load_reference_records(source: str) -> list[Any]:
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise SuiteDataError(
                f"{path}: not valid JSON ({err}); use .jsonl for one record per line"
            ) from err
        if not isinstance(data, list):
            raise SuiteDataError(f"{path}: expected a JSON list of records")
        return data
    if path.exists() or source.startswith((".", "/")) or source.endswith((".json", ".jsonl")):
        raise SuiteDataError(f"--data {source}: no such JSON/JSONL file")
    import datasets

    hub_id, _, split = source.partition(":")
    try:
        return list(datasets.load_dataset(hub_id, split=split or "test"))
    except ValueError as err:
        raise SuiteDataError(f"--data {source}: {err}; name the split as HUB_ID:SPLIT") from err


class ReferenceSuite:
    """Replies compared with reference outputs: exact match, ROUGE-L F1 and corpus BLEU.

    The whole file (or hub split) given is the held-out set: hold it out of training yourself.
    """

    name = "reference"

    def __init__(self, items: Sequence[ReferenceItem]) -> None:
        self.items = list(items)

    @classmethod
    def load(cls, source: str, limit: int | None = None) -> ReferenceSuite:
        """Records from a local .json/.jsonl file, or a hub dataset `ID[:SPLIT]` (split "test" by default)."""
        items = []
        skipped = 0
        for index, record in enumerate(_load_reference_records(source)):
            item = _reference_item(record, index)
            if item is None:
                skipped += 1
            else:
                items.append(item)
        if skipped:
            logger.warning(
                "%s: skipped %d multi-turn chat record(s); only single-turn ones are scored", source, skipped
            )
        if not items:
            raise SuiteDataError(f"--data {source}: no single-turn records with a reference output")
        return cls(items[:limit])

    def prompts(self) -> list[BenchPrompt]:
        return [BenchPrompt(id=item.id, turns=(item.prompt,), system=item.system) for item in self.items]

    def score(self, responses: dict[str, list[str]]) -> SuiteResult:
        predictions = [responses[item.id][0] for item in self.items]
        references = [item.reference for item in self.items]
        matches = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
        rouge = rouge_l_f1(predictions, references)
        return SuiteResult(
            suite=self.name,
            metrics={
                "exact_match": _mean(matches),
                "rouge_l": _mean(rouge),
                "bleu": corpus_bleu(predictions, references),
            },
            breakdown={},
            items=[
                {
                    "id": item.id,
                    "prompt": item.prompt,
                    "reference": item.reference,
                    "responses": [prediction],
                    "exact_match": match,
                    "rouge_l": score,
                }
                for item, prediction, match, score in zip(
                    self.items, predictions, matches, rouge, strict=True
                )
            ],
        )


# --- mtbench: two-turn questions graded 1-10 by a judge model ------------------------------------

# As FastChat's llm_judge: these categories are judged against GPT-4's reference answers.
NEEDS_REFERENCE = ("math", "reasoning", "coding")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str) -> float | None:
    """The judge's "[[rating]]" (FastChat also accepts "[rating]"); None when absent or outside 1-10."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if match is None:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str


class MTBenchSuite:
    """MT-Bench: 80 two-turn questions, each turn rated 1-10 by `judge` (FastChat's single-answer prompts)."""

    name = "mtbench"

    def __init__(
        self, questions: Sequence[MTBenchQuestion], judge_prompts: dict[str, JudgePrompt], judge: Judge
    ) -> None:
        self.questions = list(questions)
        self.judge_prompts = judge_prompts
        self.judge = judge

    @classmethod
    def load(cls, folder: Path, judge: Judge, limit: int | None = None) -> MTBenchSuite:
        """FastChat's question.jsonl, judge_prompts.jsonl and reference_answer_gpt-4.jsonl from `folder`."""
        paths = {
            name: folder / name
            for name in ("question.jsonl", "judge_prompts.jsonl", "reference_answer_gpt-4.jsonl")
        }
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise SuiteDataError(
                f"MT-Bench data missing: {', '.join(missing)}; pass --data with FastChat's folder"
            )
        references = {
            record["question_id"]: tuple(record["choices"][0]["turns"][:2])
            for record in _read_jsonl(paths["reference_answer_gpt-4.jsonl"])
        }
        judge_prompts = {
            record["name"]: JudgePrompt(record["name"], record["system_prompt"], record["prompt_template"])
            for record in _read_jsonl(paths["judge_prompts.jsonl"])
        }
        needed = ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")
        if missing_prompts := [name for name in needed if name not in judge_prompts]:
            raise SuiteDataError(f"{paths['judge_prompts.jsonl']}: no judge prompt(s) {missing_prompts}")
        questions = []
        for record in _read_jsonl(paths["question.jsonl"]):
            category = record["category"]
            reference = references.get(record["question_id"]) if category in NEEDS_REFERENCE else None
            if category in NEEDS_REFERENCE and reference is None:
                raise SuiteDataError(f"question {record['question_id']} ({category}) has no reference answer")
            turns = tuple(record["turns"])
            if len(turns) != 2:
                raise SuiteDataError(f"question {record['question_id']}: expected 2 turns, got {len(turns)}")
            questions.append(MTBenchQuestion(record["question_id"], category, turns, reference))
        return cls(questions[:limit], judge_prompts, judge)

    def prompts(self) -> list[BenchPrompt]:
        return [
            BenchPrompt(id=str(q.question_id), turns=q.turns, meta={"category": q.category})
            for q in self.questions
        ]

    def judge_messages(
        self, question: MTBenchQuestion, answers: Sequence[str], turn: int
    ) -> list[dict[str, str]]:
        """The judge conversation for one turn (1 or 2) of one answer, as FastChat builds it."""
        math = question.reference is not None
        name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if turn == 2 else "")
        prompt = self.judge_prompts[name]
        fields: dict[str, str] = {}
        if turn == 1:
            fields = {"question": question.turns[0], "answer": answers[0]}
        else:
            fields = {
                "question_1": question.turns[0],
                "question_2": question.turns[1],
                "answer_1": answers[0],
                "answer_2": answers[1],
            }
        if question.reference is not None:
            fields |= {"ref_answer_1": question.reference[0], "ref_answer_2": question.reference[1]}
        return [
            {"role": "system", "content": prompt.system_prompt},
            {"role": "user", "content": prompt.prompt_template.format(**fields)},
        ]

    def score(self, responses: dict[str, list[str]]) -> SuiteResult:
        requests = [
            self.judge_messages(question, responses[str(question.question_id)], turn)
            for question in self.questions
            for turn in (1, 2)
        ]
        judgments = self.judge(requests)
        items = []
        ratings: dict[int, list[float]] = {1: [], 2: []}
        by_category: dict[str, dict[int, list[float]]] = defaultdict(lambda: {1: [], 2: []})
        for index, question in enumerate(self.questions):
            pair = judgments[2 * index : 2 * index + 2]
            turn_ratings = [parse_rating(judgment) for judgment in pair]
            for turn, rating in enumerate(turn_ratings, start=1):
                if rating is not None:
                    ratings[turn].append(rating)
                    by_category[question.category][turn].append(rating)
            items.append(
                {
                    "id": str(question.question_id),
                    "category": question.category,
                    "turns": list(question.turns),
                    "responses": responses[str(question.question_id)],
                    "judgments": pair,
                    "ratings": turn_ratings,
                }
            )
        unparsed = sum(rating is None for item in items for rating in item["ratings"])
        if unparsed:
            logger.warning(
                "the judge gave no [[rating]] in %d of %d judgments; they are left out",
                unparsed,
                len(requests),
            )
        return SuiteResult(
            suite=self.name,
            metrics={
                "turn_1": _mean(ratings[1]),
                "turn_2": _mean(ratings[2]),
                "overall": _mean(ratings[1] + ratings[2]),
            },
            breakdown={
                category: {
                    "turn_1": _mean(turns[1]),
                    "turn_2": _mean(turns[2]),
                    "overall": _mean(turns[1] + turns[2]),
                    "count": sum(q.category == category for q in self.questions),
                }
                for category, turns in by_category.items()
            },
            items=items,
        )


# --- building a suite from the command line's --suite and --data ----------------------------------


def build_suite(name: str, data: str | None, limit: int | None = None, judge: Judge | None = None) -> Suite:
    """The suite `name` loaded from `data` (None: the suite's default), first `limit` items only."""
    source = data if data is not None else default_data(name)
    if name == "tasks":
        from client.tasks import load_items

        path = Path(source)
        if not path.is_file():
            raise SuiteDataError(f"--data {source}: no such file; write one with `python -m client tasks`")
        try:
            return TasksSuite(load_items(path)[:limit])
        except ValueError as err:
            raise SuiteDataError(str(err)) from err
    if name == "ifeval":
        from client import ifeval

        return IFEvalSuite(ifeval.load_items(source, limit))
    if name == "reference":
        return ReferenceSuite.load(source, limit)
    if name == "mtbench":
        if judge is None:
            raise ValueError("the mtbench suite needs a judge")
        return MTBenchSuite.load(Path(source), judge, limit)
    raise SuiteDataError(f"unknown suite {name!r}; choose from: {', '.join(SUITE_NAMES)}")
