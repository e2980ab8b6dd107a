"""`python -m serve.cluster`: the server as Ray Serve replicas on a local Ray cluster (real Ray and engines).

Two replicas on the tiny base, six adapters: requests for an adapter stay on the replica that has it loaded,
every greedy answer equals a single `python -m serve`'s, and a replica killed under load is replaced by Ray
while the client sees only the requests that were on it fail."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pipeline.launch import ServerProcess, free_port
from serve.cluster.__main__ import main
from serve.cluster.app import build
from serve.cluster.ingress import request_model
from serve.cluster.replica import AFFINITY_HEADER, REPLICA_HEADER, per_node_settings
from serve.cluster.settings import ClusterSettings
from serve.settings import ServeSettings
from tests.e2e import QUESTIONS, start_server, stop_server, wait_healthy
from tests.e2e import engine_flags as e2e_engine_flags
from tests.finetune.conftest import REPO_ROOT

# Six adapters, two replicas with two LoRA slots each (ENGINE_ARGS' max_loras): the copies serve under their
# own names, so Ray and vLLM treat them as distinct adapters.
SIX_ADAPTERS = {"fmt": "fmt", "caps": "caps", "words": "words", "elsewhere": "elsewhere"}
SIX_ADAPTERS |= {"caps_copy": "caps", "words_copy": "words"}
# Each engine keeps three adapters in host memory (vLLM's max_cpu_loras, and so Ray's models per replica):
# two replicas hold all six between them, so every adapter can stay on one replica.
CPU_LORAS = 3
# --load-on-request: an adapter copied into the adapters dir later is served at its first request.
SERVE_FLAGS = ["--max-cpu-loras", str(CPU_LORAS), "--load-on-request"]
REQUESTS = 200
CONCURRENCY = 8
MAX_TOKENS = 24


def engine_flags() -> list[str]:
    return [*e2e_engine_flags(), *SERVE_FLAGS]


# ----------------------------------------------------------------------------------- the command line
def test_replicas_get_every_serve_setting(tmp_path: Path) -> None:
    args = ["--base-model", str(tmp_path), "--max-loras", "3", "--api-key", "k", "--seed", "7"]
    cluster = ClusterSettings(_cli_parse_args=[*args, "--replicas", "4", "--address", "auto"])
    single = ServeSettings(_cli_parse_args=args)
    assert (cluster.replicas, cluster.address) == (4, "auto")
    assert cluster.replica_settings().model_dump() == single.model_dump()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas: Input should be greater than or equal to 1"),
        (["--port", "0"], "--port: Ray Serve's proxy needs a fixed port"),
        (["--replica-gpus", "-1"], "--replica-gpus: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_command_line_exits_2_naming_the_flag(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--base-model", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_base_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-model", str(tmp_path / "nothing")]) == 2
    assert "--base-model: no folder" in capsys.readouterr().err


def test_replicas_on_one_node_get_their_own_metrics_port_and_adapter_cache(tmp_path: Path) -> None:
    args = [
        "--base-model",
        str(tmp_path),
        "--metrics-port",
        "9100",
        "--adapter-cache-dir",
        str(tmp_path / "c"),
    ]
    settings = ServeSettings(_cli_parse_args=[*args, "--adapter-sources", "local,s3://bucket/adapters/"])
    assert per_node_settings(settings, 2) == {
        "metrics_port": 9102,
        "adapter_cache_dir": tmp_path / "c" / "replica-2",
    }
    # Local adapters only: no cache folder is used, so none is set.
    assert per_node_settings(ServeSettings(_cli_parse_args=args), 0) == {"metrics_port": 9100}


def test_ray_tools_build_the_application_from_the_same_settings(tmp_path: Path) -> None:
    # What `serve run serve.cluster.app:build ...` and a KubeRay RayService's serveConfigV2 call.
    from pydantic import ValidationError
    from ray.serve import Application

    assert isinstance(build({"base-model": str(tmp_path), "replicas": 3, "max_loras": 2}), Application)
    with pytest.raises(ValidationError, match="replicas"):
        build({"base_model": str(tmp_path), "replicas": 0})


def test_the_ingress_routes_by_the_json_body_model() -> None:
    assert request_model(b'{"model": "caps", "messages": []}') == "caps"
    for body in (b"", b"not json", b"[1]", b'{"model": 3}', b'{"model": ""}', b'{"prompt": "x"}'):
        assert request_model(body) is None


# ------------------------------------------------------------------------------- on a Ray cluster
@pytest.fixture(scope="module")
def six_adapters(adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster") / "adapters"
    for name, source in SIX_ADAPTERS.items():
        shutil.copytree(adapters_dir / source, root / name)
    return root


Answers = dict[tuple[str, str], str]


def chat_body(model: str, question: str, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": question}]
    return {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}


@pytest.fixture(scope="module")
def single_server_answers(
    tiny_base: Path, six_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Answers:
    """Greedy answers of one `python -m serve` with the replicas' flags, for every adapter and question."""
    log = tmp_path_factory.mktemp("cluster-log") / "single.log"
    server = start_server(tiny_base, six_adapters, log, *SERVE_FLAGS)
    try:
        wait_healthy(server)
        answers = {}
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for model in SIX_ADAPTERS:
                for question in QUESTIONS:
                    response = client.post("/v1/chat/completions", json=chat_body(model, question))
                    response.raise_for_status()
                    answers[model, question] = response.json()["choices"][0]["message"]["content"]
    finally:
        stop_server(server)
    # Copies answer as their originals: the same weights under another name.
    assert answers["caps_copy", QUESTIONS[0]] == answers["caps", QUESTIONS[0]]
    return answers


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray cluster of two CPUs (one per replica), stopped after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(
    tiny_base: Path,
    six_adapters: Path,
    ray_address: str,
    single_server_answers: Answers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    # single_server_answers first: its engine is gone before the replicas' start.
    port = free_port()
    command = [sys.executable, "-m", "serve.cluster", "--replicas", "2", "--address", ray_address]
    command += ["--base-model", str(tiny_base), "--adapters-dir", str(six_adapters)]
    command += ["--host", "127.0.0.1", "--port", str(port), *engine_flags()]
    log = tmp_path_factory.mktemp("cluster-log") / "cluster.log"
    server = ServerProcess("cluster", command, f"http://127.0.0.1:{port}", log, cwd=REPO_ROOT)
    try:
        server.start(timeout=600)
        yield server
    finally:
        server.stop(grace_s=60)


@dataclass
class Outcome:
    model: str
    question: str
    status: int | None = None  # None: the stream broke after its headers (or the connection failed)
    replica: str | None = None
    affinity: str | None = None
    text: str = ""
    started_at: float = 0.0
    headers_at: float | None = None
    finished_at: float | None = None
    events: list[str] = field(default_factory=list)


async def stream_chat(client: httpx.AsyncClient, outcome: Outcome) -> Outcome:
    """One streamed chat completion; its replica is known as soon as the headers arrive."""
    outcome.started_at = time.monotonic()
    body = chat_body(outcome.model, outcome.question, stream=True)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            outcome.headers_at = time.monotonic()
            outcome.replica = response.headers.get(REPLICA_HEADER)
            outcome.affinity = response.headers.get(AFFINITY_HEADER)
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    outcome.events.append(line.removeprefix("data: "))
            if response.status_code == 200 and outcome.events[-1:] != ["[DONE]"]:
                raise httpx.RemoteProtocolError("the stream ended without [DONE]")
            outcome.status = response.status_code
    except httpx.TransportError:
        outcome.status = None
    outcome.finished_at = time.monotonic()
    if outcome.status == 200:
        chunks = [json.loads(event) for event in outcome.events[:-1]]
        outcome.text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return outcome


async def drive(
    url: str, requests: list[tuple[str, str]], on_done: Callable[[list[Outcome]], None] | None = None
) -> list[Outcome]:
    """Send `requests` (model, question) with CONCURRENCY in flight; `on_done(outcomes)` after each answer."""
    outcomes = [Outcome(model, question) for model, question in requests]
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(outcome: Outcome) -> None:
            async with gate:
                await stream_chat(client, outcome)
            if on_done is not None:
                on_done(outcomes)

        await asyncio.gather(*(one(outcome) for outcome in outcomes))
    return outcomes


def mixed_requests(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(list(SIX_ADAPTERS)), rng.choice(QUESTIONS)) for _ in range(count)]


