"""`client distill`: rewrites checked by IFEval's checkers, held-out prompts, and no overlap with IFEval.

The slow test at the end asks the real server (the tiny base) and writes the data end to end.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from client.__main__ import main as client_main
from client.distill import (
    CONSTRAINTS,
    OVERLAP_N,
    Answer,
    FamilyCounts,
    NgramIndex,
    build_test,
    build_train,
    ifeval_index,
    questions,
    write_distilled,
)
from client.ifeval import load_items
from tests.e2e import API_KEY, Server
from tuneserve.ifeval.evaluation import score_item

ANSWER = (
    "Volcanoes are openings in the crust of a planet, where molten rock, ash and gases escape. "
    "They form where tectonic plates meet or over hot spots. Eruptions can build mountains, "
    "create new land and, sometimes, threaten nearby towns."
)
QUESTION = "Explain volcanoes in a few sentences."


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_each_rewrite_follows_its_constraint_and_the_plain_answer_does_not(name: str) -> None:
    constraint = CONSTRAINTS[name]
    rng = random.Random(0)
    for split in ("train", "test"):
        phrasing, kwargs = constraint.draw(QUESTION, split, rng)
        assert phrasing.strip() and "{" not in phrasing, phrasing
        rewritten = constraint.rewrite(QUESTION, ANSWER, kwargs, rng)
        assert rewritten is not None
        assert constraint.follows(rewritten, kwargs), (name, rewritten)
        assert not constraint.follows(ANSWER, kwargs), name  # the data teaches something the base lacks


def test_bullets_need_enough_sentences() -> None:
    bullets = CONSTRAINTS["bullets"]
    assert bullets.rewrite(QUESTION, "One sentence only.", {"num_bullets": 3}, random.Random(0)) is None
    three = bullets.rewrite(QUESTION, ANSWER, {"num_bullets": 3}, random.Random(0))
    assert three is not None and three.count("\n* ") == 2 and three.startswith("* ")


def test_splits_share_no_topic_and_no_phrasing() -> None:
    train, test = set(questions("train")), set(questions("test"))
    assert train and test and not train & test
    for constraint in CONSTRAINTS.values():
        assert not set(constraint.phrasings["train"]) & set(constraint.phrasings["test"]), constraint.name
    # Phrases to end with are held out too; bullet counts (2-4) are shared, as numbers are.
    end_phrases = CONSTRAINTS["end_phrase"].values
    assert not set(end_phrases["train"]) & set(end_phrases["test"])


def test_no_phrasing_or_question_shares_an_8_gram_with_ifeval() -> None:
    index = ifeval_index()
    texts = [*questions("train"), *questions("test")]
    for constraint in CONSTRAINTS.values():
        for split in ("train", "test"):
            for phrasing in constraint.phrasings[split]:
                values = constraint.values.get(split, ("x",))  # type: ignore[call-overload]
                texts += [phrasing.format(value=value) for value in values]
    overlap = index.overlap(texts)
    assert overlap.sharing == 0, overlap
    assert overlap.longest < OVERLAP_N


def test_ngram_index_finds_the_longest_shared_run() -> None:
    index = NgramIndex(["Write a poem about the sea, in all capital letters please."], max_n=8)
    assert index.longest_shared("Answer in all capital letters please!") == (
        5,
        "in all capital letters please",
    )
    assert index.longest_shared("nothing in common here") == (1, "in")
    assert index.longest_shared("zzz") == (0, "")
    # A prompt copied from the reference is caught at the cap.
    overlap = index.overlap(["Write a poem about the sea, in all capital letters please.", "zzz"], n=8)
    assert (overlap.sharing, overlap.longest, overlap.prompts) == (1, 8, 2)


def _answers() -> list[Answer]:
    pool = questions("train")
    complete = [Answer(question, ANSWER, "stop") for question in pool[:30]]
    truncated = [Answer(question, ANSWER, "length") for question in pool[30:40]]
    short = [Answer(question, "Too short.", "stop") for question in pool[40:45]]
    return complete + truncated + short


def test_train_records_use_only_complete_answers_and_pass_the_checker() -> None:
    counts = FamilyCounts()
    constraint = CONSTRAINTS["quotation"]
    records = build_train(constraint, _answers(), 20, seed=0, index=None, counts=counts)
    assert len(records) == counts.train == 20 and counts.answers == 20
    for record in records:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].split(" ", 1)[0] in {q.split(" ", 1)[0] for q in questions("train")}
        assert assistant["content"] == f'"{ANSWER}"'
    assert build_train(constraint, _answers(), 20, seed=0, index=None, counts=FamilyCounts()) == records
    # Only 30 complete answers: asking for more gives 30, counted.
    assert len(build_train(constraint, _answers(), 50, seed=0, index=None, counts=FamilyCounts())) == 30


def test_train_prompts_that_overlap_ifeval_are_dropped_and_counted() -> None:
    constraint = CONSTRAINTS["uppercase"]
    everything = NgramIndex(
        [answer.question + " " + p for answer in _answers() for p in constraint.phrasings["train"]]
    )
    counts = FamilyCounts()
    assert build_train(constraint, _answers(), 10, seed=0, index=everything, counts=counts) == []
    assert counts.ifeval_overlap == 30


def test_held_out_prompts_are_ifeval_items_scored_by_ifeval(tmp_path: Path) -> None:
    items = build_test(CONSTRAINTS["end_phrase"], 5, seed=0, key_base=900_000)
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    loaded = load_items(path)
    assert [item.key for item in loaded] == list(range(900_000, 900_005))
    test_topics = set(questions("test"))
    for item in loaded:
        assert any(item.prompt.startswith(question) for question in test_topics)
        phrase = item.kwargs[0]["end_phrase"]
        assert phrase in CONSTRAINTS["end_phrase"].values["test"]
        assert score_item(item, f"Some answer.\n\n{phrase}").prompt_strict
        assert not score_item(item, "Some answer.").prompt_strict
    with pytest.raises(ValueError, match="only"):
        build_test(CONSTRAINTS["end_phrase"], 10_000, seed=0, key_base=0)


def test_write_distilled_lays_out_families_mix_and_stats(tmp_path: Path) -> None:
    stats = write_distilled(
        tmp_path, ["uppercase", "json"], _answers(), n_train=12, n_test=4, meta={"model": "m"}
    )
    for family in ("uppercase", "json"):
        assert len((tmp_path / family / "train.jsonl").read_text().splitlines()) == 12
        assert len(load_items(tmp_path / family / "test.jsonl")) == 4
    mixed = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(mixed) == 24
    assert mixed[0]["messages"][1]["content"].isupper() and json.loads(mixed[1]["messages"][1]["content"])
    assert len(load_items(tmp_path / "test.jsonl")) == 8  # keys stay unique across families
    assert stats["model"] == "m" and stats["train_items"] == 24 and stats["complete_answers"] == 30
    assert stats["ifeval_overlap"]["train"]["sharing"] == 0
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--families", "nope"], "--families: unknown constraint families ['nope']; choose from: uppercase"),
        (["--n-train", "0"], "--n-train: Input should be greater than or equal to 1 (got 0)"),
        (["--concurrency", "0"], "--concurrency: Input should be greater than or equal to 1 (got 0)"),
        (["--questions", "100000"], "--questions must be between 1 and "),
        (["--n-train", "1000"], "--questions must be between 1 and "),  # 1000 + a third is too many
    ],
)
def test_cli_names_the_bad_flag(
    argv: list[str], message: str, usage_error: Callable[[list[str]], str]
) -> None:
    assert message in usage_error(
        ["distill", "--base-url", "http://x/v1", "--model", "m", "--out", "o", *argv]
    )


@pytest.mark.slow
def test_distill_against_the_real_server(server: Server, tmp_path: Path) -> None:
    """The tiny base answers; whatever it says, every kept item passes IFEval's checker and the CLI reports
    the counts. A second run answers from the cache."""
    out = tmp_path / "distill"
    argv = [
        "distill",
        "--base-url",
        f"{server.url}/v1",
        "--api-key",
        API_KEY,
        "--model",
        server.base_model,
    ]
    argv += ["--families", "lowercase,quotation", "--out", str(out), "--n-train", "8", "--n-test", "4"]
    argv += ["--questions", "12", "--max-tokens", "64"]
    assert client_main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["questions_asked"] == 12
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {answer["finish_reason"] for answer in answers} <= {"stop", "length"}
    for family in ("lowercase", "quotation"):
        counts = stats["families"][family]
        records = [json.loads(line) for line in (out / family / "train.jsonl").read_text().splitlines()]
        assert len(records) == counts["train"] <= 8
        constraint = CONSTRAINTS[family]
        for record in records:
            assert constraint.follows(record["messages"][1]["content"], {})
    cache_lines = (out / "cache" / "responses.jsonl").read_text().splitlines()
    assert len(cache_lines) == 12
    assert client_main(argv) == 0
    assert (out / "cache" / "responses.jsonl").read_text().splitlines() == cache_lines
