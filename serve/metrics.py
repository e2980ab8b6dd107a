"""Prometheus metrics of the server, labelled by model (the base or an adapter name)."""

from __future__ import annotations

import time
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """One registry per app (tests start several apps in one process)."""

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
        self.prompt_tokens = Counter(
            "tuneserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "tuneserve_generation_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "tuneserve_time_to_first_token_seconds",
            "Time from request to first generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tuneserve_e2e_request_latency_seconds",
            "Time from request to last generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.aborted = Counter(
            "tuneserve_requests_aborted",
            "Requests aborted in the engine before finishing (client went away).",
            ["model"],
            registry=self.registry,
        )
        self.running = Gauge(
            "tuneserve_requests_running",
            "Requests generating (first token produced).",
            ["model"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "tuneserve_requests_waiting",
            "Requests admitted but without a first token yet.",
            ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, model: str) -> GenerationTracker:
        return GenerationTracker(self, model)

    def count_response(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, endpoint, str(status)).inc()


class GenerationTracker:
    """Moves one request from waiting to running to done, recording its latencies and token counts."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def __enter__(self) -> GenerationTracker:
        self.metrics.waiting.labels(self.model).inc()
        return self

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.ttft.labels(self.model).observe(self.first_token_at - self.started)
            self.metrics.waiting.labels(self.model).dec()
            self.metrics.running.labels(self.model).inc()

    def aborted(self) -> None:
        self.metrics.aborted.labels(self.model).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(prompt)
        self.metrics.generation_tokens.labels(self.model).inc(generated)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.first_token_at is None:
            self.metrics.waiting.labels(self.model).dec()
        else:
            self.metrics.running.labels(self.model).dec()
            if kind is None:
                self.metrics.e2e.labels(self.model).observe(time.monotonic() - self.started)