@pytest.mark.slow
def test_adapter_requests_stay_on_their_replica_and_answer_as_one_server(
    cluster: ServerProcess, single_server_answers: Answers
) -> None:
    outcomes = asyncio.run(drive(cluster.url, mixed_requests(REQUESTS, seed=0)))
    assert [o.status for o in outcomes] == [200] * REQUESTS
    wrong = [
        (o.model, o.question, o.text)
        for o in outcomes
        if o.text != single_server_answers[o.model, o.question]
    ]
    assert not wrong, f"{len(wrong)} answers differ from the single server's: {wrong[:3]}"
    replicas = {o.replica for o in outcomes}
    assert len(replicas) == 2, replicas
    # Affinity: the adapter was loaded on the replica Ray chose. Without it (a replica drawn at random, each
    # keeping its 3 most recent of 6 adapters) about half the requests would miss.
    hits = sum(o.affinity == "hit" for o in outcomes)
    by_adapter = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_adapter[o.model][o.replica] += 1
    # Share of each adapter's requests on the replica that answered most of them (random routing: about 0.5).
    same_replica = sum(counts.most_common(1)[0][1] for counts in by_adapter.values()) / REQUESTS
    print(
        f"\naffinity over {REQUESTS} requests, {len(SIX_ADAPTERS)} adapters, 2 replicas: "
        f"hit rate {hits / REQUESTS:.3f}, on the adapter's main replica {same_replica:.3f}; "
        f"per adapter {dict((m, dict(c)) for m, c in by_adapter.items())}"
    )
    # Measured 0.80 to 0.955 over five runs on 2 cores (2026-12-02). Misses: the first 8 requests arrive
    # before any replica holds an adapter; Ray's router sends a request elsewhere when the adapter's replica
    # does not answer its queue-length probe in time; and with 6 adapters in 2 x 3 slots each extra load
    # evicts one. Random routing would give about 0.5.
    assert hits / REQUESTS >= 0.75
    assert same_replica >= 0.75


