"""Prometheus metrics of `leptonc serve`, in one registry per app.

HTTP-side series (measured where the client sees them): requests by endpoint and status, time to
first token, inter-token latency, end-to-end latency. Engine-side series, read from the engine at each
scrape: running and queued requests, KV slots in use and in all, prompt and generated tokens, finished
sequences by reason.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("leptonc_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("leptonc_time_to_first_token_seconds", "From the request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("leptonc_inter_token_latency_seconds",
                             "Between two tokens of one sequence (k tokens sent together after a gap g: k gaps "
                             "of g/k).",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.latency = Histogram("leptonc_request_latency_seconds", "From the request's arrival to its last token.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
