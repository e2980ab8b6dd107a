"""`python -m client load`: vLLM's metric definitions, prompt generation, fail-fast checks, end-to-end runs.

Fast tests drive a stub OpenAI server (stdlib HTTP, scripted streams); the slow ones compare with vLLM's
own benchmark code and load the real server with three adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from client.endpoint import EndpointError
from client.load import (
    Distribution,
    LoadConfig,
    RequestResult,
    add_load_command,
    compute_metrics,
    random_token_prompts,
    random_word_prompts,
    run_load,
)
from tests.e2e import ADAPTERS, API_KEY, Server


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="python -m client")
    add_load_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["load", *argv])
    code: int = args.run(args)
    return code


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- a stub OpenAI server ----------------------------------------------------------------------------

STUB_MODELS = ["base", "a", "b", "broken"]  # "broken" answers every generation with a 500
STUB_KEY = "stub-key"


class StubHandler(BaseHTTPRequestHandler):
    """Streams max_tokens one-word chunks (2 ms apart), then a usage chunk, like vLLM's server."""

    bodies: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {STUB_KEY}":
            return True
        self._json(401, {"error": {"message": "bad key", "type": "auth", "param": None, "code": 401}})
        return False

    def do_GET(self) -> None:
        if self._authorized():
            self._json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in STUB_MODELS
                    ],
                },
            )

    def do_POST(self) -> None:
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if body["model"] == "broken":
            self._json(
                500, {"error": {"message": "engine fell over", "type": "server", "param": None, "code": 500}}
            )
            return
        chat = self.path.endswith("/chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            kind = "chat.completion.chunk" if chat else "text_completion"
            chunk = {"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        n = body["max_tokens"]
        if chat:  # vLLM's shape: a role-only chunk, one chunk per token, a finish-only chunk
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i in range(n):
            time.sleep(0.002)
            finish = "length" if i == n - 1 and not chat else None
            if chat:
                event([{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}])
            else:
                event([{"index": 0, "text": f" w{i}", "finish_reason": finish, "logprobs": None}])
        if chat:
            event([{"index": 0, "delta": {}, "finish_reason": "length"}])
        event([], {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n})
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stub() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Handler", (StubHandler,), {"bodies": bodies})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


# ----- metrics -----------------------------------------------------------------------------------------


def test_metrics_follow_vllm_definitions_on_hand_made_timings() -> None:
    requests = [
        RequestResult(
            "a",
            prompt_tokens=10,
            success=True,
            output_tokens=5,
            ttft=0.1,
            itl=[0.05, 0.05, 0.1, 0.2],
            latency=0.5,
        ),
        RequestResult("b", prompt_tokens=20, success=True, output_tokens=1, ttft=0.2, latency=0.2),  # no TPOT
        RequestResult(
            "c", prompt_tokens=30, error="boom", ttft=9.0, itl=[9.0], latency=9.0
        ),  # failed: ignored
    ]
    m = compute_metrics(requests, duration=2.0, max_concurrency=4)
    assert (m.completed, m.failed, m.max_concurrency) == (2, 1, 4)
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 6)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.0)
    assert m.total_token_throughput == pytest.approx(18.0)
    # TPOT = (e2e - ttft) / (output_tokens - 1), only for the request with more than one output token.
    assert (m.tpot.mean, m.tpot.median, m.tpot.p99, m.tpot.std) == pytest.approx((100, 100, 100, 0))
    # ITL pools the gaps: sorted [50, 50, 100, 200] ms; numpy's linear percentile: p90 at rank 2.7.
    assert m.itl.mean == pytest.approx(100)
    assert m.itl.median == pytest.approx(75)
    assert m.itl.p90 == pytest.approx(170)
    assert m.itl.p99 == pytest.approx(197)
    assert m.itl.std == pytest.approx((((50 - 100) ** 2 * 2 + 0 + 100**2) / 4) ** 0.5)  # population std
    assert (m.ttft.mean, m.ttft.median, m.ttft.p90) == pytest.approx((150, 150, 190))
    assert (m.e2el.mean, m.e2el.p99) == pytest.approx((350, 497))


def test_metrics_with_no_successful_request_are_zero_like_vllm() -> None:
    m = compute_metrics([RequestResult("a", 10, error="refused")], duration=1.0, max_concurrency=1)
    assert (m.completed, m.failed, m.total_output_tokens, m.request_throughput) == (0, 1, 0, 0)
    assert m.ttft == m.tpot == m.itl == m.e2el == Distribution(0, 0, 0, 0, 0)


