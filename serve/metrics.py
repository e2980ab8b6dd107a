"""What GET /metrics serves: vLLM's own `vllm:*` series, as vLLM's OpenAI server serves them, plus the series
vLLM lacks: vLLM labels everything with the base's name only, these tell the base and each adapter apart."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from vllm.v1.metrics.buckets import histogram_buckets
from vllm.v1.metrics.prometheus import get_prometheus_registry

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput

    from serve.models import AdapterTiers


class ServerMetrics:
    """Our per-model series, in a registry per app (tests start several apps in one process).

    vLLM's engine records its series (scheduler queue, KV-cache use, latencies, tokens,
    `vllm:lora_requests_info`) in prometheus_client's process-wide registry; `render` serves it, then ours.
    """

    def __init__(self, max_loras: int = 1) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "endpoint"]
        self.requests = Counter(
            "tuneserve_requests",
            "Requests answered, by HTTP status.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "tuneserve_request_errors",
            "Requests answered with an error status.",
            [*labels, "status"],
            registry=self.registry,
        )
        # Tenants are the names of --api-keys-file (and api-key, admin-api-key, "-" for none): bounded.
        self.tenant_requests = Counter(
            "tuneserve_tenant_requests",
            "Requests answered, by the tenant of their API key and HTTP status.",
            ["tenant", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tuneserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "tuneserve_generation_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "tuneserve_time_to_first_token_seconds",
            "vLLM's time to first token (vllm:time_to_first_token_seconds), per model.",
            ["model"],
            buckets=histogram_buckets("time_to_first_token"),  # vLLM's, so the two line up
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tuneserve_e2e_request_latency_seconds",
            "From the request's arrival in vLLM to its last output reaching the API, per model.",
            ["model"],
            buckets=histogram_buckets("request_latency"),
            registry=self.registry,
        )
        self.aborted = Counter(
            "tuneserve_requests_aborted",
            "Requests aborted in the engine before finishing (client went away).",
            ["model"],
            registry=self.registry,
        )
        # For an adapter this includes the wait for one of the engine's --max-loras slots: vLLM schedules no
        # request whose adapter would make a batch hold more adapters than that.
        self.queue_time = Histogram(
            "tuneserve_request_queue_time_seconds",
            "vLLM's time in the waiting queue (vllm:request_queue_time_seconds), per model: for an adapter, "
            "including the wait for a LoRA slot.",
            ["model"],
            buckets=histogram_buckets("request_latency"),  # vLLM's for its queue time
            registry=self.registry,
        )
        self.lora_slot_wait = Histogram(
            "tuneserve_lora_slot_wait_seconds",
            "Part of an adapter request's time in vLLM's queue during which the engine's batch held "
            "--max-loras other adapters, so vLLM could not schedule it (to the engine step).",
            ["model"],
            buckets=histogram_buckets("request_latency"),
            registry=self.registry,
        )
        self.lora_slots = LoRASlotTimeline(max_loras)
        self.adapters = _AdapterTiersCollector()
        self.registry.register(self.adapters)
        self.served = CollectorRegistry(auto_describe=False)
        self.served.register(_VLLMThenOurs(self.registry))

    def watch_adapters(
        self, tiers: Callable[[], Awaitable[AdapterTiers]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """Serve the adapters' tiers that `tiers` reports, asked on `loop` (the engine's) at each scrape."""
        self.adapters.tiers, self.adapters.loop = tiers, loop

    async def render_async(self) -> bytes:
        """`render` for our own /metrics route, on the event loop: the adapters' tiers asked first."""
        await self.adapters.refresh()
        return generate_latest(self.served)

    def render(self) -> bytes:
        return generate_latest(self.served)

    def track(self, model: str, lora_id: int | None = None) -> GenerationTracker:
        """A tracker of one engine request for `model`, whose adapter (if any) has the engine id `lora_id`."""
        return GenerationTracker(self, model, lora_id)

    def count_tenant(self, tenant: str, status: int) -> None:
        self.tenant_requests.labels(tenant, str(status)).inc()

    def count_response(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, endpoint, str(status)).inc()


