"""`bench`: retries and fail-fast, the cache, the suites' scores and the report, against a fake OpenAI server.

The slow test at the end runs `bench --suite tasks` against the real server (base + two adapters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from client.bench import BenchConfig, BenchError, ChatRunner, SamplingParams, add_bench_command, run_bench
from client.cache import Reply, ResponseCache, request_key
from client.endpoint import EndpointError
from client.report import render_markdown, write_report
from client.suite import BenchPrompt, SuiteResult
from client.suites import (
    MTBenchSuite,
    ReferenceSuite,
    corpus_bleu,
    exact_match,
    packaged_data_dir,
    parse_rating,
    rouge_l_f1,
)
from client.tasks import load_items, write_task_data
from tests.e2e import ADAPTERS, API_KEY, Server

Answerer = Callable[[str, list[dict[str, str]]], str]

RETRY_AFTER_MS = 10  # what the fake asks of a retry; the SDK honours it, so the tests do not wait its backoff


def upper_or_plain(model: str, messages: list[dict[str, str]]) -> str:
    """Model "upper" shouts (passing the uppercase tasks); every other model says the same plain thing."""
    return "IT IS BRIGHT AND CALM." if model == "upper" else "it is a thing."


@dataclass
class FakeOpenAI:
    """An OpenAI-compatible endpoint on a free loopback port: GET /v1/models, POST /v1/chat/completions.

    `failures` are HTTP statuses answered (in order) to the next chat requests before any succeeds, each
    asking for a retry after 10 ms; `attempts` records every chat request body that arrived, failed or not.
    """

    models: list[str]
    reply: Answerer = upper_or_plain
    failures: list[int] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                if status >= 400:
                    self.send_header("retry-after-ms", str(RETRY_AFTER_MS))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found", "type": "not_found"}})
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]
                return self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.attempts.append(body)
                if fake.failures:
                    status = fake.failures.pop(0)
                    return self._send(status, {"error": {"message": f"fake {status}", "type": "fake"}})
                content = fake.reply(body["model"], body["messages"])
                return self._send(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        return Handler


@contextmanager
def running(endpoint: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """`endpoint` served on a free loopback port for the duration of the block."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), endpoint.handler())
    endpoint.url = f"http://127.0.0.1:{http.server_address[1]}/v1"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        http.shutdown()
        http.server_close()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with running(FakeOpenAI(models=["base", "upper", "judge"])) as endpoint:
        yield endpoint


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_task_data(tmp_path / "tasks", ["uppercase", "start_with_word"], n_train=0, n_test=4)["test"]


def config(fake: FakeOpenAI, out: Path, **overrides: Any) -> BenchConfig:
    settings: dict[str, Any] = {
        "base_url": fake.url,
        "models": ["base", "upper"],
        "suite": "tasks",
        "out": out,
        "progress": False,
        "max_tokens": 32,
    }
    return BenchConfig(**(settings | overrides))


def runner(fake: FakeOpenAI, **kwargs: Any) -> ChatRunner:
    return ChatRunner(fake.url, "key", **kwargs)


async def _chat(chat_runner: ChatRunner, model: str = "base") -> str:
    try:
        return await chat_runner.chat(model, [{"role": "user", "content": "hi"}], SamplingParams())
    finally:
        await chat_runner.close()


# --- the runner: the SDK's retries, fail-fast --------------------------------------------------------


def test_transient_503_is_retried(fake: FakeOpenAI) -> None:
    fake.failures = [503]
    assert asyncio.run(_chat(runner(fake))) == "it is a thing."
    assert len(fake.attempts) == 2


def test_every_transient_status_is_retried_after_the_servers_delay(fake: FakeOpenAI) -> None:
    fake.failures = [503, 429, 502]
    started = time.monotonic()
    assert asyncio.run(_chat(runner(fake, max_attempts=4))) == "it is a thing."
    assert len(fake.attempts) == 4
    assert time.monotonic() - started >= 3 * RETRY_AFTER_MS / 1000