@pytest.mark.slow
def test_metrics_match_vllm_calculate_metrics() -> None:
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = random.Random(0)
    ours, theirs = [], []
    for index in range(40):
        n = rng.choice([1, 2, 5, 16])
        itl = [rng.uniform(0.01, 0.2) for _ in range(n - 1)]
        ttft = rng.uniform(0.05, 1.0)
        fields = {
            "output_tokens": n,
            "ttft": ttft,
            "itl": itl,
            "latency": ttft + sum(itl),
            "start_time": index * 0.1,
        }
        success = index % 7 != 3
        ours.append(
            RequestResult("m", prompt_tokens=32, success=success, error="" if success else "x", **fields)
        )
        theirs.append(
            RequestFuncOutput(success=success, prompt_len=32, error="" if success else "x", **fields)
        )
    metrics = compute_metrics(ours, duration=3.5, max_concurrency=8)
    reference, _ = calculate_metrics([], theirs, 3.5, None, [90, 99], {})
    ref = vars(reference)
    assert (metrics.completed, metrics.failed) == (ref["completed"], ref["failed"])
    assert (metrics.total_input_tokens, metrics.total_output_tokens) == (
        ref["total_input"],
        ref["total_output"],
    )
    for name in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert getattr(metrics, name) == pytest.approx(ref[name])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        dist: Distribution = getattr(metrics, metric)
        percentiles = dict(ref[f"percentiles_{metric}_ms"])
        assert dist.mean == pytest.approx(ref[f"mean_{metric}_ms"])
        assert dist.median == pytest.approx(ref[f"median_{metric}_ms"])
        assert dist.std == pytest.approx(ref[f"std_{metric}_ms"])
        assert (dist.p90, dist.p99) == pytest.approx((percentiles[90], percentiles[99]))


# ----- prompts -----------------------------------------------------------------------------------------


def test_token_prompts_are_seeded_and_encode_to_the_input_length(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = random_token_prompts(tiny_tokenizer, 40, 32, seed=0)
    assert prompts == random_token_prompts(tiny_tokenizer, 40, 32, seed=0)
    assert [p.text for p in prompts] != [p.text for p in random_token_prompts(tiny_tokenizer, 40, 32, seed=1)]
    lengths = [len(tiny_tokenizer.encode(p.text, add_special_tokens=False)) for p in prompts]
    assert lengths == [p.num_tokens for p in prompts]  # the count reported is the real one
    # As in vLLM, a few id runs re-encode one or two tokens long whatever the adjustment does.
    assert all(32 <= n <= 34 for n in lengths)
    assert sum(n == 32 for n in lengths) >= 0.8 * len(lengths)


def test_word_prompts_are_seeded_and_sized_in_words() -> None:
    prompts = random_word_prompts(10, 50, seed=3)
    assert prompts == random_word_prompts(10, 50, seed=3)
    assert prompts != random_word_prompts(10, 50, seed=4)
    assert all(len(p.text.split()) == p.num_tokens == 50 for p in prompts)


@pytest.mark.slow
def test_token_prompts_are_vllms_random_dataset(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from vllm.benchmarks.datasets import RandomDataset

    for seed, input_len in ((0, 32), (5, 100)):
        reference = RandomDataset(random_seed=seed).sample(
            tokenizer=tiny_tokenizer, num_requests=20, input_len=input_len, output_len=16
        )
        ours = random_token_prompts(tiny_tokenizer, 20, input_len, seed)
        assert [p.text for p in ours] == [r.prompt for r in reference]
        assert [p.num_tokens for p in ours] == [r.prompt_len for r in reference]


# ----- fail fast ---------------------------------------------------------------------------------------


def test_unreachable_endpoint_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"cannot reach .*/v1/models"):
        asyncio.run(run_load(LoadConfig(base_url=url, models=["m"])))
    assert run_cli("--base-url", url, "--models", "m") == 2
    assert "error: cannot reach" in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_unknown_model_fails_fast(stub: tuple[str, list[dict[str, Any]]]) -> None:
    url, bodies = stub
    config = LoadConfig(base_url=url, models=["a", "nope"], api_key=STUB_KEY)
    with pytest.raises(
        EndpointError, match=r"--models: nope not served at .*/v1/models; it serves: base, a, b, broken"
    ):
        asyncio.run(run_load(config))
    assert bodies == []  # nothing was sent


def test_wrong_api_key_fails_fast(stub: tuple[str, list[dict[str, Any]]]) -> None:
    with pytest.raises(EndpointError, match="refused the API key"):
        asyncio.run(run_load(LoadConfig(base_url=stub[0], models=["a"], api_key="wrong")))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output-len", "0"], "--output-len: Input should be greater than or equal to 1 (got 0)"),
        (["--num-prompts", "0"], "--num-prompts: Input should be greater than or equal to 1"),
        (["--input-len", "x"], "--input-len: Input should be a valid integer"),
        (["--concurrency", "1,0"], "--concurrency: Input should be greater than or equal to 1 (got 0)"),
        (["--endpoint", "embeddings"], "--endpoint: Input should be 'chat' or 'completions'"),
        (["--base-url", "localhost:8000"], "--base-url: must start with http:// or https://"),
    ],
)
def test_config_errors_name_the_flag(
    argv: list[str], message: str, usage_error: Callable[[list[str]], str]
) -> None:
    assert message in usage_error(["load", "--base-url", "http://x", "--models", "m", *argv])


def test_the_config_checks_python_callers_too() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        LoadConfig(base_url="http://x", models=["m"], concurrency=[0])
    assert LoadConfig(base_url="http://x/v1/", models=[" m "]).model_dump(include={"base_url", "models"}) == {
        "base_url": "http://x",
        "models": ["m"],
    }


