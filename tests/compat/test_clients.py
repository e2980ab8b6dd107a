"""The README's compatibility matrix, row by row: real third-party clients against one real server (the tiny
base and one adapter), each checked on what it returns, and greedy answers equal to vLLM's own engine.

The openai Node SDK is installed by npm into .cache/compat/ on first use (the test skips only without npm);
LiteLLM runs in its own process, which refuses any connection beyond the server.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import QUESTIONS, Reference, Server, start_server, stop_server, wait_healthy
from tests.finetune.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
BASE = "tiny-base"
ADAPTER = "fmt"
MAX_TOKENS = 24  # the engine reference's length
# The last openai-node release for Node 20 (7.x needs Node >= 22); pinned so every run tests the same SDK.
OPENAI_NODE = "6.49.0"
NODE_CACHE = REPO_ROOT / ".cache" / "compat" / f"openai-node-{OPENAI_NODE}"


@pytest.fixture(scope="module")
def compat_server(
    tiny_base: Path, adapters_dir: Path, engine_reference: Reference, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The base served as BASE plus one adapter, with no API key: vLLM's benchmark calls /tokenize without
    one. engine_reference runs first so its offline engine is gone before this one starts."""
    root = tmp_path_factory.mktemp("compat")
    (root / "adapters").mkdir()
    lora = f"{ADAPTER}={adapters_dir / ADAPTER}"
    running = start_server(
        tiny_base, root / "adapters", root / "server.log", "--served-model-name", BASE, "--lora", lora
    )
    try:
        wait_healthy(running)
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def sdk(compat_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{compat_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(question: str = QUESTIONS[0]) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int


@pytest.fixture(scope="module")
def greedy(compat_server: Server, engine_reference: Reference) -> dict[str, Answer]:
    """The openai SDK's greedy answer to QUESTIONS[0] per model, which every other client must receive;
    its text is vLLM's offline engine's."""
    sdk = openai.OpenAI(base_url=f"{compat_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answers = {}
    for model, engine_text in (
        (BASE, engine_reference.texts[None][0]),
        (ADAPTER, engine_reference.texts[ADAPTER][0]),
    ):
        chat = sdk.chat.completions.create(model=model, messages=ask(), temperature=0, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
        assert chat.model == model
        assert chat.usage is not None
        answers[model] = Answer(
            chat.choices[0].message.content or "", chat.choices[0].finish_reason, chat.usage.completion_tokens
        )
        assert answers[model].text == engine_text
    return answers


def test_openai_python_sdk(
    sdk: openai.OpenAI,
    engine_reference: Reference,
    greedy: dict[str, Answer],
    client_versions: dict[str, str],
) -> None:
    client_versions["openai (Python)"] = openai.__version__
    models = {model.id: model for model in sdk.models.list()}
    assert set(models) == {BASE, ADAPTER}
    assert models[ADAPTER].model_dump()["parent"] == BASE
    assert greedy[ADAPTER].text != greedy[BASE].text  # else the adapter's answers would prove nothing
    for answer in greedy.values():
        # An answer stops at the end-of-sequence token or runs to max_tokens.
        assert answer.finish_reason == ("length" if answer.completion_tokens == MAX_TOKENS else "stop")

    stream = sdk.chat.completions.create(
        model=ADAPTER,
        messages=ask(),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) > 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish_reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert chunks[-1].usage is not None
    assert Answer(text, finish_reason, chunks[-1].usage.completion_tokens) == greedy[ADAPTER]

    # The chat's prompt as token ids, on the completions endpoint: the same answer.
    completion = sdk.completions.create(
        model=ADAPTER, prompt=engine_reference.prompts[0], temperature=0, max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].text == greedy[ADAPTER].text

    raw = sdk.chat.completions.with_raw_response.create(
        model=ADAPTER,
        messages=ask(),  # type: ignore[arg-type]
        max_tokens=2,
        extra_headers={"X-Request-Id": "compat-python"},
    )
    assert raw.headers["x-request-id"] == "compat-python"
    assert raw.parse().id == "chatcmpl-compat-python"

    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=ask(), max_tokens=2)  # type: ignore[arg-type]
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert missing.value.request_id  # the x-request-id of the failed request


@pytest.fixture(scope="module")
def openai_node(client_versions: dict[str, str]) -> Path:
    """openai@OPENAI_NODE installed by npm under .cache/compat/ (kept between runs)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("the openai Node SDK row needs node and npm on PATH")
    manifest = NODE_CACHE / "node_modules" / "openai" / "package.json"
    if not manifest.is_file():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        command = [npm, "install", "--prefix", str(NODE_CACHE), "--save-exact", "--no-audit", "--no-fund"]
        install = subprocess.run(
            [*command, f"openai@{OPENAI_NODE}"], capture_output=True, text=True, timeout=300
        )
        assert install.returncode == 0, f"npm could not install openai@{OPENAI_NODE}:\n{install.stderr}"
    assert json.loads(manifest.read_text())["version"] == OPENAI_NODE
    node = subprocess.run(["node", "--version"], check=True, capture_output=True, text=True).stdout.strip()
    client_versions["openai (Node)"] = f"{OPENAI_NODE} on Node {node}"
    # An ES module resolves `openai` from its own folder: the script runs from beside node_modules.
    shutil.copy(HERE / "node_client.mjs", NODE_CACHE / "node_client.mjs")
    return NODE_CACHE / "node_client.mjs"


def test_openai_node_sdk(openai_node: Path, compat_server: Server, greedy: dict[str, Answer]) -> None:
    env = {
        **os.environ,
        "BASE_URL": f"{compat_server.url}/v1",
        "API_KEY": "unused",
        "MODEL": ADAPTER,
        "QUESTION": QUESTIONS[0],
        "MAX_TOKENS": str(MAX_TOKENS),
    }
    run = subprocess.run(["node", str(openai_node)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)

    assert sorted(result["models"], key=lambda m: m["id"]) == [
        {"id": ADAPTER, "parent": BASE},
        {"id": BASE, "parent": None},
    ]
    chat = result["chat"]
    expected = greedy[ADAPTER]
    assert Answer(chat["text"], chat["finishReason"], chat["usage"]["completion_tokens"]) == expected
    assert chat["id"] == f"chatcmpl-{chat['requestId']}"
    assert chat["contentType"].startswith("application/json")
    stream = result["stream"]
    assert Answer(stream["text"], stream["finishReason"], stream["usage"]["completion_tokens"]) == expected
    assert stream["chunks"] > 2
    assert result["notFound"] == {
        "isNotFoundError": True,
        "status": 404,
        "type": "not_found_error",
        "code": "model_not_found",
        "param": "model",
    }


def test_langchain_chat_openai(
    compat_server: Server,
    engine_reference: Reference,
    greedy: dict[str, Answer],
    client_versions: dict[str, str],
) -> None:
    from langchain_openai import ChatOpenAI

    client_versions["langchain-openai"] = importlib.metadata.version("langchain-openai")
    client_versions["langchain-core"] = importlib.metadata.version("langchain-core")
    llm = ChatOpenAI(
        model=ADAPTER,
        base_url=f"{compat_server.url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
    )
    message = llm.invoke(QUESTIONS[0])
    assert message.usage_metadata is not None
    answer = Answer(
        str(message.content),
        message.response_metadata["finish_reason"],
        message.usage_metadata["output_tokens"],
    )
    assert answer == greedy[ADAPTER]
    assert message.response_metadata["model_name"] == ADAPTER

    chunks = list(llm.stream(QUESTIONS[0]))
    assert len(chunks) > 2
    assert "".join(str(chunk.content) for chunk in chunks) == greedy[ADAPTER].text

    # A batch sends its prompts concurrently: each gets its own answer, the engine's.
    assert [m.content for m in llm.batch(QUESTIONS)] == engine_reference.texts[ADAPTER]
    base = ChatOpenAI(
        model=BASE, base_url=f"{compat_server.url}/v1", api_key="unused", temperature=0, max_tokens=MAX_TOKENS
    )  # type: ignore[arg-type, call-arg]
    assert base.invoke(QUESTIONS[0]).content == greedy[BASE].text


def test_litellm(compat_server: Server, greedy: dict[str, Answer], client_versions: dict[str, str]) -> None:
    client_versions["litellm"] = importlib.metadata.version("litellm")
    # LiteLLM fetches its model cost map from GitHub on import unless told to use its packaged copy
    # (litellm/litellm_core_utils/get_model_cost_map.py); LITELLM_OFFLINE_MODE covers its other fetches.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    args = [f"{compat_server.url}/v1", "unused", ADAPTER, QUESTIONS[0], str(MAX_TOKENS)]
    run = subprocess.run(
        [sys.executable, str(HERE / "litellm_client.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["outside"] == []
    assert Answer(**result["plain"]) == greedy[ADAPTER]
    stream = result["stream"]
    assert (stream["text"], stream["finish_reason"]) == (greedy[ADAPTER].text, greedy[ADAPTER].finish_reason)
    assert stream["chunks"] > 2
    assert result["not_found"]["class"] == "NotFoundError" and result["not_found"]["status"] == 404
    assert "no-such-model" in result["not_found"]["message"]


def requests_served(server: Server) -> collections.Counter[str]:
    """Requests answered 200, per model, from the server's /metrics."""
    served: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "tuneserve_requests_total" and sample.labels["status"] == "200":
                served[sample.labels["model"]] += int(sample.value)
    return served


def tokenize_calls(server: Server) -> int:
    """POST /tokenize requests answered 200, from the server's access log (/metrics counts /v1 only)."""
    return server.log_path.read_text().count('"POST /tokenize HTTP/1.1" 200')


@pytest.mark.parametrize(
    ("backend", "endpoint"), [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")]
)
def test_vllm_serving_benchmark(
    compat_server: Server,
    tiny_base: Path,
    backend: str,
    endpoint: str,
    capfd: pytest.CaptureFixture[str],
    client_versions: dict[str, str],
) -> None:
    import vllm
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    client_versions["vLLM benchmarks.serve"] = vllm.__version__
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", backend, "--base-url", compat_server.url, "--endpoint", endpoint]
    # --model is the id it sends, /tokenize's included (a path there would be a 404, as on vLLM's server).
    argv += ["--model", BASE, "--tokenizer", str(tiny_base)]
    argv += [
        "--dataset-name",
        "random",
        "--random-input-len",
        "32",
        "--random-output-len",
        "8",
        "--ignore-eos",
    ]
    argv += ["--num-prompts", "20", "--max-concurrency", "4", "--seed", "0", "--disable-tqdm"]
    argv += ["--lora-modules", ADAPTER, BASE, "--lora-assignment", "round-robin"]
    before, aligned_before = requests_served(compat_server), tokenize_calls(compat_server)
    result = main(parser.parse_args(argv))
    output = "".join(capfd.readouterr())

    assert result["completed"] == 20 and result["failed"] == 0, result.get("errors")
    assert result["total_output_tokens"] == 20 * 8
    assert requests_served(compat_server) - before == {ADAPTER: 10, BASE: 10}
    # It re-aligns random prompts through the server's /tokenize (vllm/benchmarks/serve.py): found, and
    # counting as the local tokenizer does.
    assert tokenize_calls(compat_server) > aligned_before
    assert "/tokenize unavailable" not in output
    assert "tokenizer mismatch" not in output


def curl(*args: str) -> str:
    run = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture
def curl_version(client_versions: dict[str, str]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the curl row needs curl on PATH")
    client_versions["curl"] = curl("--version").split()[1]


@pytest.mark.usefixtures("curl_version")
def test_curl(compat_server: Server, greedy: dict[str, Answer], tmp_path: Path) -> None:
    url = f"{compat_server.url}/v1/chat/completions"
    body = {"model": ADAPTER, "messages": ask(), "temperature": 0, "max_tokens": MAX_TOKENS}
    json_header = ["-H", "Content-Type: application/json"]

    chat = json.loads(curl(url, *json_header, "-d", json.dumps(body)))
    assert chat["object"] == "chat.completion" and chat["model"] == ADAPTER
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"] == greedy[ADAPTER].text

    # -N: no buffering, as one reads a stream; -D: the response headers, to a file.
    headers = tmp_path / "headers"
    events = curl("-N", "-D", str(headers), url, *json_header, "-d", json.dumps({**body, "stream": True}))
    assert re.search(r"(?im)^content-type: text/event-stream", headers.read_text())
    lines = [line for line in events.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == greedy[ADAPTER].text
    )

    # An unknown model: 404 with OpenAI's error body.
    missing = {**body, "model": "no-such-model"}
    answer, _, status = curl(url, *json_header, "-d", json.dumps(missing), "-w", "\n%{http_code}").rpartition(
        "\n"
    )
    assert status == "404"
    error = json.loads(answer)
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "not_found_error" and error["error"]["param"] == "model"
    assert "no-such-model" in error["error"]["message"]
