"""Adapters from S3 and the hub, loaded on first request: a real S3 API (moto's server, on a free local port)
and a local folder laid out as the hub's cache (offline), real PEFT folders checked by the real registry; the
engine is test_http's fake (test_sources_e2e.py serves them from vLLM)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.launch import free_port
from serve.adapters import AdapterError, AdapterRegistry
from serve.models import REFUSAL_MEMORY_S, ServedModels
from serve.protocol import OpenAIError
from serve.sources import AdapterCache, AdapterRef, AdapterSources, SourceNotFound, parse_ref
from tests.serve.test_adapters import edit_config, tiny_models  # noqa: F401 (a fixture)
from tests.serve.test_http import (
    FakeEngine,
    _no_heap_freeze,  # noqa: F401 (an autouse fixture)
)
from tests.serve.test_tenants import keys_file  # noqa: F401 (a fixture)

BUCKET = "team-bucket"
MiB = 1 << 20


# -- the allow-list ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://b/team/sql", AdapterRef("s3", "s3://b/team/sql", "b/team/sql")),
        ("s3://b/team/sql/", AdapterRef("s3", "s3://b/team/sql", "b/team/sql")),
        ("org/sql", AdapterRef("hf", "org/sql", "org/sql")),
        ("org/sql@v2", AdapterRef("hf", "org/sql@v2", "org/sql", "v2")),
        ("s3://b", None),  # a bucket is no adapter
        ("s3://b/../x", None),
        ("sql", None),  # a name of the adapters dir
        ("org/sql@", None),
        ("a/b/c", None),
        ("hf:org/sql", None),  # hf: marks a source or an admin lora_path, never a model id
    ],
)
def test_references_parse_to_one_spelling(value: str, expected: AdapterRef | None) -> None:
    assert parse_ref(value) == expected


def test_only_what_the_allow_list_covers_is_a_source() -> None:
    sources = AdapterSources.parse(["local", "s3://team-bucket/prod", "hf:org/", "hf:other/one"])
    assert sources.local and sources.remote
    allowed = [
        "s3://team-bucket/prod/sql",
        "s3://team-bucket/prod/a/b",
        "org/sql",
        "org/sql@main",
        "other/one",
        "other/one@v1",
    ]
    refused = [
        "s3://team-bucket/prodx/sql",  # a prefix is a folder, not a string prefix
        "s3://team-bucket/dev/sql",
        "s3://team-bucket-2/prod/sql",
        "orgx/sql",
        "other/two",
        "sql",
        "hf:org/sql",
    ]
    assert [value for value in allowed if sources.allowed(value) is None] == []
    assert [value for value in refused if sources.allowed(value) is not None] == []
    assert sources.describe() == "local,s3://team-bucket/prod/,hf:org/,hf:other/one/"
    assert AdapterSources.parse(["hf:"]).allowed("anyone/anything") is not None
    assert not AdapterSources.parse(["local"]).remote


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("ftp://x", "is not one of: local, s3://BUCKET/PREFIX/, hf:ORG/"),
        ("s3://", "names no bucket"),
        ("hf:a/b/c", "is not a hub owner or repo"),
        ("/data/adapters", "is not one of"),
    ],
)
def test_a_bad_source_fails_the_command_line_naming_it(
    entry: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve.__main__ import main

    assert main(["--base-model", "org/base", "--adapter-sources", f"local,{entry}"]) == 2
    err = capsys.readouterr().err
    assert f"--adapter-sources: adapter source '{entry}' {message}" in err


# -- a real S3 API and a hub cache ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server in its own process, like any S3-compatible endpoint (MinIO, R2, Ceph)."""
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def aws_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client on a fresh bucket; the AWS variables point s3fs (and botocore) at moto."""
    import boto3
    import httpx

    for key, value in aws_environment(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    httpx.post(f"{s3_endpoint}/moto-api/reset")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def upload(client: Any, folder: Path, prefix: str) -> str:
    for path in folder.iterdir():
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def hub_layout(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> None:
    """`folder` as the hub's cache holds a download of `repo_id` at `revision` (blobs, snapshot links)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = f"{abs(hash((repo_id, revision))):040x}"[-40:]
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in folder.iterdir():
        blob = repo / "blobs" / f"{commit}-{path.name}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub whose cache is a test folder (huggingface_hub reads its settings at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def adapter_files(tiny_models: tuple[Path, Path], tmp_path: Path) -> Callable[..., Path]:  # noqa: F811
    """A copy of the tiny base's LoRA template declaring the base, with adapter_config.json edits."""
    base, template = tiny_models

    def make(name: str, **edits: Any) -> Path:
        path = tmp_path / "made" / name
        shutil.copytree(template, path)
        edit_config(path, base_model_name_or_path=str(base), **edits)
        return path

    return make