def test_gives_up_after_max_attempts(fake: FakeOpenAI) -> None:
    fake.failures = [503, 503, 503]
    with pytest.raises(
        BenchError, match=r"request to base at .* failed: .*503.* running the same command"
    ) as err:
        asyncio.run(_chat(runner(fake, max_attempts=2)))
    assert isinstance(err.value.__cause__, openai.InternalServerError)
    assert len(fake.attempts) == 2


def test_client_errors_are_not_retried(fake: FakeOpenAI) -> None:
    fake.failures = [400]
    with pytest.raises(BenchError) as err:
        asyncio.run(_chat(runner(fake)))
    assert isinstance(err.value.__cause__, openai.BadRequestError)
    assert len(fake.attempts) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_endpoint_fails_fast(tmp_path: Path, task_file: Path) -> None:
    unreachable = BenchConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        models=["base"],
        suite="tasks",
        data=str(task_file),
        out=tmp_path / "out",
        progress=False,
    )
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/models.*--base-url"):
        asyncio.run(run_bench(unreachable))
    assert time.monotonic() - started < 0.5  # the probe does not retry (the SDK's first backoff is 0.5 s)


def test_unknown_model_fails_fast(fake: FakeOpenAI, tmp_path: Path, task_file: Path) -> None:
    bad = config(fake, tmp_path / "out", models=["base", "nope"], data=str(task_file))
    with pytest.raises(
        EndpointError, match=r"--models: nope not served at .*; it serves: base, upper, judge"
    ):
        asyncio.run(run_bench(bad))
    assert fake.attempts == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "--concurrency: Input should be greater than or equal to 1 (got 0)"),
        (["--limit", "0"], "--limit: Input should be greater than or equal to 1 (got 0)"),
        (["--max-tokens", "x"], "--max-tokens: Input should be a valid integer"),
        (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
        (["--timeout", "0"], "--timeout: Input should be greater than 0"),
        (["--max-attempts", "0"], "--max-attempts: Input should be greater than or equal to 1"),
        (["--judge-max-tokens", "0"], "--judge-max-tokens: Input should be greater than or equal to 1"),
        (["--suite", "nope"], "--suite: Input should be 'ifeval', 'tasks', 'reference' or 'mtbench'"),
        (["--suite", "mtbench"], "--suite mtbench needs --judge-model"),
        (["--models", "a,b,a"], "--models: lists a model more than once: a,b,a"),
        (["--models", ""], "--models must name at least one model"),
    ],
)
def test_config_errors_name_the_flag(
    argv: list[str], message: str, usage_error: Callable[[list[str]], str]
) -> None:
    models = [] if "--models" in argv else ["--models", "a"]  # a list flag given twice gathers both
    assert message in usage_error(["bench", "--base-url", "http://x/v1", "--suite", "tasks", *models, *argv])


def test_the_config_checks_python_callers_too() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        BenchConfig(base_url="http://x/v1", models=["a"], suite="tasks", concurrency=0)
    with pytest.raises(ValueError, match="--base-url is required"):
        BenchConfig(models=["a"], suite="tasks")


def test_second_turn_carries_the_first_reply(fake: FakeOpenAI) -> None:
    fake.reply = lambda model, messages: f"reply to {messages[-1]['content']}"
    prompt = BenchPrompt(id="q", turns=("one", "two"), system="be brief")

    async def converse() -> list[str]:
        chat_runner = runner(fake)
        try:
            return await chat_runner.converse(
                "base", prompt, SamplingParams(temperature=0.5, max_tokens=7, seed=3)
            )
        finally:
            await chat_runner.close()

    assert asyncio.run(converse()) == ["reply to one", "reply to two"]
    assert fake.attempts[1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "reply to one"},
        {"role": "user", "content": "two"},
    ]
    assert {key: fake.attempts[1][key] for key in ("temperature", "max_tokens", "seed")} == {
        "temperature": 0.5,
        "max_tokens": 7,
        "seed": 3,
    }


# --- the cache ------------------------------------------------------------------------------------