# ----- against the stub --------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stub_run_times_tokens_and_spreads_models(
    stub: tuple[str, list[dict[str, Any]]], endpoint: str, tmp_path: Path
) -> None:
    url, bodies = stub
    argv = ["--base-url", f"{url}/v1", "--api-key", STUB_KEY, "--models", "base,a,b", "--concurrency", "1,3"]
    argv += ["--num-prompts", "6", "--input-len", "8", "--output-len", "5", "--ignore-eos"]
    assert run_cli(*argv, "--endpoint", endpoint, "--out", str(tmp_path)) == 0
    assert len(bodies) == 12
    assert [b["model"] for b in bodies[:6]] == ["base", "a", "b"] * 2  # round-robin (concurrency 1: in order)
    assert all(
        b["ignore_eos"] and b["max_tokens"] == 5 and b["stream_options"] == {"include_usage": True}
        for b in bodies
    )
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["base_url"] == url and report["served_models"] == STUB_MODELS
    assert report["args"]["concurrency"] == [1, 3] and "api_key" not in report["args"]
    for level in report["levels"]:
        assert (level["completed"], level["failed"]) == (6, 0)
        assert level["output_lens"] == [5] * 6 and level["input_lens"] == [7] * 6  # from usage
        # Five token chunks: four gaps each; the chat role and finish chunks carry no token.
        assert [len(gaps) for gaps in level["itls"]] == [4] * 6
        # The stub spaces its 5 tokens 2 ms apart, so each stream lasts at least 10 ms; single gaps can be
        # shorter, as a busy client may read two chunks in one go.
        assert level["mean_itl_ms"] > 0 and level["p99_tpot_ms"] >= level["median_tpot_ms"]
        assert level["median_e2el_ms"] >= max(10, level["median_ttft_ms"])
    assert "| 3 | 6 | 0 |" in (tmp_path / "load.md").read_text()
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"


def test_stub_failures_are_counted_with_their_message(
    stub: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    config = LoadConfig(
        base_url=stub[0],
        models=["a", "broken"],
        concurrency=[2],
        num_prompts=4,
        input_len=4,
        output_len=3,
        api_key=STUB_KEY,
    )
    report = asyncio.run(run_load(config))
    (level,) = report.levels
    assert (level.metrics.completed, level.metrics.failed, report.failed) == (2, 2, 2)
    assert [r.success for r in level.requests] == [True, False] * 2
    assert all("engine fell over" in r.error for r in level.requests if not r.success)
    assert level.metrics.total_output_tokens == 6
    argv = ["--base-url", stub[0], "--api-key", STUB_KEY, "--models", "a,broken", "--concurrency", "2"]
    assert run_cli(*argv, "--num-prompts", "2", "--output-len", "2") == 1
    assert "1 of 2 requests failed" in capsys.readouterr().err


# ----- against the real server -------------------------------------------------------------------------


@pytest.mark.slow
def test_load_against_the_server_with_three_adapters(server: Server, tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = list(ADAPTERS)
    argv = [
        "--base-url",
        server.url,
        "--api-key",
        API_KEY,
        "--models",
        ",".join(models),
        "--concurrency",
        "1,4",
    ]
    argv += ["--num-prompts", "12", "--input-len", "32", "--output-len", "16", "--ignore-eos"]
    argv += ["--tokenizer", server.base_model, "--out", str(tmp_path)]
    assert run_cli(*argv) == 0
    report = json.loads((tmp_path / "load.json").read_text())
    assert set(models) <= set(report["served_models"])
    prompt_lens = [p.num_tokens for p in random_token_prompts(tiny_tokenizer, 12, 32, seed=0)]
    for level in report["levels"]:
        assert (level["completed"], level["failed"]) == (12, 0), level["errors"]
        assert level["output_lens"] == [16] * 12
        assert level["input_lens"] == prompt_lens  # the server counts what the generator counted
        assert level["models"] == models * 4
        assert level["total_output_tokens"] == 12 * 16
        assert all(1 <= len(gaps) <= 15 for gaps in level["itls"])
        assert 0 < level["median_ttft_ms"] <= level["median_e2el_ms"]
        assert level["mean_tpot_ms"] > 0 and level["output_throughput"] > 0
    for name in ("load.json", "load.md", "load.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_load_chat_against_the_server_and_unknown_adapter(server: Server, tmp_path: Path) -> None:
    argv = ["--base-url", server.url, "--api-key", API_KEY, "--concurrency", "2", "--num-prompts", "4"]
    argv += ["--input-len", "16", "--output-len", "8", "--ignore-eos", "--endpoint", "chat"]
    assert run_cli(*argv, "--models", "caps,words", "--out", str(tmp_path)) == 0
    (level,) = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert level["completed"] == 4 and level["output_lens"] == [8] * 4
    with pytest.raises(EndpointError, match="--models: nope not served"):
        asyncio.run(run_load(LoadConfig(base_url=server.url, models=["fmt", "nope"], api_key=API_KEY)))
