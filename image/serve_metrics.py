"""The server's Prometheus metrics (``GET /metrics``)."""
from __future__ import annotations

import bisect
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))


class Metrics:
    """Prometheus metrics, kept as plain numbers on the hot path and rendered at scrape time.

    Every update happens on the event-loop thread (as does every scrape), so no locks are
    needed; a custom prometheus-client collector turns the numbers into metric families.
    That keeps a request's bookkeeping to a few dict increments instead of half a dozen
    lock-taking ``Counter.labels(...).inc()`` calls.
    """

    PREFIX = "mlflowctl_serving"

    def __init__(self, model_name: str, model: Any = None):
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.model_name = model_name
        self.model = model
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(self)
        # per-version totals survive unloading (counters must not go backwards while the process lives)
        self.totals: dict[str, list[int]] = {}  # version -> [predictions, scored, outliers]

    # -- hot path --
    def request(self, endpoint: str, version: str, code: int, seconds: float) -> None:
        key = (endpoint, version, code)
        reqs = self.requests
        if key in reqs:
            reqs[key] += 1
        elif len(reqs) < 10_000:  # bounded label cardinality
            reqs[key] = 1
        else:
            key = (endpoint, "", code)
            reqs[key] = reqs.get(key, 0) + 1
        h = self.latency.get(endpoint)
        if h is None:
            h = self.latency[endpoint] = [0] * len(LATENCY_BUCKETS) + [0.0]
        h[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def predicted(self, v: Any, n: int, scored: int, outliers: int) -> None:
        t = self.totals.get(v.label)
        if t is None:
            t = self.totals[v.label] = [0, 0, 0]
        t[0] += n
        t[1] += scored
        t[2] += outliers

    # -- scrape --
    def describe(self) -> list:
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p = self.PREFIX
        req = CounterMetricFamily(f"{p}_requests", "HTTP requests by endpoint, served version and status code",
                                  labels=["endpoint", "version", "code"])
        for (endpoint, version, code), n in sorted(self.requests.items()):
            req.add_metric([endpoint, version, str(code)], n)
        yield req
        lat = HistogramMetricFamily(f"{p}_request_duration_seconds", "Request handling time by endpoint",
                                    labels=["endpoint"])
        for endpoint, h in sorted(self.latency.items()):
            acc, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, h):
                acc += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            lat.add_metric([endpoint], buckets, h[-1])
        yield lat
        labels = ["model", "version"]
        pred = CounterMetricFamily(f"{p}_predictions", "Instances predicted, by version", labels=labels)
        scored = CounterMetricFamily(f"{p}_drift_scored", "Instances scored by the concept (drift) model", labels=labels)
        outl = CounterMetricFamily(f"{p}_drift_outliers",
                                   "Instances whose reconstruction error exceeded the threshold (out of distribution)",
                                   labels=labels)
        for version, (n, s, o) in sorted(self.totals.items()):
            pred.add_metric([self.model_name, version], n)
            scored.add_metric([self.model_name, version], s)
            outl.add_metric([self.model_name, version], o)
        yield pred
        yield scored
        yield outl
        thr = GaugeMetricFamily(f"{p}_drift_threshold", "Reconstruction-error threshold of the concept model", labels=labels)
        loaded = GaugeMetricFamily(f"{p}_version_loaded", "1 when the version is loaded and serving", labels=labels)
        versions = dict(self.model.versions) if self.model is not None else {}
        for number, v in sorted(versions.items()):
            loaded.add_metric([self.model_name, v.label], 1)
            if v.concept is not None:
                thr.add_metric([self.model_name, v.label], v.concept.threshold)
        yield thr
        yield loaded
