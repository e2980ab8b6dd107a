"""Tenant keys (--api-keys-file) on the fake-engine app: each key sees and uses only its models, a model
outside them is the same 404 as one that does not exist, rate limits answer 429 with a Retry-After the
openai SDK honours, a bad keys file is refused at start naming the entry, and no key ever reaches the logs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import CliApp

from serve.adapters import Adapter
from serve.app import build_app
from serve.settings import ServeSettings
from serve.tenants import KeysFileError, load_tenants
from tests.serve.test_http import (
    CHAT,
    FakeEngine,
    FakeTokenizer,
    Running,
    _no_heap_freeze,  # noqa: F401  (autouse fixture)
    metric,
)

ROOT_KEY = "sk-root-0123456789"  # --api-key: every model
ADMIN_KEY = "sk-admin-0123456789"
KEY_A = "sk-team-a-0123456789"
KEY_B = "sk-team-b-0123456789"  # stored as its SHA-256 only
KEY_LIMITED = "sk-limited-0123456789"
KEY_ENV = "sk-from-env-0123456789"
ALL_KEYS = (ROOT_KEY, ADMIN_KEY, KEY_A, KEY_B, KEY_LIMITED, KEY_ENV)
ADAPTERS = ("tuned-a", "shared-x", "tuned-b")
ENTRIES = [
    {"name": "team-a", "key": KEY_A, "models": ["tuned-a", "shared-*"]},
    {
        "name": "team-b",
        "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest(),
        "models": ["base", "tuned-b"],
    },
    {"name": "limited", "key": KEY_LIMITED, "models": ["*"], "rate_limit_rpm": 2},
    {"name": "from-env", "key_env": "TEST_TENANT_KEY", "models": ["tuned-b"]},
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_keys(folder: Path, entries: Any, suffix: str = ".yaml") -> Path:
    path = folder / f"keys{suffix}"
    path.write_text(json.dumps(entries) if suffix == ".json" else yaml.safe_dump(entries))
    return path


@pytest.fixture
def keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_TENANT_KEY", KEY_ENV)
    return write_keys(tmp_path, ENTRIES)


class Clock:
    """The rate limiter's clock: real time plus `offset`, which a test moves forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@contextlib.asynccontextmanager
async def tenant_app(
    settings: ServeSettings, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Running]:
    """The app serving the base ("base") and ADAPTERS, with an httpx client on it."""
    engine, tokenizer, stops = FakeEngine(), FakeTokenizer(), []
    app = build_app(
        settings,
        engine_factory=lambda _: engine,
        tokenizer_factory=lambda _: tokenizer,
        request_stop=lambda: stops.append("stop"),
        clock=clock,
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            running = Running(app, engine, tokenizer, client, stops)
            await running.wait_until(lambda: app.state.serving is not None, "the app serves")
            # The registry the server uses, given adapters as a load would leave them (these tests are about
            # keys; test_adapters.py checks real adapter folders).
            # Ids far above those the registry hands out, so adapters it loads later never collide with them.
            for lora_int_id, name in enumerate(ADAPTERS, start=1001):
                adapter = Adapter(name, Path("/adapters") / name, lora_int_id, 8, None, "declared")
                app.state.models.registry.register(adapter)
            yield running


def settings_with(keys_file: Path, **extra: Any) -> ServeSettings:
    return ServeSettings(
        base_model="base", api_key=ROOT_KEY, admin_api_key=ADMIN_KEY, api_keys_file=keys_file, **extra
    )


def not_found_as_unknown(
    answer: httpx.Response, model: str, unknown: httpx.Response, unknown_model: str
) -> None:
    """`answer` (for `model`) is exactly the 404 that `unknown_model`, which does not exist, got."""
    assert answer.status_code == unknown.status_code == 404
    assert answer.json() == json.loads(unknown.text.replace(unknown_model, model))
    assert answer.json()["error"]["code"] == "model_not_found"


# -- scopes ------------------------------------------------------------------------------------------------


def test_each_key_lists_only_its_models(keys_file: Path) -> None:
    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file)) as running:

            async def listed(key: str) -> list[str]:
                answer = await running.client.get("/v1/models", headers=bearer(key))
                assert answer.status_code == 200
                return [card["id"] for card in answer.json()["data"]]

            assert await listed(KEY_A) == ["shared-x", "tuned-a"]  # no base: not in its scope
            assert await listed(KEY_B) == ["base", "tuned-b"]
            assert await listed(KEY_ENV) == ["tuned-b"]
            everything = ["base", "shared-x", "tuned-a", "tuned-b"]
            assert (
                await listed(ROOT_KEY) == await listed(KEY_LIMITED) == await listed(ADMIN_KEY) == everything
            )
            for key in (None, "sk-wrong", KEY_B[:-1]):
                refused = await running.client.get("/v1/models", headers=bearer(key) if key else {})
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

    asyncio.run(scenario())


