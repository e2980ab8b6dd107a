"""Versions and aliases on real PEFT folders and the real registry (the engine is test_http's fake): an alias
moves in one step, requests resolved before the move still run (on the new target once the old is gone), the
old target drains and is unloaded, and names never clash. test_aliases_e2e.py swaps under load on vLLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from serve.adapters import AdapterError, AdapterRegistry
from serve.models import ServedModels
from serve.protocol import OpenAIError
from tests.serve.test_adapters import (  # noqa: F401 (fixtures)
    MakeAdapter,
    adapters_dir,
    base,
    make_adapter,
    registry,
    tiny_models,
)
from tests.serve.test_http import FakeEngine
from tuneserve.manifest import MANIFEST


class CountingEngine(FakeEngine):
    """test_http's fake engine, recording the adapter ids it was asked to load and remove."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[int] = []
        self.removed: list[int] = []

    async def add_lora(self, lora_request: Any) -> bool:
        self.added.append(lora_request.lora_int_id)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


def served(registry: AdapterRegistry, **extra: Any) -> tuple[ServedModels, CountingEngine]:  # noqa: F811
    engine = CountingEngine()
    models = ServedModels(
        engine=engine,  # type: ignore[arg-type]
        registry=registry,
        model_id=registry.served_name,
        max_model_len=64,
        unload_timeout_s=5,
        **extra,
    )
    return models, engine


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_versions_are_the_manifests_weights_hash_or_the_nth_load(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
) -> None:
    path = make_adapter("plain")
    first = registry.validate("plain", path)
    assert first.version == "plain@1"
    assert registry.validate("plain", path).version == "plain@2"
    assert registry.validate("other", path).version == "other@1"
    # A finetune manifest lists its weights' hashes: the version is theirs, under any name, at any load.
    tuned = make_adapter("tuned")
    manifest = {"base_model": {"name": "x"}, "files": {"adapter_model.safetensors": "ab" * 32}}
    (tuned / MANIFEST).write_text(json.dumps(manifest))
    versions = {registry.validate(name, tuned).version for name in ("tuned", "copy", "tuned")}
    (version,) = versions
    assert version.startswith("sha256:") and len(version) == len("sha256:") + 12
    manifest["files"] = {"adapter_model.safetensors": "cd" * 32}
    (tuned / MANIFEST).write_text(json.dumps(manifest))
    assert registry.validate("tuned", tuned).version not in (version, "tuned@1")


def test_an_alias_moves_in_one_step_and_the_previous_target_drains_then_unloads(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
) -> None:
    models, engine = served(registry)

    async def scenario() -> None:
        v1 = await models.add_adapter("support-v1", make_adapter("support-v1"))
        assert await models.set_alias("support", "support-v1") == (None, v1)
        lora = models.resolve("support")
        assert lora is not None and lora.lora_int_id == v1.lora_int_id
        # A request running on v1 when the alias moves to v2 (loaded by the same call from its folder, made
        # below) finishes on v1 ...
        running = models.request_started(models.resolve("support"), "support")
        assert running is not None and running.lora_int_id == v1.lora_int_id
        previous, v2 = await models.set_alias(
            "support", "support-v2", load=True, lora_path="support-v2", unload_previous=True
        )
        assert previous == "support-v1" and v2 is not None
        lora = models.resolve("support")
        assert lora is not None and lora.lora_int_id == v2.lora_int_id  # ... new requests go to v2 at once
        await settle()
        status = await models.status()
        assert status["aliases"] == {"support": "support-v2"}
        assert status["draining"] == [{"name": "support-v1", "version": v1.version, "in_flight": 1}]
        assert engine.removed == []  # v1 is not dropped from the engine while it runs a request
        # A request that resolved the alias before the move but starts after v1 is gone runs on v2.
        stale = v1.lora_request()
        models.request_finished(running)
        await settle()
        assert engine.removed == [v1.lora_int_id]
        assert (await models.status())["draining"] == []
        moved = models.request_started(stale, "support")
        assert moved is not None and moved.lora_int_id == v2.lora_int_id
        models.request_finished(moved)
        # The direct name of a version that was unloaded is the usual 404.
        with pytest.raises(OpenAIError, match="was unloaded"):
            models.request_started(stale, "support-v1")
        status = await models.status()
        (adapter,) = status["adapters"]
        assert adapter["name"] == "support-v2" and adapter["aliases"] == ["support"]
        assert adapter["version"] == v2.version and adapter["in_flight"] == 0

    make_adapter("support-v2")
    asyncio.run(scenario())