def test_interrupted_run_asks_only_what_is_missing(fake: FakeOpenAI, tmp_path: Path, task_file: Path) -> None:
    out = tmp_path / "out"
    first = asyncio.run(run_bench(config(fake, out, data=str(task_file), limit=2)))  # "interrupted" halfway
    assert first.requests == len(fake.attempts) == 2 * 2

    resumed = asyncio.run(run_bench(config(fake, out, data=str(task_file))))
    assert (resumed.requests, resumed.cache_hits) == (2 * 2, 2 * 2)

    again = asyncio.run(run_bench(config(fake, out, data=str(task_file))))
    assert (again.requests, again.cache_hits) == (0, 2 * 4)
    assert len(fake.attempts) == 2 * 4
    assert again.results["upper"].metrics == resumed.results["upper"].metrics == {"accuracy": 0.5}
    assert again.results["base"].metrics == {"accuracy": 0.0}

    uncached = asyncio.run(run_bench(config(fake, out, data=str(task_file), no_cache=True)))
    assert uncached.requests == 2 * 4


def test_cache_scope_shares_answers_between_servers_of_the_same_models(
    fake: FakeOpenAI, tmp_path: Path, task_file: Path
) -> None:
    cache_dir = tmp_path / "cache"
    with running(FakeOpenAI(models=["base", "upper"])) as other:
        scoped = {"data": str(task_file), "cache_dir": cache_dir, "cache_scope": "same-models"}
        first = asyncio.run(run_bench(config(fake, tmp_path / "a", **scoped)))
        moved = asyncio.run(run_bench(config(other, tmp_path / "b", **scoped)))
        assert (moved.requests, moved.cache_hits) == (0, first.requests) and other.attempts == []
        assert moved.results["upper"].metrics == first.results["upper"].metrics
        # Without the scope a key names the URL: the other server is asked.
        unscoped = asyncio.run(
            run_bench(config(other, tmp_path / "c", data=str(task_file), cache_dir=cache_dir))
        )
        assert unscoped.requests == first.requests == len(other.attempts)
    records = [json.loads(line) for line in (cache_dir / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 2 * first.requests and {record["finish_reason"] for record in records} == {"stop"}


def test_cache_skips_a_line_cut_short_and_keys_on_every_parameter(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    params = {"temperature": 0.0, "max_tokens": 8, "seed": 0}
    key = request_key("http://x/v1/", "m", messages, params)
    assert key == request_key("http://x/v1", "m", messages, params)
    for other in (
        request_key("http://y/v1", "m", messages, params),
        request_key("http://x/v1", "n", messages, params),
        request_key("http://x/v1", "m", [{"role": "user", "content": "ho"}], params),
        request_key("http://x/v1", "m", messages, params | {"seed": 1}),
    ):
        assert other != key
    cache = ResponseCache(tmp_path)
    cache.put(key, Reply("hello", "stop"), {"model": "m"})
    cache.close()
    with cache.path.open("a") as f:
        f.write('{"key": "cut-sh')  # a run killed mid-write
    reopened = ResponseCache(tmp_path)
    assert (len(reopened), reopened.get(key)) == (1, Reply("hello", "stop"))
    reopened.put("other", Reply("world"), {"model": "m"})
    reopened.close()
    assert ResponseCache(tmp_path).get("other") == Reply("world")


def test_rescore_reads_responses_from_results_and_asks_nobody(
    fake: FakeOpenAI, tmp_path: Path, task_file: Path
) -> None:
    first = asyncio.run(run_bench(config(fake, tmp_path / "first", data=str(task_file))))
    rescored = asyncio.run(
        run_bench(
            config(
                fake,
                tmp_path / "again",
                data=str(task_file),
                base_url=None,
                models=[],
                rescore=first.paths["results"],
            )
        )
    )
    assert rescored.requests == 0
    assert {m: r.metrics for m, r in rescored.results.items()} == {
        m: r.metrics for m, r in first.results.items()
    }
    assert rescored.meta["base_url"] == fake.url


# --- reference metrics ----------------------------------------------------------------------------


def test_exact_match_ignores_case_and_whitespace() -> None:
    assert exact_match("  The  CAT\nsat ", "the cat sat")
    assert not exact_match("the cat sat.", "the cat sat")


def test_rouge_l_and_bleu_match_hand_computed_values() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6.
    # LCS("a b c d", "a c") = 2 tokens: P = 2/4, R = 2/2, F1 = 2/3.
    scores = rouge_l_f1(["the cat sat on the mat", "a b c d"], ["the cat is on the mat", "a c"])
    assert scores == pytest.approx([5 / 6, 2 / 3])
    # n-gram precisions 5/6, 3/5, 1/4 and 0/3 (smoothed to 1/(2*3)); equal lengths, so no brevity penalty.
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(
        (1 / 48) ** 0.25
    )
    # Corpus BLEU pools the counts over sentences (11/12, 8/10, 5/8, 3/6): not a mean of sentence scores.
    pooled = corpus_bleu(
        ["the cat sat on the mat", "the dog ran to the park"],
        ["the cat is on the mat", "the dog ran to the park"],
    )
    assert pooled == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25)


def test_reference_suite_reads_three_record_shapes_and_scores(tmp_path: Path) -> None:
    records = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "Four"},
            ]
        },
        {"prompt": "Say the cat sat.", "completion": "the cat is on the mat"},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
    ]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    suite = ReferenceSuite.load(str(path))
    prompts = suite.prompts()
    assert [(p.turns, p.system) for p in prompts] == [
        (("Translate to French.\n\ncat",), None),
        (("2+2?",), "Be terse."),
        (("Say the cat sat.",), None),
    ]  # the multi-turn chat has no single prompt to send: skipped
    result = suite.score({"0": ["Chat"], "1": ["five"], "2": ["the cat sat on the mat"]})
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)
    assert result.metrics["rouge_l"] == pytest.approx((1 + 0 + 5 / 6) / 3)
    assert 0 < result.metrics["bleu"] < 1
    assert [item["exact_match"] for item in result.items] == [True, False, False]


