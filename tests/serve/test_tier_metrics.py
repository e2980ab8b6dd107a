"""The adapters' tiers in /metrics, from what the engine's worker extension reports (a fake engine answers its
RPC here; tests/serve/test_server_e2e.py and test_sources_e2e.py read them off vLLM and a real adapter cache):
each adapter's location, running requests, loads and evictions per tier, by the name it is served under."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.adapters import AdapterRegistry
from serve.engine import LORA_TIERS_RPC
from serve.metrics import ServerMetrics
from serve.models import ServedModels
from tests.serve.test_adapters import (  # noqa: F401 (fixtures)
    MakeAdapter,
    adapters_dir,
    base,
    make_adapter,
    registry,
    tiny_models,
)
from tests.serve.test_aliases import CountingEngine


class TieredEngine(CountingEngine):
    """Answers the tiers RPC with `report` (by adapter id); `stall` makes it never answer."""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] = {"held": {}, "counts": {}}
        self.calls: list[str] = []
        self.stall = False

    async def collective_rpc(self, method: str, timeout: float | None = None, **_: Any) -> list[Any]:
        self.calls.append(method)
        if self.stall:
            await asyncio.Event().wait()
        return [self.report, self.report]  # one answer per tensor-parallel rank


def tiered(registry: AdapterRegistry) -> tuple[ServedModels, TieredEngine, ServerMetrics]:  # noqa: F811
    engine = TieredEngine()
    models = ServedModels(
        engine=engine,  # type: ignore[arg-type]
        registry=registry,
        model_id=registry.served_name,
        max_model_len=64,
    )
    return models, engine, ServerMetrics()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_each_adapter_has_one_location_and_its_moves_by_name(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
) -> None:
    models, engine, metrics = tiered(registry)

    async def scenario() -> str:
        await models.start_tier_counts()
        assert engine.calls == [LORA_TIERS_RPC]  # before any adapter: the engine counts from the first
        metrics.watch_adapters(models.tiers, asyncio.get_running_loop())
        a, b, c = [await models.add_adapter(name, make_adapter(name)) for name in ("a", "b", "c")]
        engine.report = {
            "held": {"slot": [a.lora_int_id], "host_memory": [a.lora_int_id, b.lora_int_id]},
            "counts": {
                "slot_loads": [[a.lora_int_id, 3], [b.lora_int_id, 2]],
                "slot_evictions": [[b.lora_int_id, 2]],
                "host_memory_loads": [[a.lora_int_id, 1], [b.lora_int_id, 1], [c.lora_int_id, 1]],
                "host_memory_evictions": [[c.lora_int_id, 1], [999, 4]],  # an id this server never gave
            },
        }
        running = models.request_started(models.resolve("a"), "a")
        tiers = await models.tiers()
        assert tiers.location == {"a": "slot", "b": "host_memory", "c": "disk"}
        assert tiers.in_flight == {"a": 1, "b": 0, "c": 0}
        assert tiers.loads == {
            ("a", "slot"): 3,
            ("b", "slot"): 2,
            ("a", "host_memory"): 1,
            ("b", "host_memory"): 1,
            ("c", "host_memory"): 1,
        }
        assert tiers.evictions == {("b", "slot"): 2, ("c", "host_memory"): 1}
        models.request_finished(running)
        return (await metrics.render_async()).decode()

    text = asyncio.run(scenario())
    location = samples(text, "tuneserve_adapter_location")
    assert len(location) == 3 * 4  # every adapter, every location: 1 where it is, 0 elsewhere
    assert {labels for labels, value in location.items() if value == 1} == {
        (("location", "slot"), ("model", "a")),
        (("location", "host_memory"), ("model", "b")),
        (("location", "disk"), ("model", "c")),
    }
    assert samples(text, "tuneserve_adapter_requests_in_flight")[(("model", "a"),)] == 0
    loads = samples(text, "tuneserve_adapter_loads_total")
    assert loads[(("model", "a"), ("tier", "slot"))] == 3
    evictions = samples(text, "tuneserve_adapter_evictions_total")
    assert evictions == {(("model", "b"), ("tier", "slot")): 2, (("model", "c"), ("tier", "host_memory")): 1}


def test_a_scrape_from_the_metrics_port_thread_asks_the_loop_and_a_stalled_engine_fails_no_scrape(
    registry: AdapterRegistry,  # noqa: F811
    make_adapter: MakeAdapter,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models, engine, metrics = tiered(registry)
    monkeypatch.setattr("serve.models.ENGINE_TIERS_TIMEOUT_S", 0.2)

    async def scenario() -> tuple[str, str]:
        metrics.watch_adapters(models.tiers, asyncio.get_running_loop())
        a = await models.add_adapter("a", make_adapter("a"))
        engine.report = {"held": {"slot": [a.lora_int_id]}, "counts": {}}
        # --metrics-port's server renders in a thread of its own: collect() waits for the loop's answer.
        scraped: list[str] = []
        thread = threading.Thread(target=lambda: scraped.append(metrics.render().decode()))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        engine.stall = True
        with caplog.at_level(logging.WARNING, logger="serve.models"):
            stalled = (await metrics.render_async()).decode()
        return scraped[0], stalled

    fresh, stalled = asyncio.run(scenario())
    assert samples(fresh, "tuneserve_adapter_location")[(("location", "slot"), ("model", "a"))] == 1
    # Without the engine's answer the scrape still succeeds; the adapter is then only known to be on disk.
    assert samples(stalled, "tuneserve_adapter_location")[(("location", "disk"), ("model", "a"))] == 1
    assert "the engine did not report its adapter tiers" in caplog.text
