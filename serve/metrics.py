"""What GET /metrics serves: vLLM's own `vllm:*` series, as vLLM's OpenAI server serves them, plus the series
vLLM lacks: vLLM labels everything with the base's name only, these tell the base and each adapter apart."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from vllm.v1.metrics.buckets import histogram_buckets
from vllm.v1.metrics.prometheus import get_prometheus_registry

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput


class ServerMetrics:
    """Our per-model series, in a registry per app (tests start several apps in one process).

    vLLM's engine records its series (scheduler queue, KV-cache use, latencies, tokens,
    `vllm:lora_requests_info`) in prometheus_client's process-wide registry; `render` serves it, then ours.
    """

    def __init__(self) -> None:
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
        self.served = CollectorRegistry(auto_describe=False)
        self.served.register(_VLLMThenOurs(self.registry))

    def render(self) -> bytes:
        return generate_latest(self.served)

    def track(self, model: str) -> GenerationTracker:
        return GenerationTracker(self, model)

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


class GenerationTracker:
    """Records one engine request's per-model series from vLLM's own request stats (`RequestOutput.metrics`,
    which the engine fills since this server keeps vLLM's stats on)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.first_token_seen = False

    def first_token(self, output: RequestOutput) -> None:
        if not self.first_token_seen and output.metrics is not None:
            self.first_token_seen = True
            self.metrics.ttft.labels(self.model).observe(output.metrics.first_token_latency)

    def finished(self, output: RequestOutput) -> None:
        if output.metrics is not None:
            self.metrics.e2e.labels(self.model).observe(time.time() - output.metrics.arrival_time)

    def aborted(self) -> None:
        self.metrics.aborted.labels(self.model).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(prompt)
        self.metrics.generation_tokens.labels(self.model).inc(generated)
