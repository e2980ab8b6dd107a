"""Adapters from S3 (moto's server) and the hub (an offline hub cache) served by the real server on the tiny
base, loaded by their first request: they answer exactly as vLLM's offline engine answers with the same
adapters, concurrent first requests fetch once, and the cache's size limit unloads the least recently used."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import ADMIN_KEY, QUESTIONS, Reference, start_server, stop_server, wait_healthy
from tests.serve.test_sources import (
    BUCKET,
    adapter_bytes,
    aws_environment,
    hub_layout,
    s3_endpoint,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.slow


def fetches(log: str, uri: str) -> int:
    return len(re.findall(rf"fetched adapter {re.escape(uri)} ", log))


def test_adapters_from_s3_and_the_hub_load_on_first_request_and_answer_as_vllm(
    tiny_base: Path,
    adapters_dir: Path,
    engine_reference: Reference,
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        **{"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"},
    )
    s3.create_bucket(Bucket=BUCKET)
    for name in ("fmt", "words"):
        for path in (adapters_dir / name).iterdir():
            s3.upload_file(str(path), BUCKET, f"prod/{name}/{path.name}")
    hub = tmp_path / "hub"
    hub_layout(hub, "org/caps", adapters_dir / "caps")
    fmt, words, caps = f"s3://{BUCKET}/prod/fmt", f"s3://{BUCKET}/prod/words", "org/caps"
    # Room for two of the three adapters (they are the same size).
    cache_size = adapter_bytes(adapters_dir / "fmt") * 5 // 2
    local = tmp_path / "adapters"
    local.mkdir()
    log = tmp_path / "server.log"
    server = start_server(
        tiny_base,
        local,
        log,
        "--admin-api-key",
        ADMIN_KEY,
        "--load-on-request",
        "--adapter-sources",
        f"local,s3://{BUCKET}/prod/,hf:org/",
        "--adapter-cache-dir",
        str(tmp_path / "cache"),
        "--adapter-cache-size",
        str(cache_size),
        env={**aws_environment(s3_endpoint), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_healthy(server)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def answers(model: str) -> list[str]:
            with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # concurrent: the first requests share one fetch
                return list(pool.map(lambda question: chat(client, model, question), QUESTIONS))

        assert answers(fmt) == engine_reference.texts["fmt"]
        assert answers(caps) == engine_reference.texts["caps"]
        assert fetches(log.read_text(), fmt) == fetches(log.read_text(), caps) == 1
        assert answers(fmt) == engine_reference.texts["fmt"]  # served now: fmt is the most recently used
        assert answers(words) == engine_reference.texts["words"]  # over the limit: caps goes
        status = admin_status(server.url)
        assert sorted(entry["uri"] for entry in status["cache"]["adapters"]) == sorted([fmt, words])
        assert sorted(a["name"] for a in status["adapters"]) == sorted([fmt, words])
        assert answers(caps) == engine_reference.texts["caps"]  # fetched again; fmt goes
        assert fetches(log.read_text(), caps) == 2 and fetches(log.read_text(), fmt) == 1
        # /metrics counts the adapter cache's loads and evictions, and knows fmt is only in S3 now.
        samples = {
            family.name: {tuple(sorted(sample.labels.items())): sample.value for sample in family.samples}
            for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        }

        def disk_tier(family: str) -> dict[str, float]:
            return {
                dict(key)["model"]: value
                for key, value in samples[family].items()
                if dict(key)["tier"] == "disk"
            }

        assert disk_tier("tuneserve_adapter_loads") == {fmt: 1, caps: 2, words: 1}
        assert disk_tier("tuneserve_adapter_evictions") == {fmt: 1, caps: 1}
        location = {
            dict(labels)["model"]: dict(labels)["location"]
            for labels, value in samples["tuneserve_adapter_location"].items()
            if value == 1
        }
        assert (
            location[fmt] == "remote"
            and location[caps] == "slot"
            and location[words] in ("slot", "host_memory")
        )
        for missing in (f"s3://{BUCKET}/prod/nothing", "org/nothing", f"s3://{BUCKET}/dev/fmt", "nothing"):
            with pytest.raises(
                openai.NotFoundError, match=f"The model '{re.escape(missing)}' does not exist"
            ):
                chat(client, missing, QUESTIONS[0])
        assert "Traceback" not in log.read_text()
    finally:
        stop_server(server)


def chat(client: openai.OpenAI, model: str, question: str) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
    )
    return response.choices[0].message.content or ""


def admin_status(url: str) -> Any:
    answer = httpx.get(
        f"{url}/v1/lora_adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    answer.raise_for_status()
    return answer.json()
