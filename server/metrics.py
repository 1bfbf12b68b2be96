"""Prometheus metrics, named like vLLM's with a `tokenmill:` prefix.

Engine-side numbers (queue sizes, KV usage, token and cache counters) are read from
`engine.stats()` at scrape time by a custom collector, so they are never stale and
the engine needs no knowledge of Prometheus. Latency histograms are observed by the
server, which is where a client's view of time (arrival to first byte) exists.
Each app gets its own `CollectorRegistry`, so tests can build several apps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.client import EngineStatsLike

if TYPE_CHECKING:
    from orchestrator.store.accounts import UsageRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")  # the engine's, as vLLM's request_success

_TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStatsLike]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(
            "tokenmill:num_requests_running",
            "Requests in the engine's running batch.",
            value=s.num_running,
        )
        yield GaugeMetricFamily(
            "tokenmill:num_requests_waiting",
            "Requests queued in the engine, waiting to run.",
            value=s.num_waiting,
        )
        yield GaugeMetricFamily(
            "tokenmill:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0 to 1).",
            value=s.kv_cache_usage,
        )
        counters = (
            (
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Running requests preempted to free KV blocks.", s.num_preemptions),
            ("prompt_tokens", "Prompt tokens received.", s.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", s.generation_tokens_total),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(f"tokenmill:{name}", doc, value=value)
        finished = CounterMetricFamily(
            "tokenmill:request_success",
            "Sequences (each of a request's n) that ended, by finish reason: stop, length, "
            "or abort (the client went away, or the request failed in the engine).",
            labels=["finished_reason"],
        )
        for reason in FINISH_REASONS:
            finished.add_metric([reason], s.finished_total.get(reason, 0))
        yield finished


@dataclass
class RequestTimer:
    """Latency bookkeeping for one request, fed with each output's new token count."""

    metrics: ServerMetrics
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None

    def on_tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last_token_time is None:
            self.metrics.ttft.observe(now - self.arrival)
            count -= 1  # the first token has no inter-token gap
        if count and self.last_token_time is not None:
            gap = (now - self.last_token_time) / count  # a delta may carry several tokens
            for _ in range(count):
                self.metrics.itl.observe(gap)
        self.last_token_time = now

    def on_finished(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStatsLike]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.ttft = Histogram(
            "tokenmill:time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tokenmill:inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tokenmill:e2e_request_latency_seconds",
            "Time from request arrival to its last token, for requests that finished.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

        # Per endpoint (never per user: a label per user would grow without bound).
        self.requests = Counter(
            "tokenmill:endpoint_requests",
            "Generation requests that ended, by endpoint and "
            "status (completed, incomplete, cancelled, failed, rejected).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "tokenmill:endpoint_tokens",
            "Tokens of generation requests, by endpoint and kind "
            "(input, cached_input, output), as the usage records count them.",
            ["endpoint", "kind"],
            registry=self.registry,
        )

    def on_usage(self, record: UsageRecord) -> None:
        """Count a request's usage row (called once per request, when it ends)."""
        self.requests.labels(record.endpoint, record.status).inc()
        for kind, count in (
            ("input", record.input_tokens),
            ("cached_input", record.cached_input_tokens),
            ("output", record.output_tokens),
        ):
            self.tokens.labels(record.endpoint, kind).inc(count)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)