def test_ifeval_suite_scores_through_client_ifeval(fake: FakeOpenAI, tmp_path: Path) -> None:
    from client.ifeval import evaluate, load_items

    data = packaged_data_dir() / "ifeval" / "input_data.jsonl"
    report = asyncio.run(run_bench(config(fake, tmp_path / "out", suite="ifeval", data=str(data), limit=5)))
    items = load_items(data, 5)
    expected = evaluate(items, {item.prompt: "it is a thing." for item in items})
    result = report.results["base"]
    assert result.metrics == {
        "prompt_strict": expected.prompt_strict,
        "prompt_loose": expected.prompt_loose,
        "instruction_strict": expected.instruction_strict,
        "instruction_loose": expected.instruction_loose,
    }
    assert result.breakdown == expected.per_type
    assert [item["id"] for item in result.items] == [str(item.key) for item in items]
    markdown = report.paths["report"].read_text()
    assert "## Per instruction type: strict" in markdown and "## Per instruction type: loose" in markdown


# --- report ---------------------------------------------------------------------------------------


def _result(accuracy: float, per_family: dict[str, float]) -> SuiteResult:
    breakdown = {family: {"accuracy": value, "count": 4} for family, value in per_family.items()}
    return SuiteResult("tasks", {"accuracy": accuracy}, breakdown, items=[])


def test_report_shows_models_side_by_side_with_differences(tmp_path: Path) -> None:
    results = {
        "base": _result(0.5, {"uppercase": 0.25, "json_object": 0.75}),
        "fmt": _result(0.75, {"uppercase": 0.5, "json_object": 1.0}),
        "caps": _result(0.25, {"uppercase": 0.5}),
    }
    meta = {"suite": "tasks", "base_url": "http://x/v1", "sampling": {"temperature": 0.0}}
    markdown = render_markdown(meta, results)
    assert "| metric | `base` | `fmt` | `caps` |" in markdown
    assert "| accuracy | 0.500 | 0.750 (+0.250) | 0.250 (-0.250) |" in markdown
    assert "## Per family: accuracy" in markdown
    assert "| json_object (n=4) | 0.750 | 1.000 (+0.250) | – |" in markdown
    assert "| uppercase (n=4) | 0.250 | 0.500 (+0.250) | 0.500 (+0.250) |" in markdown

    paths = write_report(tmp_path, meta, results)
    assert paths["chart"].read_bytes().startswith(b"\x89PNG")
    document = json.loads(paths["results"].read_text())
    assert document["models"]["fmt"]["metrics"] == {"accuracy": 0.75}
    assert paths["report"].read_text() == markdown + "\n"