def test_a_model_outside_the_scope_is_the_404_of_a_model_that_does_not_exist(keys_file: Path) -> None:
    """On every route that names a model; "shared-nope" is in team-a's scope but does not exist."""
    key = bearer(KEY_A)
    routes: list[tuple[str, str, Callable[[str], dict[str, Any] | None]]] = [
        ("POST", "/v1/chat/completions", lambda model: {**CHAT, "model": model}),
        ("POST", "/v1/completions", lambda model: {"model": model, "prompt": "a"}),
        ("POST", "/v1/responses", lambda model: {"model": model, "input": "hi"}),
        ("POST", "/tokenize", lambda model: {"model": model, "prompt": "a"}),
        ("POST", "/detokenize", lambda model: {"model": model, "tokens": [97]}),
        ("GET", "/v1/models/{model}", lambda model: None),
    ]

    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file)) as running:
            for method, path, body in routes:

                async def call(
                    model: str,
                    headers: dict[str, str],
                    method: str = method,
                    path: str = path,
                    body: Any = body,
                ) -> httpx.Response:
                    url = path.format(model=model)
                    return await running.client.request(method, url, json=body(model), headers=headers)

                for outside in ("tuned-b", "base"):
                    answer = await call(outside, key)
                    not_found_as_unknown(answer, outside, await call("shared-nope", key), "shared-nope")
                    assert (await call(outside, bearer(ROOT_KEY))).status_code == 200, (path, outside)
                for inside in ("tuned-a", "shared-x"):
                    assert (await call(inside, key)).status_code == 200, (path, inside)
            # The tokenizer routes without a model use the base's tokenizer, which every adapter shares.
            plain = await running.client.post("/tokenize", json={"prompt": "a"}, headers=key)
            assert plain.status_code == 200

    asyncio.run(scenario())


def test_admin_routes_take_the_admin_key_only(keys_file: Path) -> None:
    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file)) as running:
            for key in (KEY_A, KEY_LIMITED, ROOT_KEY):
                refused = await running.client.get("/v1/lora_adapters", headers=bearer(key))
                assert refused.status_code == 401
                unload = await running.client.post(
                    "/v1/unload_lora_adapter", json={"lora_name": "tuned-b"}, headers=bearer(key)
                )
                assert unload.status_code == 401
            status = await running.client.get("/v1/lora_adapters", headers=bearer(ADMIN_KEY))
            assert [a["name"] for a in status.json()["adapters"]] == sorted(ADAPTERS)

    asyncio.run(scenario())


def test_the_admin_key_alone_leaves_the_api_open_and_guards_the_admin_routes() -> None:
    async def scenario() -> None:
        async with tenant_app(ServeSettings(base_model="base", admin_api_key=ADMIN_KEY)) as running:
            for headers in ({}, bearer("sk-anything")):
                models = await running.client.get("/v1/models", headers=headers)
                assert models.status_code == 200, models.text
                chat = await running.client.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert chat.status_code == 200, chat.text
                assert (await running.client.get("/v1/lora_adapters", headers=headers)).status_code == 401
            status = await running.client.get("/v1/lora_adapters", headers=bearer(ADMIN_KEY))
            assert status.status_code == 200

    asyncio.run(scenario())


def test_metrics_count_by_tenant_and_need_a_key_for_every_model(keys_file: Path) -> None:
    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file)) as running:
            await running.client.post(
                "/v1/chat/completions", json={**CHAT, "model": "tuned-a"}, headers=bearer(KEY_A)
            )
            await running.client.post(
                "/v1/chat/completions", json={**CHAT, "model": "tuned-b"}, headers=bearer(KEY_A)
            )
            await running.client.get("/v1/models", headers=bearer("sk-wrong"))
            scoped = await running.client.get("/metrics", headers=bearer(KEY_A))
            assert scoped.status_code == 403 and scoped.json()["error"]["type"] == "permission_error"
            text = (await running.client.get("/metrics", headers=bearer(ROOT_KEY))).text
            assert metric(text, "tuneserve_tenant_requests_total", tenant="team-a", status="200") == 1
            assert metric(text, "tuneserve_tenant_requests_total", tenant="team-a", status="404") == 1
            assert metric(text, "tuneserve_tenant_requests_total", tenant="-", status="401") == 1
            assert (await running.client.get("/metrics", headers=bearer(KEY_LIMITED))).status_code == 200

    asyncio.run(scenario())


