"""Prometheus metrics of one server: its own registry (so tests can run several apps in one
process) with the process collector (process_resident_memory_bytes, CPU seconds, open fds).

    serve_requests_total{pipeline, status}      answers by HTTP status
    serve_errors_total{kind}                    non-2xx answers by cause (no_face, queue_full, ...)
    serve_queue_depth                           requests waiting for the worker
    serve_ready                                 1 after warm-up
    serve_batch_size                            requests per pipeline call (histogram)
    serve_stage_seconds{pipeline, stage}        decode | queue | run | encode | total (histograms)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector  # noqa: F401 - CONTENT_TYPE_LATEST re-exported

from runtime.serve.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Metrics:
    """The server's metric families, registered in `registry`."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self):
        reg = self.registry
        ProcessCollector(registry=reg)
        self.requests = Counter("serve_requests", "HTTP answers by pipeline and status",
                                ("pipeline", "status"), registry=reg)
        self.errors = Counter("serve_errors", "non-2xx answers by cause", ("kind",), registry=reg)
        self.queue_depth = Gauge("serve_queue_depth", "requests waiting for the worker", registry=reg)
        self.ready = Gauge("serve_ready", "1 after warm-up, 0 before or after a failed warm-up", registry=reg)
        self.batch_size = Histogram("serve_batch_size", "requests per pipeline call", buckets=BATCH_BUCKETS,
                                    registry=reg)
        self.dropped = Counter("serve_dropped", "queued requests dropped before running", ("reason",),
                               registry=reg)
        self.stage = Histogram("serve_stage_seconds", "seconds per request stage", ("pipeline", "stage"),
                               buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_seconds = Histogram("serve_batch_seconds", "seconds per pipeline call (a whole batch)",
                                       buckets=LATENCY_BUCKETS, registry=reg)

    def batch_stats(self) -> BatchStats:
        """Callbacks for BatchQueue."""
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)

        return BatchStats(on_depth=self.queue_depth.set, on_batch=on_batch,
                          on_wait=lambda seconds: None,  # per pipeline: observed by the app as stage 'queue'
                          on_dropped=lambda reason: self.dropped.labels(reason).inc())

    def answer(self, pipeline: str, status: int, kind: str | None = None) -> None:
        """Count one HTTP answer (and its error kind when status >= 400)."""
        self.requests.labels(pipeline, str(status)).inc()
        if status >= 400:
            self.errors.labels(kind or "error").inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
