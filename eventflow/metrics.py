"""Prometheus metrics: the HTTP metrics of this process and the pipeline's, from Redis.

Workers count what they do in Redis (``ef:stats``, ``ef:timing``) in the same atomic step
as the change of status, so the figures reach ``/metrics`` of any web process on any
host, with no shared filesystem between web and workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics
from redis.exceptions import RedisError

from eventflow.deadletters import DLQ_KEY
from eventflow.store import DURATION_BUCKETS, STATS_KEY, TIMING_KEY, EventStore

log = logging.getLogger(__name__)

#: Counters kept in ``ef:stats``: (field, metric name without ``_total``, help).
COUNTERS = (
    ("accepted", "eventflow_events_accepted", "Events accepted by the API."),
    ("delivered", "eventflow_emails_sent", "Emails accepted by the SMTP server."),
    ("retried", "eventflow_retries", "Attempts that failed and were scheduled again."),
    ("rate_limited", "eventflow_rate_limited", "Events not sent: the user's quota was used."),
    ("dead_lettered", "eventflow_events_dead_lettered", "Events moved to the dead letters."),
    ("ambiguous", "eventflow_ambiguous_sends",
     "Sends made again after a worker died before recording the previous send's outcome."),
)


class PipelineCollector:
    """Reads the pipeline's figures from Redis at each scrape."""

    def __init__(self, store: EventStore, queue: str) -> None:
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        try:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.hgetall(STATS_KEY)
            pipe.hgetall(TIMING_KEY)
            pipe.zcard(DLQ_KEY)
            pipe.llen(self.queue)
            stats_raw, timing_raw, dead_letters, depth = pipe.execute()
        except RedisError as exc:
            log.warning("pipeline metrics unavailable: %s", exc)
            return
        stats = {k.decode(): int(v) for k, v in stats_raw.items()}
        timing = {k.decode(): float(v) for k, v in timing_raw.items()}
        for field, name, doc in COUNTERS:
            yield _counter(name, doc, stats.get(field, 0))
        failures = CounterMetricFamily("eventflow_email_failures", "Failed send attempts.",
                                       labels=["kind"])
        for kind in ("transient", "permanent"):
            failures.add_metric([kind], stats.get(f"failures_{kind}", 0))
        yield failures
        replays = CounterMetricFamily("eventflow_replays", "Dead letters replayed.",
                                      labels=["outcome"])
        outcomes = {"queued": 0, "invalid": 0}  # always shown, even before any replay
        outcomes.update({field.partition(":")[2]: value for field, value in stats.items()
                         if field.startswith("replays:")})
        for outcome, value in sorted(outcomes.items()):
            replays.add_metric([outcome], value)
        yield replays
        yield GaugeMetricFamily("eventflow_dead_letters", "Dead letters waiting now.",
                                value=dead_letters)
        yield GaugeMetricFamily("eventflow_queue_depth", "Delivery tasks waiting in the queue.",
                                value=depth)
        buckets = [(str(b), timing.get(f"le:{b}", 0.0)) for b in DURATION_BUCKETS]
        count = timing.get("count", 0.0)
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily("eventflow_send_duration_seconds",
                                    "Time of one SMTP transaction.", buckets=buckets,
                                    sum_value=timing.get("sum", 0.0))


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class _PipelineMixin:
    """Appends the pipeline's families to whatever the exporter generates."""

    pipeline: CollectorRegistry

    def generate_metrics(self, accept_header: str | None = None,
                         names: list[str] | None = None) -> tuple[str, str]:
        # Plain text format on both sides, so that the two parts can be joined.
        http, content_type = super().generate_metrics(None, names)  # type: ignore[misc]
        return http + generate_latest(self.pipeline).decode(), content_type


class SingleProcessMetrics(_PipelineMixin, PrometheusMetrics):
    """One process (development server, tests)."""


class GunicornMetrics(_PipelineMixin, GunicornInternalPrometheusMetrics):
    """Several gunicorn workers sharing ``PROMETHEUS_MULTIPROC_DIR``."""


def init_metrics(app: Flask, store: EventStore, queue: str) -> PrometheusMetrics:
    """Serve ``/metrics``: HTTP metrics (every gunicorn worker's) and the pipeline's."""
    pipeline = CollectorRegistry(auto_describe=True)
    pipeline.register(PipelineCollector(store, queue))  # type: ignore[arg-type]
    options: dict[str, Any] = {"group_by": "url_rule", "excluded_paths": ["^/metrics$"]}
    metrics_class: type[SingleProcessMetrics | GunicornMetrics] = SingleProcessMetrics
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several gunicorn workers: each writes its samples to the shared directory and
        # whichever answers serves the sum.
        metrics_class = GunicornMetrics
    else:
        options["registry"] = CollectorRegistry(auto_describe=True)
    metrics = metrics_class(app=None, **options)
    metrics.pipeline = pipeline
    metrics.init_app(app)
    return metrics