def test_published_schema_declares_keys_and_the_429_of_rate_limits(keys_file: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file)) as running:
            schema = (await running.client.get("/openapi.json", headers=bearer(ROOT_KEY))).json()
            chat = schema["paths"]["/v1/chat/completions"]["post"]
            assert "429" in chat["responses"] and chat["security"] == [{"apiKey": []}]
        unlimited = write_keys(tmp_path, [{"name": "a", "key": KEY_A, "models": ["*"]}], ".json")
        async with tenant_app(ServeSettings(base_model="base", api_keys_file=unlimited)) as running:
            schema = (await running.client.get("/openapi.json", headers=bearer(KEY_A))).json()
            chat = schema["paths"]["/v1/chat/completions"]["post"]
            assert "429" not in chat["responses"] and chat["security"] == [{"apiKey": []}]

    asyncio.run(scenario())


# -- rate limits -------------------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after_until_the_window_frees(keys_file: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file), clock) as running:

            async def models(key: str = KEY_LIMITED) -> httpx.Response:
                return await running.client.get("/v1/models", headers=bearer(key))

            assert (await models()).status_code == 200
            clock.offset += 20
            assert (await models()).status_code == 200
            refused = await models()
            assert refused.status_code == 429
            assert refused.json()["error"] == {
                "message": "Rate limit reached for 'limited': 2 requests per minute; retry in 40 s",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
            }
            # The first request leaves the window 40 s from now (a few ms of real time have passed).
            assert refused.headers["retry-after"] == "40"
            assert 39_900 < int(refused.headers["retry-after-ms"]) <= 40_000
            assert (await models(KEY_A)).status_code == 200  # other keys have their own limits
            assert (await models(ROOT_KEY)).status_code == 200
            clock.offset += 39.5
            refused = await models()  # refusals are not counted: still the first request's window
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert 0 < int(refused.headers["retry-after-ms"]) <= 500
            clock.offset += 0.5
            assert (await models()).status_code == 200
            refused = await models()  # the second request (t=20) is still in the window: 20 s to go
            assert refused.status_code == 429 and refused.headers["retry-after"] == "20"
            clock.offset += 20
            assert (await models()).status_code == 200

    asyncio.run(scenario())


