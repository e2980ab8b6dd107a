"""The generated task suite: determinism, train/test disjointness, the checks, files and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from client import tasks
from client.__main__ import main
from client.tasks import FAMILIES, GROUPS, TaskItem, generate, load_items, verify, write_task_data
from tuneserve import checks

ALL_FAMILIES = list(FAMILIES)
# What an untuned base model does: rambles on in mixed case, with commas, past any word limit.
RAMBLE = (
    "The old mill stood by the road, and the wind kept blowing over the hills all night long "
    "while nobody came to"
)


def _near_misses(item: TaskItem) -> list[str]:
    """Replies that almost follow the instruction: each must fail."""
    ref = item.reference
    checks = item.checks
    match item.family:
        case "json_object":
            obj = json.loads(ref)
            dropped = dict(list(obj.items())[:-1])
            return [json.dumps(dropped), f"```json\n{ref}\n```", f"Here it is: {ref}", json.dumps([obj])]
        case "bullet_list":
            lines = ref.splitlines()
            return [
                "\n".join(lines[:-1]),
                ref + "\n- it is more",
                ref.replace("- ", "* "),
                ref.replace("\n", " "),
            ]
        case "uppercase":
            return [ref.capitalize(), ref + " ok", "123."]
        case "wrap_in_quotes":
            return [ref[1:], ref[:-1], ref.strip('"'), '""', f"{ref} said."]
        case "word_count_max":
            return [" ".join(["word"] * (checks["max_words"] + 1))]
        case "end_with_phrase":
            return [ref[:-1], ref + " Bye.", ref.lower()]
        case "start_with_word":
            return [ref.split(" ", 1)[1], "So " + ref, ref.split(",", 1)[0] + "s" + ref.split(",", 1)[1]]
        case "include_keywords":
            second = checks["includes_keywords"][1]
            return [ref.replace(second, "lake"), ref.replace(f"{second}.", f"{second}s.")]
        case "lowercase":
            too_long = " ".join(["word"] * (checks["max_words"] + 1))
            return [ref.capitalize(), too_long, ref.upper()]
    raise AssertionError(f"no near misses written for family {item.family!r}")


def test_families_and_groups_are_consistent() -> None:
    assert len(FAMILIES) >= 6
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(FAMILIES), "every family belongs to exactly one group"
    assert all(name == family.name for name, family in FAMILIES.items())


def test_generate_is_deterministic_and_seeded() -> None:
    first = generate(ALL_FAMILIES, 90, "train", seed=3)
    assert first == generate(ALL_FAMILIES, 90, "train", seed=3)
    assert [item.prompt for item in first] != [item.prompt for item in generate(ALL_FAMILIES, 90, "train", 4)]


def test_a_family_does_not_depend_on_the_others_requested() -> None:
    alone = generate(["uppercase"], 10, "test")
    mixed = [
        item for item in generate(["json_object", "uppercase"], 20, "test") if item.family == "uppercase"
    ]
    assert alone == mixed


def test_items_spread_evenly_and_interleave() -> None:
    items = generate(["json_object", "bullet_list", "uppercase"], 10, "train")
    assert Counter(item.family for item in items) == {"json_object": 4, "bullet_list": 3, "uppercase": 3}
    assert [item.family for item in items[:3]] == ["json_object", "bullet_list", "uppercase"]
    assert generate(ALL_FAMILIES, 0, "test") == []


def test_prompts_and_ids_are_unique_within_a_split() -> None:
    items = generate(ALL_FAMILIES, 2000, "train")
    assert len({item.prompt for item in items}) == len(items)
    assert len({item.id for item in items}) == len(items)
    assert all(item.id.startswith(f"{item.family}-") for item in items)


def test_train_and_test_are_disjoint() -> None:
    train_words, test_words = tasks.content_words("train"), tasks.content_words("test")
    assert train_words and test_words and not train_words & test_words

    train = generate(ALL_FAMILIES, 3000, "train")
    test = generate(ALL_FAMILIES, 500, "test")
    assert not {item.id for item in train} & {item.id for item in test}
    assert not {item.prompt for item in train} & {item.prompt for item in test}

    def words(items: list[TaskItem]) -> set[str]:
        return {word for item in items for word in re.findall(r"[a-z]+", item.prompt.lower())}

    # Structural: a content word of one split never appears in a prompt of the other.
    assert not words(test) & train_words
    assert not words(train) & test_words
    # Every test prompt names a topic that no training prompt uses.
    assert all(words([item]) & test_words for item in test)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_references_pass_and_wrong_replies_fail(family: str) -> None:
    for split in ("train", "test"):
        for item in generate([family], 25, split, seed=1):
            passed, outcomes = verify(item, item.reference)
            assert passed, (item, outcomes)
            assert set(outcomes) == set(item.checks)
            assert verify(item, f"\n  {item.reference}  \n")[0], "surrounding whitespace is ignored"
            for wrong in [RAMBLE, "", *_near_misses(item)]:
                assert not verify(item, wrong)[0], (item.prompt, wrong)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_references_are_short(family: str) -> None:
    # A tiny model on CPU must learn and generate these quickly (~60 tokens at most).
    assert all(len(item.reference.split()) <= 20 for item in generate([family], 200, "train"))


def test_verify_reports_each_check() -> None:
    item = TaskItem("x", "lowercase", "p", {"all_lowercase": True, "max_words": 3}, "a b c")
    assert verify(item, "a b c") == (True, {"all_lowercase": True, "max_words": True})
    assert verify(item, "A b") == (False, {"all_lowercase": False, "max_words": True})
    assert verify(item, "a b c d") == (False, {"all_lowercase": True, "max_words": False})


def test_check_details() -> None:
    assert checks.check_starts_with_word("Indeed, it is.", "Indeed")
    assert checks.check_starts_with_word("indeed it is.", "Indeed")
    assert not checks.check_starts_with_word("Indeedy it is.", "Indeed")
    assert checks.check_json_keys('{"b": 1, "a": 2}', ["a", "b"])
    assert not checks.check_json_keys('{"a": 1, "b": 2, "c": 3}', ["a", "b"])
    assert checks.check_bullet_count("Here:\n- one\n  - two", 2)
    assert not checks.check_bullet_count("- one\n- ", 2)
    assert checks.check_includes_keywords("The River and GOLD.", ["river", "gold"])
    assert not checks.check_includes_keywords("rivers of gold", ["river", "gold"])


def test_verify_rejects_unknown_checks() -> None:
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        verify(TaskItem("x", "f", "p", {"nope": True}, "r"), "r")


@pytest.mark.parametrize(
    ("families", "n", "split", "message"),
    [
        (["nope"], 1, "train", "unknown task families"),
        ([], 1, "train", "no families"),
        (["uppercase", "uppercase"], 1, "train", "more than once"),
        (["uppercase"], -1, "train", "n must be"),
        (["uppercase"], 1, "dev", "split must be"),
    ],
)
def test_generate_rejects_bad_arguments(families: list[str], n: int, split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(families, n, split, 0)  # type: ignore[arg-type]


def test_write_task_data_round_trip(tmp_path: Path) -> None:
    paths = write_task_data(
        tmp_path / "data", ["json_object", "end_with_phrase"], n_train=30, n_test=8, seed=2
    )
    assert paths == {"train": tmp_path / "data" / "train.jsonl", "test": tmp_path / "data" / "test.jsonl"}

    train_records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    expected_train = generate(["json_object", "end_with_phrase"], 30, "train", seed=2)
    assert train_records == [
        {
            "messages": [
                {"role": "user", "content": item.prompt},
                {"role": "assistant", "content": item.reference},
            ]
        }
        for item in expected_train
    ]
    assert load_items(paths["test"]) == generate(["json_object", "end_with_phrase"], 8, "test", seed=2)


def test_load_items_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    good = json.dumps(
        {"id": "a", "family": "uppercase", "prompt": "p", "checks": {"all_uppercase": True}, "reference": "A"}
    )
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: not valid JSON"):
        load_items(path)
    path.write_text(good + "\n" + json.dumps({"id": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: expected an object"):
        load_items(path)


def test_cli_writes_the_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "suite"
    assert main(["tasks", "--out", str(out), "--group", "format", "--n-train", "40", "--n-test", "8"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "train.jsonl") in printed and str(out / "test.jsonl") in printed
    assert len((out / "train.jsonl").read_text().splitlines()) == 40
    items = load_items(out / "test.jsonl")
    assert len(items) == 8 and {item.family for item in items} == set(GROUPS["format"])

    assert main(["tasks", "--out", str(out), "--families", "uppercase,lowercase", "--n-test", "4"]) == 0
    assert {item.family for item in load_items(out / "test.jsonl")} == {"uppercase", "lowercase"}


@pytest.mark.parametrize(
    ("option", "value", "listed"),
    [("--group", "nope", ", ".join(GROUPS)), ("--families", "uppercase,nope", ", ".join(FAMILIES))],
)
def test_cli_rejects_unknown_names(
    tmp_path: Path, usage_error: Callable[[list[str]], str], option: str, value: str, listed: str
) -> None:
    assert listed in usage_error(["tasks", "--out", str(tmp_path), option, value])
    assert not (tmp_path / "train.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-train", "-1"], "--n-train: Input should be greater than or equal to 0 (got -1)"),
        (["--n-test", "many"], "--n-test: Input should be a valid integer"),
        (["--group", "format", "--families", "uppercase"], "give --families or --group, not both"),
        (["--families", "uppercase,uppercase"], "--families: lists one of the families more than once"),
    ],
)
def test_cli_names_the_bad_flag(
    tmp_path: Path, usage_error: Callable[[list[str]], str], argv: list[str], message: str
) -> None:
    assert message in usage_error(["tasks", "--out", str(tmp_path), *argv])


def test_client_imports_nothing_heavy() -> None:
    code = (
        "import sys, client.__main__, client.tasks; "
        "print(sorted(m for m in ('torch', 'transformers', 'finetune', 'serve') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