class _VLLMThenOurs:
    """vLLM's registry (the global one, or a multiprocess one under PROMETHEUS_MULTIPROC_DIR), then ours.

    Read at each scrape: every engine's stat logger replaces the `vllm:*` collectors of the one before it
    (vLLM's `unregister_vllm_metrics`), so several engines in one process never clash.
    """

    def __init__(self, ours: CollectorRegistry) -> None:
        self.ours = ours

    def collect(self) -> Iterable[Metric]:
        vllm: Collector = get_prometheus_registry()
        yield from vllm.collect()
        yield from self.ours.collect()


class _AdapterTiersCollector:
    """Each adapter's location (slot, host_memory, disk, remote: 1 for where it is), running requests, and its
    loads into and evictions from each tier, from the last snapshot of ServedModels.tiers.

    The /metrics route refreshes the snapshot on the event loop before rendering; the --metrics-port server
    scrapes from its own thread, so collect() then asks the loop for a fresh one and waits for it."""

    def __init__(self) -> None:
        self.tiers: Callable[[], Awaitable[AdapterTiers]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.snapshot: AdapterTiers | None = None

    async def refresh(self) -> None:
        if self.tiers is not None:
            self.snapshot = await self.tiers()

    def describe(self) -> Iterable[Metric]:
        return []  # its series exist only once the server serves; nothing to check for clashes before

    def collect(self) -> Iterable[Metric]:
        from serve.models import LOCATIONS

        loop = self.loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            with contextlib.suppress(Exception):  # keep the last snapshot: a scrape must not fail
                asyncio.run_coroutine_threadsafe(self.refresh(), loop).result(TIERS_WAIT_S)
        snapshot = self.snapshot
        if snapshot is None:
            return
        location = GaugeMetricFamily(
            "tuneserve_adapter_location",
            "Where each adapter is: 1 for one of slot (an engine LoRA slot), host_memory (the engine's host "
            "cache), disk (adapters dir or adapter cache), remote (evicted from the adapter cache).",
            labels=["model", "location"],
        )
        for name, where in sorted(snapshot.location.items()):
            for tier in LOCATIONS:
                location.add_metric([name, tier], float(tier == where))
        yield location
        running = GaugeMetricFamily(
            "tuneserve_adapter_requests_in_flight", "Requests running on each adapter.", labels=["model"]
        )
        for name, count in sorted(snapshot.in_flight.items()):
            running.add_metric([name], count)
        yield running
        for move, counts, what in (
            ("loads", snapshot.loads, "loaded into"),
            ("evictions", snapshot.evictions, "evicted from"),
        ):
            family = CounterMetricFamily(
                f"tuneserve_adapter_{move}",
                f"Times each adapter was {what} a tier: slot (engine LoRA slot), host_memory (engine host "
                "cache), disk (the adapter cache, from a remote source).",
                labels=["model", "tier"],
            )
            for (name, tier), count in sorted(counts.items()):
                family.add_metric([name, tier], count)
            yield family


TIERS_WAIT_S = 10.0


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class GenerationTracker:
    """Records one engine request's per-model series from vLLM's own request stats (`RequestOutput.metrics`,
    which the engine fills since this server keeps vLLM's stats on). `close` must end every tracker."""

    def __init__(self, metrics: ServerMetrics, model: str, lora_id: int | None = None) -> None:
        self.metrics = metrics
        self.model = model
        self.first_token_seen = False
        self.lora_id = lora_id
        self.slots = metrics.lora_slots
        self.ticket = self.slots.submitted() if lora_id is not None else None
        self.running: int | None = None  # the adapter whose place in the engine's batch this request holds

    def first_token(self, output: RequestOutput) -> None:
        if not self.first_token_seen and output.metrics is not None:
            self.first_token_seen = True
            stats = output.metrics
            self.metrics.ttft.labels(self.model).observe(stats.first_token_latency)
            if stats.scheduled_ts and stats.queued_ts:  # engine-core clock, both; 0 when not reported
                self.metrics.queue_time.labels(self.model).observe(
                    max(0.0, stats.scheduled_ts - stats.queued_ts)
                )
                if self.ticket is not None and self.lora_id is not None:
                    waited = self.slots.scheduled(
                        self.ticket, self.lora_id, stats.queued_ts, stats.scheduled_ts
                    )
                    self.metrics.lora_slot_wait.labels(self.model).observe(waited)
                    self.ticket, self.running = None, self.lora_id

    def finished(self, output: RequestOutput) -> None:
        if output.metrics is not None:
            self.metrics.e2e.labels(self.model).observe(time.time() - output.metrics.arrival_time)
            if self.running is not None and output.metrics.last_token_ts:
                self.slots.ended(self.running, output.metrics.last_token_ts)
                self.running = None

    def aborted(self) -> None:
        self.metrics.aborted.labels(self.model).inc()

    def close(self) -> None:
        """The engine request is over (finished, aborted or refused): its place in the slots is released."""
        if self.ticket is not None:
            self.slots.forget(self.ticket)
            self.ticket = None
        if self.running is not None:
            self.slots.ended(self.running, self.slots.clock())
            self.running = None

    def tokens(self, prompt: int, generated: int) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(prompt)
        self.metrics.generation_tokens.labels(self.model).inc(generated)


class LoRASlotTimeline:
    """Which adapters the engine's batch held over time, to tell how long a queued request's adapter was shut
    out: vLLM's scheduler skips a waiting request whose adapter would make the batch hold more than
    --max-loras adapters. vLLM reports neither that nor which adapters wait (its per-adapter waiting counts
    arrive only once a request is scheduled), so the batch is rebuilt here from each adapter request's
    scheduled and last-token times: engine-core timestamps on the system's monotonic clock, as precise as an
    engine step (a request enters the batch here when its first token arrives, stamped with its scheduling
    time, so a prefill of several steps is seen late). A preempted request counts as held until it ends.

    Events are kept from the submission of the oldest request still waiting to be scheduled (`horizon`): no
    later wait can reach back further, so older ones fold into `base`, the batch at the horizon.
    """

    def __init__(self, max_loras: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_loras = max_loras
        self.clock = clock  # the engine core's clock
        self.base: collections.Counter[int] = collections.Counter()  # adapter id -> requests in the batch
        self.horizon = float("-inf")
        self.events: list[tuple[float, int, int]] = []  # (time, adapter id, +1 scheduled / -1 ended), sorted
        self.waiting: dict[int, float] = {}  # ticket -> submission time, of requests not yet scheduled
        self.tickets = itertools.count()

    def submitted(self) -> int:
        ticket = next(self.tickets)
        self.waiting[ticket] = self.clock()
        return ticket

    def scheduled(self, ticket: int, lora_id: int, queued: float, scheduled: float) -> float:
        """Seconds of [queued, scheduled] during which `lora_id` was not in a batch of --max-loras adapters;
        the request then holds its adapter's place until `ended`."""
        held = collections.Counter(self.base)
        start, shut_out = queued, 0.0
        for at, other, change in self.events:
            if at >= scheduled:
                break
            if at > start:
                if self._shut_out(held, lora_id):
                    shut_out += at - start
                start = at
            held[other] += change
        if self._shut_out(held, lora_id) and scheduled > start:
            shut_out += scheduled - start
        self.waiting.pop(ticket, None)
        self._add(scheduled, lora_id, 1)
        return shut_out

    def ended(self, lora_id: int, at: float) -> None:
        self._add(at, lora_id, -1)

    def forget(self, ticket: int) -> None:
        """A request that was never scheduled (refused or aborted while queued)."""
        self.waiting.pop(ticket, None)
        self._fold()

    def _shut_out(self, held: collections.Counter[int], lora_id: int) -> bool:
        adapters = {other for other, count in held.items() if count > 0}
        return lora_id not in adapters and len(adapters) >= self.max_loras

    def _add(self, at: float, lora_id: int, change: int) -> None:
        if at <= self.horizon:
            self.base[lora_id] += change
        else:
            bisect.insort(self.events, (at, lora_id, change))
        self._fold()

    def _fold(self) -> None:
        self.horizon = max(self.horizon, min(self.waiting.values(), default=self.clock()))
        folded = bisect.bisect_right(self.events, (self.horizon, math.inf, math.inf))
        for _, lora_id, change in self.events[:folded]:
            self.base[lora_id] += change
        del self.events[:folded]
        self.base = +self.base  # drop adapters no longer held