def adapter_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def served_models(
    base: Path, tmp_path: Path, sources: list[str], cache_bytes: int = 64 * MiB, **extra: Any
) -> ServedModels:
    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(base_model=str(base), adapters_dir=adapters_dir, max_lora_rank=16)
    parsed = AdapterSources.parse(sources)
    return ServedModels(
        engine=FakeEngine(),  # type: ignore[arg-type]
        registry=registry,
        model_id="base",
        max_model_len=64,
        sources=parsed,
        cache=AdapterCache(tmp_path / "cache", cache_bytes) if parsed.remote else None,
        **extra,
    )


def count_downloads(models: ServedModels, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    assert models.cache is not None
    downloads: list[str] = []
    download = models.cache.download

    def counted(ref: AdapterRef) -> Any:
        downloads.append(ref.uri)
        time.sleep(0.2)  # long enough for every concurrent first request to be waiting
        return download(ref)

    monkeypatch.setattr(models.cache, "download", counted)
    return downloads


# -- loaded on first request ------------------------------------------------------------------------------


def test_concurrent_first_requests_fetch_an_s3_adapter_once_and_all_get_it(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = upload(s3, adapter_files("sql"), "prod/sql")
    models = served_models(tiny_models[0], tmp_path, [f"s3://{BUCKET}/prod/"], load_on_request=True)
    downloads = count_downloads(models, monkeypatch)

    async def scenario() -> None:
        await asyncio.gather(*(models.ensure(uri) for _ in range(8)))
        lora = models.resolve(uri)
        assert lora is not None and lora.lora_name == uri
        await models.ensure(uri)  # served: nothing to do

    asyncio.run(scenario())
    assert downloads == [uri]
    assert [card.id for card in models.list_models().data] == ["base", uri]
    assert models.cache is not None
    (entry,) = models.cache
    assert entry.uri == uri and sorted(p.name for p in entry.path.iterdir()) == sorted(
        p.name for p in adapter_files("again").iterdir()
    )
    status = asyncio.run(models.status())
    assert status["adapters"][0]["source"] == uri and status["cache"]["adapters"][0]["uri"] == uri


def test_a_name_outside_the_sources_or_missing_from_them_is_the_unknown_models_404(
    s3: Any,
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = served_models(tiny_models[0], tmp_path, ["local", f"s3://{BUCKET}/prod/"], load_on_request=True)
    downloads = count_downloads(models, monkeypatch)

    def not_found(model: str) -> dict[str, Any]:
        with pytest.raises(OpenAIError) as caught:
            asyncio.run(models.ensure(model))
            models.resolve(model)
        assert caught.value.status == 404
        return json.loads(json.dumps(caught.value.body()).replace(model, "MODEL"))

    unknown = not_found("no-such-adapter")
    # Not covered by the allow-list: refused before any request to S3.
    assert not_found("s3://other-bucket/prod/sql") == unknown
    assert not_found(f"s3://{BUCKET}/dev/sql") == unknown
    assert not_found("org/sql") == unknown
    assert downloads == []
    # Covered, but nothing is there: S3 is asked once, then the answer is remembered for a while.
    missing = f"s3://{BUCKET}/prod/missing"
    assert not_found(missing) == unknown
    assert not_found(missing) == unknown
    assert downloads == [missing]
    assert models.cache is not None and list(models.cache) == []


def test_without_load_on_request_a_source_adapter_loads_only_through_the_admin_api(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = upload(s3, adapter_files("sql"), "prod/sql")
    models = served_models(tiny_models[0], tmp_path, [f"s3://{BUCKET}/prod/"])

    async def scenario() -> None:
        await models.ensure(uri)
        with pytest.raises(OpenAIError):
            models.resolve(uri)
        adapter = await models.load("sql", uri)  # vLLM's load API: any name, the source as lora_path
        assert adapter.name == "sql" and models.resolve("sql") is not None
        for outside in ("s3://other-bucket/prod/sql", "hf:org/sql"):
            with pytest.raises(AdapterError, match="is not in an allowed adapter source") as caught:
                await models.load("other", outside)
            assert caught.value.status == 403

    asyncio.run(scenario())


def test_hub_adapters_come_from_the_hub_cache_by_revision(
    hub_cache: Path,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    hub_layout(hub_cache, "org/sql", adapter_files("sql-main", r=8))
    hub_layout(hub_cache, "org/sql", adapter_files("sql-v2", r=8, lora_alpha=32), revision="v2")
    models = served_models(tiny_models[0], tmp_path, ["hf:org/"], load_on_request=True)

    async def scenario() -> None:
        await models.ensure("org/sql")
        await models.ensure("org/sql@v2")
        await models.load("pinned", "hf:org/sql@v2")
        with pytest.raises(OpenAIError) as missing:
            await models.ensure("org/other")
        assert missing.value.status == 404

    asyncio.run(scenario())
    assert models.registry.names() == ["org/sql", "org/sql@v2", "pinned"]
    configs = {
        name: json.loads((models.registry.get(name).path / "adapter_config.json").read_text())  # type: ignore[union-attr]
        for name in models.registry.names()
    }
    assert configs["org/sql"]["lora_alpha"] != 32
    assert configs["org/sql@v2"]["lora_alpha"] == 32 == configs["pinned"]["lora_alpha"]


def test_a_new_folder_in_the_adapters_dir_is_served_on_its_first_request(
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    models = served_models(tiny_models[0], tmp_path, ["local"], load_on_request=True)
    assert models.cache is None
    shutil.copytree(adapter_files("sql"), tmp_path / "adapters" / "sql")
    asyncio.run(models.ensure("sql"))
    assert models.resolve("sql") is not None
    # Without `local` in the sources, the folder is served only by a refresh or an admin load.
    other = served_models(tiny_models[0], tmp_path / "x", ["hf:org/"], load_on_request=True)
    shutil.copytree(adapter_files("csv"), tmp_path / "x" / "adapters" / "csv")
    asyncio.run(other.ensure("csv"))
    assert other.registry.get("csv") is None


def test_an_adapter_that_does_not_fit_is_refused_remembered_and_not_kept(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = upload(s3, adapter_files("big", r=32), "prod/big")
    models = served_models(tiny_models[0], tmp_path, [f"s3://{BUCKET}/prod/"], load_on_request=True)
    downloads = count_downloads(models, monkeypatch)
    for _ in range(2):
        with pytest.raises(AdapterError, match="max-lora-rank") as caught:
            asyncio.run(models.ensure(uri))
        assert caught.value.status == 400
    assert downloads == [uri]  # the second request got the remembered refusal
    assert models.cache is not None and list(models.cache) == []
    assert [r.name for r in models.refused] == [uri]
    # Once the memory is over, the source is asked again (the adapter may have been fixed there).
    refused_at, error = models._refusals[uri]
    models._refusals[uri] = (refused_at - REFUSAL_MEMORY_S, error)
    with pytest.raises(AdapterError):
        asyncio.run(models.ensure(uri))
    assert downloads == [uri, uri]


# -- the cache --------------------------------------------------------------------------------------------


def test_the_least_recently_used_adapter_not_in_use_is_unloaded_and_deleted(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uris = [upload(s3, adapter_files(name), f"prod/{name}") for name in ("a", "b", "c", "d")]
    size = adapter_bytes(adapter_files("size"))
    models = served_models(
        tiny_models[0],
        tmp_path,
        [f"s3://{BUCKET}/prod/"],
        cache_bytes=2 * size + size // 2,
        load_on_request=True,
    )
    downloads = count_downloads(models, monkeypatch)
    a, b, c, d = uris
    assert models.cache is not None

    async def scenario() -> None:
        await models.ensure(a)
        await models.ensure(b)
        await models.ensure(a)  # a is now more recent than b
        await models.ensure(c)  # over the limit: b goes
        assert models.registry.names() == sorted([a, c])
        assert [entry.uri for entry in models.cache] == [a, c]
        # An adapter with a request running stays, whatever its age: the next oldest goes instead.
        running = models.resolve(a)
        models.request_started(running, a)
        await models.ensure(d)
        assert models.registry.names() == sorted([a, d])
        models.request_finished(running)
        await models.ensure(b)  # fetched again
        assert models.registry.names() == sorted([b, d])

    asyncio.run(scenario())
    assert downloads == [a, b, c, d, b]
    assert models.cache.total_bytes <= models.cache.max_bytes
    assert sorted(
        path.name for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")
    ) == sorted(AdapterRef("s3", uri, uri[5:]).key for uri in (b, d))


def test_an_adapter_larger_than_the_cache_is_refused_before_downloading(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = upload(s3, adapter_files("sql"), "prod/sql")
    models = served_models(tiny_models[0], tmp_path, [f"s3://{BUCKET}/prod/"], cache_bytes=1024)
    with pytest.raises(AdapterError, match=r"more than the whole adapter cache.*--adapter-cache-size"):
        asyncio.run(models.load("sql", uri))
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / ".lock"]


def test_an_interrupted_fetch_is_never_served_and_is_cleared_at_start(
    s3: Any, adapter_files: Callable[..., Path], tmp_path: Path
) -> None:
    uri = upload(s3, adapter_files("sql"), "prod/sql")
    root = tmp_path / "cache"
    cache = AdapterCache(root, 64 * MiB)
    ref = parse_ref(uri)
    assert ref is not None
    cache.add(cache.download(ref))
    cache.close()
    # A crash mid-download leaves a staging folder; one mid-copy by hand, a folder without source.json.
    (root / ".staging-0123").mkdir()
    (root / ".staging-0123" / "adapter_config.json").write_text("{}")
    (root / "deadbeef" / "adapter").mkdir(parents=True)
    reopened = AdapterCache(root, 64 * MiB)
    assert [entry.uri for entry in reopened] == [uri]
    assert sorted(path.name for path in root.iterdir()) == sorted([".lock", ref.key])
    # One server per folder: a second one would evict what the first serves.
    with pytest.raises(ValueError, match="in use by another server process"):
        AdapterCache(root, 64 * MiB)
    reopened.close()


def test_a_folder_without_an_adapter_config_is_not_found(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="prod/notes/readme.md", Body=b"not an adapter")
    cache = AdapterCache(tmp_path / "cache", 64 * MiB)
    for uri in (f"s3://{BUCKET}/prod/notes", f"s3://{BUCKET}/prod/nothing-here"):
        ref = parse_ref(uri)
        assert ref is not None
        with pytest.raises(SourceNotFound):
            cache.download(ref)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [".lock"]
    cache.close()


# -- through the HTTP API, with tenants ------------------------------------------------------------------


def test_a_key_loads_only_adapters_in_its_scope_and_others_get_the_unknown_models_404(
    s3: Any,
    adapter_files: Callable[..., Path],
    tiny_models: tuple[Path, Path],  # noqa: F811
    keys_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from serve.settings import ServeSettings
    from tests.serve.test_http import CHAT
    from tests.serve.test_tenants import ADMIN_KEY, KEY_A, ROOT_KEY, bearer, tenant_app

    uri = upload(s3, adapter_files("sql"), "prod/sql")
    settings = ServeSettings(
        base_model=str(tiny_models[0]),
        api_key=ROOT_KEY,
        admin_api_key=ADMIN_KEY,
        api_keys_file=keys_file,
        adapter_sources=[f"s3://{BUCKET}/prod/"],
        load_on_request=True,
        adapter_cache_dir=tmp_path / "cache",
    )

    async def scenario() -> None:
        async with tenant_app(settings) as running:
            client = running.client
            # team-a's scope is tuned-a and shared-*: the adapter exists, but for this key it does not.
            scoped = await client.post(
                "/v1/chat/completions", json={**CHAT, "model": uri}, headers=bearer(KEY_A)
            )
            unknown = await client.post(
                "/v1/chat/completions", json={**CHAT, "model": "no-such"}, headers=bearer(KEY_A)
            )
            assert scoped.status_code == unknown.status_code == 404
            assert scoped.json() == json.loads(unknown.text.replace("no-such", uri))
            assert not any((tmp_path / "cache").glob("[!.]*"))  # nothing fetched for it
            # A key for every model loads it on its first request.
            for route, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi"})):
                answer = await client.post(route, json={**body, "model": uri}, headers=bearer(ROOT_KEY))
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == uri
            listed = await client.get("/v1/models", headers=bearer(ROOT_KEY))
            assert uri in [card["id"] for card in listed.json()["data"]]
            status = await client.get("/v1/lora_adapters", headers=bearer(ADMIN_KEY))
            (cached,) = status.json()["cache"]["adapters"]
            assert cached["uri"] == uri and status.json()["sources"] == f"s3://{BUCKET}/prod/"
            unload = await client.post(
                "/v1/unload_lora_adapter", json={"lora_name": uri}, headers=bearer(ADMIN_KEY)
            )
            assert unload.status_code == 200, unload.text

    asyncio.run(scenario())