def test_a_previous_target_another_alias_still_points_to_stays(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
) -> None:
    models, engine = served(registry)

    async def scenario() -> None:
        for name in ("a", "b"):
            await models.add_adapter(name, make_adapter(name))
        await models.set_alias("prod", "a")
        await models.set_alias("canary", "a")
        await models.set_alias("prod", "b")
        await settle()
        assert registry.names() == ["a", "b"] and engine.removed == []
        await models.set_alias("canary", "b", unload_previous=False)
        await settle()
        assert registry.names() == ["a", "b"]
        # The alias may point at the base: a rollback to no adapter.
        previous, adapter = await models.set_alias("prod", models.model_id)
        assert previous == "b" and adapter is None and models.resolve("prod") is None
        await settle()
        assert registry.names() == ["a", "b"]  # canary still points to b
        assert [card.id for card in models.list_models().data] == [
            models.model_id,
            "a",
            "b",
            "canary",
            "prod",
        ]
        assert await models.delete_alias("canary") == "b"
        with pytest.raises(OpenAIError):
            models.resolve("canary")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("alias", "target", "status", "message"),
    [
        ("a", "b", 409, "'a' is the name of a served model"),
        ("BASE", "a", 409, "is the name of a served model"),  # the base's id
        ("bad name", "a", 400, "alias 'bad name' is not allowed"),
        ("prod", "missing", 404, "no adapter named 'missing' is loaded"),
        ("prod", "canary", 409, "'canary' is an alias"),
    ],
)
def test_alias_names_never_clash(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
    alias: str,
    target: str,
    status: int,
    message: str,
) -> None:
    models, _ = served(registry)

    async def scenario() -> None:
        for name in ("a", "b"):
            await models.add_adapter(name, make_adapter(name))
        await models.set_alias("canary", "a")
        with pytest.raises(AdapterError, match=message) as caught:
            await models.set_alias(models.model_id if alias == "BASE" else alias, target)
        assert caught.value.status == status
        # An adapter may not take an alias's name, nor be unloaded while an alias points to it.
        with pytest.raises(AdapterError, match="'canary' is an alias") as taken:
            await models.add_adapter("canary", make_adapter("canary"))
        assert taken.value.status == 409
        with pytest.raises(AdapterError, match="is what alias 'canary' points to") as pointed:
            await models.remove_adapter("a")
        assert pointed.value.status == 409
        # A bad alias is refused before the adapter it names is loaded from lora_path.
        with pytest.raises(AdapterError, match="'b' is the name of a served model"):
            await models.set_alias("b", "c", load=True, lora_path=str(make_adapter("c")))
        assert registry.names() == ["a", "b"]

    asyncio.run(scenario())


def test_aliases_through_the_admin_api_with_scopes(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
    base: Path,  # noqa: F811
    adapters_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    import yaml

    from serve.settings import ServeSettings
    from tests.serve.test_http import CHAT
    from tests.serve.test_tenants import ADMIN_KEY, bearer, tenant_app

    make_adapter("support-v1")
    make_adapter("support-v2")
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump([{"name": "support-team", "key": "sk-support-0123", "models": ["support"]}])
    )
    settings = ServeSettings(
        base_model=str(base), admin_api_key=ADMIN_KEY, api_keys_file=keys, adapters_dir=adapters_dir
    )
    tenant = bearer("sk-support-0123")

    async def scenario() -> None:
        async with tenant_app(settings) as running:
            client, admin = running.client, bearer(ADMIN_KEY)
            assert (
                await client.post("/v1/chat/completions", json={**CHAT, "model": "support"}, headers=tenant)
            ).status_code == 404
            made = await client.post(
                "/v1/aliases",
                json={"alias": "support", "model": "support-v1"},
                headers=admin,
            )
            assert made.status_code == 200, made.text
            assert made.json() == {
                "alias": "support",
                "model": "support-v1",
                "version": "support-v1@1",
                "previous": None,
            }
            answer = await client.post(
                "/v1/chat/completions", json={**CHAT, "model": "support"}, headers=tenant
            )
            assert answer.status_code == 200 and answer.json()["model"] == "support"
            # The key sees the alias, never the versions behind it.
            listed = await client.get("/v1/models", headers=tenant)
            assert [card["id"] for card in listed.json()["data"]] == ["support"]
            direct = await client.post(
                "/v1/chat/completions", json={**CHAT, "model": "support-v1"}, headers=tenant
            )
            assert direct.status_code == 404
            moved = await client.post(
                "/v1/aliases", json={"alias": "support", "model": "support-v2"}, headers=admin
            )
            assert moved.json()["previous"] == "support-v1"
            refused = await client.post(
                "/v1/aliases", json={"alias": "support", "model": "x"}, headers=tenant
            )
            assert refused.status_code == 401
            # A new version loaded by the same call, from the adapters dir's folder of its name.
            make_adapter("support-v3")
            loaded = await client.post(
                "/v1/aliases", json={"alias": "support", "lora_name": "support-v3"}, headers=admin
            )
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["model"] == "support-v3" and loaded.json()["previous"] == "support-v2"
            # One of the two shapes, never both; the new adapter's name follows the adapter name rule.
            for body in (
                {"alias": "support", "model": "support-v3", "lora_name": "support-v4"},
                {"alias": "support", "lora_name": "/not a name"},
            ):
                assert (await client.post("/v1/aliases", json=body, headers=admin)).status_code == 400
            bad = await client.post("/v1/aliases", json={"alias": "support", "model": "nope"}, headers=admin)
            assert bad.status_code == 404 and "no adapter named 'nope'" in bad.json()["error"]["message"]
            status = (await client.get("/v1/lora_adapters", headers=admin)).json()
            assert status["aliases"] == {"support": "support-v3"}
            deleted = await client.delete("/v1/aliases/support", headers=admin)
            assert deleted.json() == {"alias": "support", "deleted": True, "model": "support-v3"}
            gone = await client.delete("/v1/aliases/support", headers=admin)
            assert gone.status_code == 404

    asyncio.run(scenario())
