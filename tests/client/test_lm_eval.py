"""lm-eval's IFEval through the task shipped with the client (client/lm_eval_tasks): it reads the packaged
prompts, scores with lm-eval's own functions offline, and against the real server lm-eval's own CLI gets
the answers `python -m client bench --suite ifeval` gets, with the same strict and loose accuracies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.ifeval import IFEvalItem, load_items, write_items
from client.suites import default_data
from tests.e2e import API_KEY, Server
from tuneserve.ifeval.evaluation import score_item

# Prompts of the packaged IFEval both tools answer, in at most MAX_TOKENS tokens each.
LIMIT = 20
MAX_TOKENS = 64


def lm_eval_draws_a_letter(item: IFEvalItem) -> bool:
    """lm-eval replaces a letter_frequency letter outside a-z by a random one (google-research, and
    client.ifeval, count the character given): IFEval's rows 1122 ('#') and 1129 ('!')."""
    return any(
        kind == "keywords:letter_frequency" and not ("a" <= kwargs.get("letter", "a").lower() <= "z")
        for kind, kwargs in zip(item.instruction_id_list, item.kwargs, strict=True)
    )


def first_prompts() -> list[IFEvalItem]:
    """The first LIMIT packaged prompts lm-eval scores as google-research does."""
    items = [item for item in load_items(default_data("ifeval")) if not lm_eval_draws_a_letter(item)]
    return items[:LIMIT]


def client_command(*args: str) -> str:
    """stdout of `python -m client ARGS` (as a user runs it)."""
    done = subprocess.run(
        [sys.executable, "-m", "client", *args], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout


@pytest.fixture
def offline_nltk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty user cache for the task to write NLTK's model into; nltk.data.path restored afterwards."""
    import nltk

    from client.lm_eval_tasks import tuneserve_ifeval

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    tuneserve_ifeval._lm_eval_ifeval.cache_clear()
    yield tmp_path / "cache"
    tuneserve_ifeval._lm_eval_ifeval.cache_clear()


def test_the_task_reads_the_packaged_prompts_and_scores_as_client_ifeval(offline_nltk: Path) -> None:
    from lm_eval.tasks import TaskManager

    from client.lm_eval_tasks import include_path

    # lm-eval's own ~10,000 task files are not indexed: this task is all that is needed.
    manager = TaskManager(include_path=str(include_path()), include_defaults=False)
    task = manager.load(["tuneserve_ifeval"])["tasks"]["tuneserve_ifeval"]
    docs = list(task.test_docs())
    items = load_items(default_data("ifeval"))
    assert [(doc["key"], doc["prompt"]) for doc in docs] == [(item.key, item.prompt) for item in items]
    assert task.config.generation_kwargs == {
        "until": [],
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 1280,  # lm-eval's ifeval.yaml
    }
    assert [item.key for item in items if lm_eval_draws_a_letter(item)] == [1122, 1129]
    by_key = {doc["key"]: doc for doc in docs}
    for item in first_prompts():
        doc = by_key[item.key]
        for response in (item.prompt, item.prompt.upper(), f"*{item.prompt}*\nP.S. done", ""):
            theirs = task.process_results(doc, [response])
            ours = score_item(item, response)
            assert (theirs["inst_level_strict_acc"], theirs["inst_level_loose_acc"]) == (
                ours.follow_strict,
                ours.follow_loose,
            ), (item.key, response)


def test_nltk_data_command_writes_the_model_nltk_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    from client.__main__ import main
    from tuneserve.ifeval.text import split_sentences

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))  # the command puts DIR first
    assert main(["nltk-data", "--dir", str(tmp_path / "nltk_data")]) == 0
    folder = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert str(folder) in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
        tokenizer = PunktTokenizer("english")
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left, e.g. at noon! Was it Mr. Jones? Yes."
    assert tokenizer.tokenize(text) == split_sentences(text)
    assert len(split_sentences(text)) == 5  # Punkt ends one after "e.g."


def lm_eval_samples(output: Path) -> list[dict[str, Any]]:
    (samples,) = output.rglob("samples_tuneserve_ifeval_*.jsonl")
    return [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_lm_eval_against_the_server_answers_and_scores_as_client_bench(
    server: Server, tmp_path: Path
) -> None:
    include_path = client_command("lm-eval-tasks").strip()
    model = server.base_model
    prompts = write_items(first_prompts(), tmp_path / "prompts.jsonl")
    # As in the README, on a machine with no NLTK data and no hub access: the task writes NLTK's model
    # into the (empty) user cache, lm-eval never downloads it.
    env = {
        **os.environ,
        "OPENAI_API_KEY": API_KEY,
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    lm_eval = subprocess.run(
        [
            str(Path(sys.executable).parent / "lm_eval"),
            "--model",
            "local-chat-completions",
            "--model_args",
            f"model={model},base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
            "--tasks",
            "tuneserve_ifeval",
            "--include_path",
            include_path,
            "--apply_chat_template",
            "--metadata",
            json.dumps({"data": str(prompts)}),
            "--gen_kwargs",
            f"max_gen_toks={MAX_TOKENS}",
            "--log_samples",
            "--output_path",
            str(tmp_path / "lm-eval"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert lm_eval.returncode == 0, lm_eval.stderr[-4000:]
    assert "Downloaded punkt_tab" not in lm_eval.stdout + lm_eval.stderr
    samples = lm_eval_samples(tmp_path / "lm-eval")
    (results_file,) = (tmp_path / "lm-eval").rglob("results_*.json")
    lm_eval_scores = json.loads(results_file.read_text())["results"]["tuneserve_ifeval"]

    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "bench",
            "--base-url",
            f"{server.url}/v1",
            "--api-key",
            API_KEY,
            "--models",
            model,
            "--suite",
            "ifeval",
            "--data",
            str(prompts),
            "--max-tokens",
            str(MAX_TOKENS),
            "--concurrency",
            "1",
            "--no-cache",
            "--out",
            str(tmp_path / "bench"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert bench.returncode == 0, bench.stderr[-4000:]
    bench_model = json.loads((tmp_path / "bench" / "results.json").read_text())["models"][model]

    # The same prompts, the same answers, character for character.
    theirs = {sample["doc"]["key"]: sample["resps"][0][0] for sample in samples}
    ours = {int(item["id"]): item["responses"][0] for item in bench_model["items"]}
    assert len(theirs) == LIMIT and theirs == ours
    assert len(set(ours.values())) > 1 and all(ours.values())  # real, varied answers
    # ... scored the same: prompt- and instruction-level, strict and loose.
    metrics = bench_model["metrics"]
    for ours_name, theirs_name in [
        ("prompt_strict", "prompt_level_strict_acc,none"),
        ("prompt_loose", "prompt_level_loose_acc,none"),
        ("instruction_strict", "inst_level_strict_acc,none"),
        ("instruction_loose", "inst_level_loose_acc,none"),
    ]:
        assert metrics[ours_name] == pytest.approx(lm_eval_scores[theirs_name], abs=1e-12), ours_name
    per_prompt = {
        sample["doc"]["key"]: (sample["prompt_level_strict_acc"], sample["prompt_level_loose_acc"])
        for sample in samples
    }
    assert per_prompt == {
        int(item["id"]): (item["prompt_strict"], item["prompt_loose"]) for item in bench_model["items"]
    }