@pytest.mark.slow
def test_an_adapter_loaded_on_request_gets_its_requests_routed_to_that_replica(
    cluster: ServerProcess, single_server_answers: Answers, six_adapters: Path
) -> None:
    shutil.copytree(six_adapters / "fmt", six_adapters / "late")
    requests = [("late", QUESTIONS[0])] * 6
    outcomes = []
    for request in requests:
        outcomes += asyncio.run(drive(cluster.url, [request]))
        time.sleep(1)  # the replica tells Ray what it holds every 0.1 s; Ray's router hears it soon after
    assert [o.status for o in outcomes] == [200] * len(requests)
    assert {o.text for o in outcomes} == {single_server_answers["fmt", QUESTIONS[0]]}
    # The first request loaded it where Ray sent it (not yet an adapter of either replica: no affinity
    # header); from then on Ray sends its requests to that replica, where it is loaded.
    assert outcomes[0].affinity is None
    assert [o.affinity for o in outcomes[1:]] == ["hit"] * (len(requests) - 1)
    assert {o.replica for o in outcomes} == {outcomes[0].replica}


def aborted_by_replica(url: str, model: str, replicas: int = 2) -> dict[str, float]:
    """tuneserve_requests_aborted_total for `model` on each replica: /metrics answers from any one, so ask
    until every replica has answered."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while len(counts) < replicas:
        assert time.monotonic() < deadline, f"only {sorted(counts)} answered /metrics"
        response = httpx.get(f"{url}/metrics", timeout=30)
        families = text_string_to_metric_families(response.text)
        samples = [s for f in families if f.name == "tuneserve_requests_aborted" for s in f.samples]
        total = sum(s.value for s in samples if s.name.endswith("_total") and s.labels.get("model") == model)
        counts[response.headers[REPLICA_HEADER]] = total
    return counts


@pytest.mark.slow
def test_a_client_that_goes_away_aborts_its_request_on_the_replica(cluster: ServerProcess) -> None:
    before = aborted_by_replica(cluster.url, "words")
    body = chat_body("words", QUESTIONS[0], max_tokens=480, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    # Ray's proxy cancels the ingress's call, which cancels the replica's: the app sees the disconnect.
    deadline = time.monotonic() + 30
    while aborted_by_replica(cluster.url, "words")[replica] == before[replica]:
        assert time.monotonic() < deadline, "the disconnected stream was never aborted on its replica"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_only_its_requests_fail(
    cluster: ServerProcess, single_server_answers: Answers, tiny_base: Path
) -> None:
    import ray

    killed: dict[str, object] = {}

    def kill_mid_load(outcomes: list[Outcome]) -> None:
        done = [o for o in outcomes if o.finished_at is not None]
        if killed or len(done) < 30:
            return
        victim = done[-1].replica
        assert victim is not None
        # What the client had in flight at the kill: on the victim (headers from it), or not yet placed.
        killed["in_flight_on_victim"] = [o for o in outcomes if o.finished_at is None and o.replica == victim]
        killed["unplaced"] = [
            o for o in outcomes if o.finished_at is None and o.headers_at is None and o.started_at
        ]
        killed["at"] = time.monotonic()
        killed["victim"] = victim
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    outcomes = asyncio.run(drive(cluster.url, mixed_requests(120, seed=1), kill_mid_load))
    assert killed, "the load ended before the kill"
    victim, at = killed["victim"], killed["at"]
    failed = [o for o in outcomes if o.status != 200]
    on_victim = killed["in_flight_on_victim"]
    unplaced = killed["unplaced"]
    assert isinstance(on_victim, list) and isinstance(unplaced, list) and isinstance(at, float)
    print(
        f"\nkilled {victim}: {len(on_victim)} requests in flight on it, {len(unplaced)} not yet placed; "
        f"{len(failed)} of {len(outcomes)} failed: "
        f"{[(o.status, o.replica == victim, o.started_at < at) for o in failed]}"
    )
    # Only requests on the victim fail: in flight there at the kill, or sent to it before Ray saw it die.
    assert all(o.replica in (victim, None) for o in failed)
    assert len(failed) <= len(on_victim) + len(unplaced)
    for o in outcomes:
        if o.status == 200:
            assert o.text == single_server_answers[o.model, o.question]
    # The client's retries succeed (on the surviving replica, or the new one).
    retried = asyncio.run(drive(cluster.url, [(o.model, o.question) for o in failed]))
    assert [o.status for o in retried] == [200] * len(failed)
    assert all(o.text == single_server_answers[o.model, o.question] for o in retried)
    # Ray starts a new replica in the victim's place (its engine loads: a minute or two on 2 cores). Requests
    # for the base carry no adapter, so Ray spreads them over every running replica.
    before = {o.replica for o in outcomes} | {victim}
    deadline = time.monotonic() + 300
    seen: set[str | None] = set()
    while time.monotonic() < deadline and not seen - before:
        answers = asyncio.run(drive(cluster.url, [(str(tiny_base), q) for q in QUESTIONS * 3]))
        assert [o.status for o in answers] == [200] * len(answers)
        seen |= {o.replica for o in answers}
        time.sleep(2)
    assert seen - before, f"no new replica answered within 300 s (seen {seen})"
    assert victim not in seen
