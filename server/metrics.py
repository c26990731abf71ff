"""Prometheus metrics, all `palm_*`, in a registry owned by one app (never the global one,
so two apps in one process, e.g. tests, do not share counts).

Request-level series are observed by a RequestTracker as outputs stream out; the engine's
own state (running, waiting, KV usage, preemptions, prefix-cache hits) is read at scrape
time by EngineCollector from engine.stats(): the snapshot that came with the core's latest
step, at most one step old, never a round trip to the core process. The core's counters
start again from 0 in a restarted core (Prometheus reads that as a counter reset);
palm_engine_restarts_total is the front's own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.outputs import RequestOutput
from ..engine.stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# "stalled": the client stopped reading a stream and the server gave up on it.
FINISH_REASONS = ("stop", "length", "abort", "error", "stalled")


_ENGINE_SERIES = (
    ("palm_num_requests_running", "Requests in the running batch"),
    ("palm_num_requests_waiting", "Requests waiting for a slot"),
    ("palm_kv_cache_usage_ratio", "Used fraction of KV blocks"),
    ("palm_num_preemptions", "Sequences preempted"),
    ("palm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
    ("palm_engine_steps", "Forward passes the engine core ran"),
    ("palm_engine_step_tokens", "Tokens those steps computed (prompt chunks and decodes)"),
    ("palm_spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding)"),
    ("palm_spec_decode_num_accepted_tokens", "Draft tokens accepted (speculative decoding)"),
    (
        "palm_spec_decode_acceptance_ratio",
        "Accepted / verified draft tokens since start (0 before any draft)",
    ),
)
_RESTARTS = ("palm_engine_restarts", "Engine core processes restarted after one died")


def _is_gauge(name: str) -> bool:
    return "num_requests" in name or name.endswith(("usage_ratio", "acceptance_ratio"))


class EngineCollector(Collector):
    """Gauges and engine-side counters, read from engine.stats() when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats], restarts: Callable[[], int]) -> None:
        self._stats = stats
        self._restarts = restarts

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering does not call the engine (it may not be started).
        for name, doc in _ENGINE_SERIES:
            yield (
                GaugeMetricFamily(name, doc) if _is_gauge(name) else CounterMetricFamily(name, doc)
            )
        yield CounterMetricFamily(*_RESTARTS)

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        values = (
            s.num_running,
            s.num_waiting,
            s.kv_cache_usage,
            s.num_preemptions,
            s.prefix_cache_hit_tokens,
            s.num_steps,
            s.num_batched_tokens,
            s.num_draft_tokens,
            s.num_accepted_draft_tokens,
            s.draft_acceptance_rate,
        )
        for (name, doc), value in zip(_ENGINE_SERIES, values, strict=True):
            family = GaugeMetricFamily if _is_gauge(name) else CounterMetricFamily
            yield family(name, doc, value=value)
        yield CounterMetricFamily(*_RESTARTS, value=self._restarts())


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        engine_restarts: Callable[[], int],
        weight_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.weight_bytes = Gauge(
            "palm_model_weight_bytes",
            "Bytes of the model's weights as the engine holds them (int8 ones as int8)",
            registry=r,
        )
        self.weight_bytes.set_function(weight_bytes)
        self.ttft = Histogram(
            "palm_time_to_first_token_seconds",
            "Request arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "palm_inter_token_latency_seconds",
            "Time per token after a request's first (a gap that brought k tokens counts k "
            "times, a k-th of it each)",
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "palm_e2e_request_latency_seconds",
            "Request arrival to its end",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "palm_request_queue_time_seconds",
            "Engine arrival to first being scheduled",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("palm_prompt_tokens", "Prompt tokens of requests", registry=r)
        self.generation_tokens = Counter(
            "palm_generation_tokens", "Tokens generated and sent", registry=r
        )
        self.finished = Counter(
            "palm_requests_finished",
            "Generation requests by finish reason",
            ["finish_reason"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # present at 0 from the start
        self.http_requests = Counter(
            "palm_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "palm_http_request_duration_seconds",
            "HTTP request duration by route and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(engine_stats, engine_restarts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Observes one generation request's outputs; finish() exactly once at its end."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.queue_seen = False
        self.finished = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if not self.queue_seen and out.first_scheduled_time is not None and out.arrival_time:
            self.queue_seen = True
            self.m.queue.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
        tokens = len(out.new_token_ids)
        if not tokens:
            return
        if self.last_token is None:
            self.m.ttft.observe(now - self.start)
            gaps, gap = tokens - 1, 0.0  # tokens that came with the first
        else:
            # An output of several tokens (a step's forward passes, accepted drafts): a
            # gap per token, so that the count is the tokens after the first and the sum
            # the time they took.
            gaps, gap = tokens, (now - self.last_token) / tokens
        for _ in range(gaps):
            self.m.itl.observe(gap)
        self.last_token = now
        self.m.generation_tokens.inc(tokens)

    def finish(self, reason: str | None, prompt_tokens: int) -> None:
        if self.finished:
            return
        self.finished = True
        self.m.e2e.observe(time.monotonic() - self.start)
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.finished.labels(reason if reason in FINISH_REASONS else "error").inc()
