"""Prometheus metrics, one registry per app: request counts, token counts, latency histograms,
and engine gauges (sequences, prefix cache, memory) read from the engine at scrape time."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        cache = stats.get("prefix_cache", {})

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"deltaserve_{name}", doc)
            g.add_metric([], float(value))
            return g

        yield gauge("num_requests_running", "Sequences in the running batch", stats.get("running", 0))
        yield gauge("num_requests_waiting", "Sequences queued for admission", stats.get("waiting", 0))
        yield gauge("reserved_bytes", "Memory reserved for running sequences", stats.get("reserved_bytes", 0))
        yield gauge("memory_budget_bytes", "Memory the scheduler may reserve", stats.get("memory_budget_bytes", 0))
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / tokens looked up",
                    cache.get("hit_rate", 0.0))
        yield gauge("prefix_cache_bytes", "Bytes held by prefix-cache snapshots", cache.get("bytes", 0))
        yield gauge("prefix_cache_entries", "Snapshots in the prefix cache", cache.get("entries", 0))
        yield gauge("prefix_cache_hit_tokens", "Prompt tokens restored from the prefix cache (cumulative)",
                    cache.get("tokens_hit", 0))
        yield gauge("model_bytes", "Bytes of the model's weights", stats.get("model_bytes", 0))
        yield gauge("sequence_state_bytes", "Bytes of the running sequences' model state (KV, recurrent state)",
                    stats.get("sequence_bytes", 0))
        for name, value in _mlx_memory().items():
            yield gauge(f"mlx_{name}_memory_bytes", f"MLX {name} memory", value)
        if "prefix_cache_disk" in stats:
            yield from _disk_metrics(stats["prefix_cache_disk"], gauge)
        if "speculative" in stats:
            yield from _speculative_metrics(stats["speculative"])


def _speculative_metrics(spec: dict):
    """Drafts made and accepted per draft position (label `position`, 1-based): acceptance at
    position k is accepted/drafted there."""
    for key, doc in (("drafted", "MTP draft tokens proposed, by draft position"),
                     ("accepted", "MTP draft tokens accepted, by draft position")):
        c = CounterMetricFamily(f"deltaserve_spec_decode_{key}_tokens", doc, labels=["position"])
        for position, n in enumerate(spec[key], start=1):
            c.add_metric([str(position)], float(n))
        yield c


_DISK_GAUGES = (("bytes", "Bytes of prefix-cache files on disk"), ("files", "Prefix-cache files on disk"),
                ("queued", "Prefix-cache segments waiting to be written"),
                ("max_bytes", "The prefix-cache directory's size limit"))
_DISK_COUNTERS = (("hits", "Lookups the disk tier answered"), ("misses", "Lookups the disk tier could not answer"),
                  ("read_bytes", "Bytes read from prefix-cache files"),
                  ("written_bytes", "Bytes written to prefix-cache files"),
                  ("read_seconds", "Seconds spent reading and verifying prefix-cache files"),
                  ("write_seconds", "Seconds the background writer spent writing prefix-cache files"),
                  ("errors", "Prefix-cache files found corrupt, partial or of another model, and failed writes"),
                  ("dropped", "Segments not written because the writer was behind"))


def _disk_metrics(disk: dict, gauge):
    for key, doc in _DISK_GAUGES:
        if key in disk:
            yield gauge(f"prefix_cache_disk_{key}", doc, disk[key])
    for key, doc in _DISK_COUNTERS:
        if key in disk:
            c = CounterMetricFamily(f"deltaserve_prefix_cache_disk_{key}", doc)
            c.add_metric([], float(disk[key]))
            yield c


def _mlx_memory() -> dict[str, int]:
    try:
        import mlx.core as mx

        return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}
    except Exception:  # older MLX or a backend without these counters
        return {}


class Metrics:
    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deltaserve_requests", "Finished requests", ["endpoint", "finish_reason"], registry=r)
        self.errors = Counter("deltaserve_request_errors", "Requests refused with an error", ["status"], registry=r)
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("deltaserve_prompt_cached_tokens", "Prompt tokens from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("deltaserve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("deltaserve_inter_token_latency_seconds", "Time between tokens",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("deltaserve_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # resident memory, CPU time, open files of this process
        if engine is not None:
            r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request latency bookkeeping, fed every delta."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = self.last = time.monotonic()
        self.first = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.monotonic()
        if self.first:
            self.metrics.ttft.observe(t - self.start)
            self.first = False
        else:
            for _ in range(n):
                self.metrics.itl.observe((t - self.last) / n)
        self.last = t

    def done(self, finish_reason: str, usage) -> None:
        m = self.metrics
        m.requests.labels(self.endpoint, finish_reason).inc()
        m.e2e.observe(time.monotonic() - self.start)
        if usage is not None:
            m.prompt_tokens.inc(usage.prompt_tokens)
            m.cached_tokens.inc(usage.cached_tokens)
            m.generation_tokens.inc(usage.completion_tokens)