def test_the_openai_sdk_retries_a_429_after_retry_after_and_gets_through(keys_file: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file), clock) as running:
            transport = httpx.ASGITransport(app=running.app)

            def sdk(key: str, retries: int) -> openai.AsyncOpenAI:
                http_client = httpx.AsyncClient(transport=transport, base_url="http://test/v1")
                return openai.AsyncOpenAI(
                    base_url="http://test/v1", api_key=key, http_client=http_client, max_retries=retries
                )

            limited = sdk(KEY_LIMITED, retries=0)
            await limited.models.list()
            await limited.models.list()
            with pytest.raises(openai.RateLimitError) as refused:
                await limited.models.list()
            assert refused.value.code == "rate_limit_exceeded"
            # The window frees 1.2 s from now: longer than the SDK's own first backoff (0.5 s at most), so one
            # retry gets through only by sleeping as long as the header says.
            clock.offset += 58.8
            started = time.monotonic()
            chat = await sdk(KEY_LIMITED, retries=1).chat.completions.create(
                model="tuned-b", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            waited = time.monotonic() - started
            assert chat.choices[0].message.content == "hello"
            assert 1.15 < waited < 5

            team_a = sdk(KEY_A, retries=0)
            assert [model.id for model in (await team_a.models.list()).data] == ["shared-x", "tuned-a"]
            with pytest.raises(openai.NotFoundError, match="The model 'tuned-b' does not exist"):
                await team_a.chat.completions.create(
                    model="tuned-b", messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.AuthenticationError):
                await sdk("sk-wrong", retries=0).models.list()

    asyncio.run(scenario())


# -- the keys file -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [ENTRIES[0], {"name": "dup", "key": KEY_A, "models": ["*"]}],
            "entry 2 ('dup'): the same key as entry 1 ('team-a'); every tenant needs its own key",
        ),
        (
            [
                ENTRIES[0],
                {"name": "hashed", "key_sha256": hashlib.sha256(KEY_A.encode()).hexdigest(), "models": ["*"]},
            ],
            "entry 2 ('hashed'): the same key as entry 1 ('team-a')",
        ),
        (
            [{"name": "mine", "key": ROOT_KEY, "models": ["*"]}],
            "entry 1 ('mine'): the same key as 'api-key'",
        ),
        (
            [ENTRIES[0], {"name": "team-a", "key": KEY_B, "models": ["*"]}],
            "entry 2 ('team-a'): the name 'team-a' is taken (by entry 1)",
        ),
        (
            [{"name": "api-key", "key": KEY_B, "models": ["*"]}],
            "entry 1 ('api-key'): the name 'api-key' is taken (by the command line)",
        ),
        (
            [{"name": "empty", "key": KEY_A, "models": []}],
            "entry 1 ('empty'): models: List should have at least 1",
        ),
        (
            [{"name": "blank", "key": KEY_A, "models": [" "]}],
            "entry 1 ('blank'): entry: Value error, models holds",
        ),
        (
            [{"name": "slow", "key": KEY_A, "models": ["*"], "rate_limit_rpm": 0}],
            "entry 1 ('slow'): rate_limit_rpm: Input should be greater than or equal to 1",
        ),
        (
            [{"name": "words", "key": KEY_A, "models": ["*"], "rate_limit_rpm": "many"}],
            "entry 1 ('words'): rate_limit_rpm: Input should be a valid integer",
        ),
        ([{"name": "keyless", "models": ["*"]}], "give exactly one of key, key_env, key_sha256 (got none)"),
        (
            [{"name": "both", "key": KEY_A, "key_env": "TEST_TENANT_KEY", "models": ["*"]}],
            "give exactly one of key, key_env, key_sha256 (got key, key_env)",
        ),
        (
            [{"name": "unset", "key_env": "TEST_TENANT_KEY_UNSET", "models": ["*"]}],
            "entry 1 ('unset'): the environment variable TEST_TENANT_KEY_UNSET (key_env) is not set or empty",
        ),
        (
            [{"name": "short", "key_sha256": "abc", "models": ["*"]}],
            "key_sha256: String should match pattern",
        ),
        (
            [{"name": "a b", "key": KEY_A, "models": ["*"]}],
            "entry 1 ('a b'): name: String should match pattern",
        ),
        ([{"name": "x", "key": KEY_A, "models": ["*"], "extra": 1}], "extra: Extra inputs are not permitted"),
        ([{"key": KEY_A, "models": ["*"]}], "entry 1: name: Field required"),
        ({"team-a": KEY_A}, "must be a JSON or YAML list of entries"),
        ([], "holds no entries"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_entry_and_never_the_key(
    entries: Any, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_keys(tmp_path, entries)
    with pytest.raises(KeysFileError) as refused:
        load_tenants(path, api_key=ROOT_KEY)
    assert str(refused.value).startswith(f"API keys file {path}: ")
    assert message in str(refused.value)
    with pytest.raises(ValidationError) as at_start:  # the settings refuse it at load time
        ServeSettings(base_model="base", api_key=ROOT_KEY, api_keys_file=path)
    assert message in str(at_start.value)
    for text in (str(refused.value), str(at_start.value), caplog.text):
        assert not any(key in text for key in ALL_KEYS)


def test_a_keys_file_that_does_not_parse_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"- name: a\n  key: {KEY_A}\n  models: [*\n")
    with pytest.raises(KeysFileError, match="must be a JSON or YAML list") as refused:
        load_tenants(path)
    assert KEY_A not in str(refused.value)
    with pytest.raises(KeysFileError, match=r"cannot be read \(No such file or directory\)"):
        load_tenants(tmp_path / "missing.yaml")


def test_the_keys_file_comes_from_the_environment_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_keys(
        tmp_path, [{"name": "a", "key": KEY_A, "models": ["tuned-*"], "rate_limit_rpm": 5}], ".json"
    )
    monkeypatch.setenv("SERVE_API_KEYS_FILE", str(path))
    settings = CliApp.run(ServeSettings, cli_args=["--base-model", "base"])
    assert settings.api_keys_file == path and settings.keys_required
    tenant = settings.tenants().authenticate(KEY_A)
    assert tenant is not None and (tenant.name, tenant.rate_limit_rpm) == ("a", 5)
    assert tenant.allows("tuned-x") and not tenant.allows("base")
    assert settings.tenants().authenticate(KEY_B) is None


def test_no_key_reaches_the_logs(keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with tenant_app(settings_with(keys_file, log_level="debug")) as running:
            for key in (*ALL_KEYS, "sk-wrong"):
                for _ in range(3):  # the limited key's third request is refused
                    await running.client.post(
                        "/v1/chat/completions", json={**CHAT, "model": "tuned-b"}, headers=bearer(key)
                    )
                await running.client.post(
                    "/v1/load_lora_adapter", json={"lora_name": "x"}, headers=bearer(key)
                )

    asyncio.run(scenario())
    assert "team-a, team-b, limited, from-env" in caplog.text  # the names are logged, never the keys
    assert not any(key in caplog.text for key in ALL_KEYS)
