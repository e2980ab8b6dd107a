"""`python -m client generate`: the filters one by one, the seed file's errors, and a whole run against the
real server on SmolLM2 (the counts add up, every kept task passes the filters, every constrained answer
passes IFEval's checker, a rerun is answered from the cache, and `finetune` reads the data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.__main__ import main
from client.cli import UsageError
from client.distill import CONSTRAINTS
from client.generate import BLOCKLIST, SIMILARITY_LIMIT, Filter, default_seeds, load_seeds, parse_proposal


@pytest.mark.parametrize(
    ("reply", "task"),
    [
        (" Task 4: Name two planets.\nTask 5: more", "Name two planets."),
        ("\n\n4. Write a limerick about cheese.", "Write a limerick about cheese."),
        ("- Explain tides.", "Explain tides."),
        ("Describe a sunset.", "Describe a sunset."),
        ("Task 4:\n", ""),
    ],
)
def test_the_task_is_the_replys_first_line_without_its_number(reply: str, task: str) -> None:
    assert parse_proposal(reply) == task


def test_each_filter_drops_what_it_should() -> None:
    seeds = load_seeds(default_seeds())
    checks = Filter([seed.instruction for seed in seeds], min_words=3, max_words=20)
    assert checks.reason("Say hi.") == "too_short"
    assert checks.reason("word " * 21) == "too_long"
    assert checks.reason("Draw a cat sitting on a mat.") == "blocklist"
    assert checks.reason("Describe the picture of the harbor in detail.") == "blocklist"
    assert checks.reason("Describe the pictorial style of Monet.") is None  # a whole word only
    assert checks.reason("* Explain how bees make honey.") == "format"
    # Seed 2 reworded slightly: ROUGE-L F1 well above 0.7.
    assert checks.reason("Explain what a leap year is in three sentences.") == "similar"
    task = "Compare the climates of Norway and Egypt."
    assert checks.reason(task) is None
    checks.keep(task)
    assert checks.reason("Compare the climates of Norway and Spain.") == "similar"  # kept tasks count too
    assert SIMILARITY_LIMIT == 0.7 and "image" in BLOCKLIST


def test_seed_files_are_checked_line_by_line(tmp_path: Path) -> None:
    assert len(load_seeds(default_seeds())) == 30
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(UsageError, match=r"seeds.jsonl:2: needs a JSON object with instruction and output"):
        load_seeds(bad)
    few = tmp_path / "few.jsonl"
    few.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(UsageError, match="holds 1 seed tasks; give at least 3"):
        load_seeds(few)


def test_an_unknown_constraint_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "generate",
                "--base-url",
                "http://x/v1",
                "--model",
                "m",
                "--out",
                str(tmp_path),
                "--constraints",
                "nope",
            ]
        )
    assert exited.value.code == 2
    assert "unknown constraint families ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_against_smollm2_keeps_only_what_passes_and_reruns_from_the_cache(
    smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rouge_score import rouge_scorer

    from finetune.config import DataConfig
    from finetune.data import load_data
    from tests.e2e import start_server, stop_server, wait_healthy

    empty = tmp_path / "adapters"
    empty.mkdir()
    server = start_server(smollm2, empty, tmp_path / "server.log")
    out = tmp_path / "generated"
    args = ["generate", "--model", str(smollm2), "--out", str(out), "--num-instructions", "6"]
    args += ["--max-proposals", "32", "--concurrency", "16", "--max-tokens", "128"]
    # The one constraint a 135M model meets often enough, given a few tries: no commas in a short answer.
    args += ["--constraints", "no_comma", "--constrained-fraction", "0.5", "--max-tries", "4"]
    try:
        wait_healthy(server)
        args += ["--base-url", f"{server.url}/v1"]
        assert main(args) == 0
        report = json.loads((out / "report.json").read_text())
        first = (out / "train.jsonl").read_text()
        assert main(args) == 0  # every reply from the cache: the same data
        assert (out / "train.jsonl").read_text() == first
    finally:
        stop_server(server)
    print(json.dumps({k: report[k] for k in ("proposed", "kept", "kept_with_constraint", "dropped")}))
    records = [json.loads(line) for line in first.splitlines()]
    assert len(records) == report["kept"] == len(report["items"]) >= 1
    assert report["proposed"] <= 32 and report["kept_with_constraint"] >= 1
    # Every proposal is kept, dropped for a reason (its answer's included), or answered after the last place.
    assert report["proposed"] == report["kept"] + sum(report["dropped"].values()) + report["surplus"]
    seeds = [seed.instruction for seed in load_seeds(default_seeds())]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tasks = [item["task"] for item in report["items"]]
    for index, task in enumerate(tasks):
        for other in seeds + tasks[:index]:
            assert scorer.score(task, other)["rougeL"].fmeasure < SIMILARITY_LIMIT
    for record, item in zip(records, report["items"], strict=True):
        user, assistant = record["messages"]
        assert user["content"].startswith(item["task"]) and assistant["content"]
        if item["family"] is not None:
            assert CONSTRAINTS[item["family"]].follows(assistant["content"], item["kwargs"])
            assert 1 <= item["tries"] <= 4
    train, _, data_report = load_data(DataConfig(path=str(out / "train.jsonl"), eval_fraction=0.0), seed=0)
    assert len(train) == len(records) and data_report.n_bad_skipped == 0