# --- MT-Bench -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("judgment", "rating"),
    [
        ("Helpful and correct. Rating: [[7]]", 7.0),
        ("Rating: [[8.5]]", 8.5),
        ("I would give it [6].", 6.0),  # FastChat's fallback pattern
        ("Rating: [[3]] ... on reflection [[9]]", 3.0),  # the first one counts, as in FastChat
        ("no rating here", None),
        ("Rating: [[0]]", None),
        ("Rating: [[11]]", None),
    ],
)
def test_parse_rating(judgment: str, rating: float | None) -> None:
    assert parse_rating(judgment) == rating


@pytest.fixture
def mtbench_data(tmp_path: Path) -> Path:
    """Two MT-Bench questions from the packaged data: 81 (writing) and 111 (math, judged with a reference)."""
    packaged = packaged_data_dir() / "mtbench"
    folder = tmp_path / "mtbench"
    folder.mkdir()
    for name in ("judge_prompts.jsonl", "reference_answer_gpt-4.jsonl"):
        shutil.copy(packaged / name, folder / name)
    lines = (packaged / "question.jsonl").read_text().splitlines()
    chosen = [line for line in lines if json.loads(line)["question_id"] in (81, 111)]
    (folder / "question.jsonl").write_text("\n".join(chosen) + "\n")
    return folder


def judge_or_answer(model: str, messages: list[dict[str, str]]) -> str:
    """The judge rates first turns 8 and second turns 4 (2 for math); models answer with the turn number."""
    if model != "judge":
        return f"{model} answer {sum(m['role'] == 'user' for m in messages)}"
    text = messages[-1]["content"]
    if "### Assistant A:" not in text:
        return "Fine. Rating: [[8]]"
    return "Weak. Rating: [[2]]" if "Reference answer" in text else "Weak. Rating: [[4]]"


def test_mtbench_flow_with_a_fake_judge(fake: FakeOpenAI, tmp_path: Path, mtbench_data: Path) -> None:
    fake.reply = judge_or_answer
    bench = config(fake, tmp_path / "out", suite="mtbench", data=str(mtbench_data), judge_model="judge")
    report = asyncio.run(run_bench(bench))

    result = report.results["upper"]
    assert result.metrics == {"turn_1": 8.0, "turn_2": 3.0, "overall": 5.5}
    assert result.breakdown["math"] == {"turn_1": 8.0, "turn_2": 2.0, "overall": 5.0, "count": 1}
    assert result.breakdown["writing"] == {"turn_1": 8.0, "turn_2": 4.0, "overall": 6.0, "count": 1}
    assert result.items[0]["responses"] == ["upper answer 1", "upper answer 2"]
    assert result.items[0]["ratings"] == [8.0, 4.0]

    judge_requests = [a for a in fake.attempts if a["model"] == "judge"]
    assert len(judge_requests) == 2 * 2 * 2  # models x questions x turns
    assert all(a["temperature"] == 0 and a["max_tokens"] == 2048 for a in judge_requests)
    reference = json.loads((mtbench_data / "reference_answer_gpt-4.jsonl").read_text().splitlines()[10])
    assert reference["question_id"] == 111
    judged = [a["messages"][1]["content"] for a in judge_requests]
    math_turn_1 = next(text for text in judged if "upper answer 1" in text and "Reference Answer" in text)
    assert reference["choices"][0]["turns"][0] in math_turn_1
    assert report.meta["judge"]["model"] == "judge"

    rerun = asyncio.run(run_bench(bench))
    assert rerun.requests == 0  # answers and judgments all cached


