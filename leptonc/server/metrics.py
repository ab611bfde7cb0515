"""Prometheus metrics of `leptonc serve`, in one registry per app.

HTTP-side series (measured where the client sees them): requests by endpoint and status, time to
first token, inter-token latency, end-to-end latency. Engine-side series, read from the engine at each
scrape: running and queued requests, KV slots in use and in all, prompt and generated tokens, finished
sequences by reason.
"""

from __future__ import annotations

import bisect
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from leptonc.runtime.batching import ENGINE_SERIES, FINISHED_SERIES

# Seconds. TTFT spans a CPU prefill of a long prompt; ITL a GPU step (a millisecond) to a loaded CPU step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """The engine's own counts, read when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        for key, name, kind, description in ENGINE_SERIES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, description, value=m[key])
        key, name, description = FINISHED_SERIES
        finished = CounterMetricFamily(name, description, labels=["reason"])
        for reason, count in m[key].items():
            finished.add_metric([reason], count)
        yield finished


class CountedHistogram:
    """A Prometheus histogram that takes one value `count` times in one call: a stream's chunk of k tokens adds k
    inter-token gaps at the cost of one observation, where prometheus_client's Histogram takes them one by one
    (two locked increments each, per token, on the event loop). Exposed as a custom collector."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation, self.bounds = name, documentation, tuple(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        index = bisect.bisect_left(self.bounds, value)  # Prometheus buckets are "less than or equal"
        with self._lock:
            self._counts[index] += count
            self._sum += value * count

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("leptonc_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("leptonc_time_to_first_token_seconds", "From the request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = CountedHistogram("leptonc_inter_token_latency_seconds",
                                    "Between two tokens of one sequence (k tokens sent together after a gap g: k gaps "
                                    "of g/k).", ITL_BUCKETS, self.registry)
        self.latency = Histogram("leptonc_request_latency_seconds", "From the request's arrival to its last token.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