def test_mtbench_suite_scores_with_any_judge_callable(mtbench_data: Path) -> None:
    seen: list[list[dict[str, str]]] = []

    def judge(conversations: Any) -> list[str]:
        seen.extend(conversations)
        return ["[[10]]", "no verdict"] * (len(conversations) // 2)

    suite = MTBenchSuite.load(mtbench_data, judge)
    result = suite.score({"81": ["a", "b"], "111": ["c", "d"]})
    assert result.metrics == {"turn_1": 10.0, "turn_2": 0.0, "overall": 10.0}
    assert [item["ratings"] for item in result.items] == [[10.0, None], [10.0, None]]
    assert seen[0][0]["content"] == "You are a helpful assistant."  # single-v1's system prompt
    assert "[Question]\n" + suite.questions[0].turns[0] in seen[0][1]["content"]


# --- command line ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="client")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_cli_runs_and_reports_clear_errors(
    fake: FakeOpenAI, tmp_path: Path, task_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--base-url", fake.url, "--suite", "tasks", "--data", str(task_file), "--out", str(tmp_path)]
    args = parse([*common, "--models", "base,upper", "--max-tokens", "16", "--seed", "5"])
    assert args.run(args) == 0
    assert "report.md" in capsys.readouterr().out
    assert {a["max_tokens"] for a in fake.attempts} == {16} and {a["seed"] for a in fake.attempts} == {5}
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["meta"]["sampling"] == {"temperature": 0.0, "max_tokens": 16, "seed": 5}
    assert [m["id"] for m in document["meta"]["models_listing"]] == ["base", "upper", "judge"]

    args = parse([*common, "--models", "missing"])
    assert args.run(args) == 2
    assert "--models: missing not served" in capsys.readouterr().err


# --- end to end: the real server, base and two adapters -------------------------------------------


@pytest.mark.slow
def test_bench_tasks_against_the_real_server(server: Server, tmp_path: Path) -> None:
    families = ADAPTERS["fmt"] + ADAPTERS["caps"]
    test_file = write_task_data(tmp_path / "tasks", families, n_train=0, n_test=8)["test"]
    models = [server.base_model, "fmt", "caps"]
    bench = BenchConfig(
        base_url=f"{server.url}/v1",
        api_key=API_KEY,
        models=models,
        suite="tasks",
        data=str(test_file),
        limit=6,
        concurrency=4,
        max_tokens=48,
        out=tmp_path / "out",
        timeout=300,
        progress=False,
    )
    report = asyncio.run(run_bench(bench))
    assert (report.requests, report.cache_hits) == (3 * 6, 0)
    for name in ("results", "report", "chart"):
        assert report.paths[name].stat().st_size > 0
    document = json.loads(report.paths["results"].read_text())
    assert list(document["models"]) == models
    assert {m["id"] for m in document["meta"]["models_listing"]} >= set(models)
    items = load_items(test_file)[:6]
    for model in models:
        result = document["models"][model]
        assert [item["id"] for item in result["items"]] == [item.id for item in items]
        assert 0 <= result["metrics"]["accuracy"] <= 1 and not math.isnan(result["metrics"]["accuracy"])
        assert set(result["breakdown"]) == {item.family for item in items}
    # The adapters were tuned on different data, so at least one answers differently from the base.
    replies = {model: [item["responses"] for item in document["models"][model]["items"]] for model in models}
    assert replies["fmt"] != replies[server.base_model] or replies["caps"] != replies[server.base_model]
    markdown = report.paths["report"].read_text()
    assert f"| metric | `{server.base_model}` | `fmt` | `caps` |" in markdown

    cached = asyncio.run(run_bench(bench))
    assert (cached.requests, cached.cache_hits) == (0, 3 * 6)
    assert {m: r.metrics for m, r in cached.results.items()} == {
        m: r.metrics for m, r in report.results.items()
    }
