"""Prometheus metrics: the HTTP metrics of this process and the pipeline's, from Redis.

Workers count what they do in Redis (``ef:stats``, ``ef:timing``) in the same atomic step
as the change of status, so the figures reach ``/metrics`` of any web process on any
host, with no shared filesystem between web and workers.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from timeit import default_timer
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics
from redis.exceptions import RedisError
from werkzeug.routing import Rule

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
    ("suppressed", "eventflow_suppressed",
     "Events not sent: their address is on the suppression list."),
    ("bounced", "eventflow_bounced", "Events bounced back after the SMTP server took them."),
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
            pipe.info("memory")
            stats_raw, timing_raw, dead_letters, depth, memory = pipe.execute()
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
        yield GaugeMetricFamily("eventflow_redis_used_memory_bytes",
                                "Memory Redis uses (INFO used_memory); it refuses writes "
                                "beyond its maxmemory.", value=int(memory.get("used_memory", 0)))
        if int(memory.get("maxmemory", 0) or 0) > 0:
            yield GaugeMetricFamily("eventflow_redis_maxmemory_bytes",
                                    "Redis's maxmemory (0, not shown: no limit).",
                                    value=int(memory["maxmemory"]))
        buckets = [(str(b), timing.get(f"le:{b}", 0.0)) for b in DURATION_BUCKETS]
        count = timing.get("count", 0.0)
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily("eventflow_send_duration_seconds",
                                    "Time of one SMTP transaction.", buckets=buckets,
                                    sum_value=timing.get("sum", 0.0))


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class _PipelineMixin:
    """Appends the pipeline's families to whatever the exporter generates, and records
    the exporter's default HTTP metrics with leaner hooks."""

    pipeline: CollectorRegistry
    registry: CollectorRegistry
    info: Any

    def export_defaults(self, buckets: Any = None, group_by: str = "path",
                        latency_as_histogram: bool = True, prefix: str = "flask",
                        app: Flask | None = None, **kwargs: Any) -> None:
        """The exporter's own default metrics (same names, labels and buckets), counted
        by :class:`HttpMetrics` instead of the exporter's hooks, which cost a large share
        of a bare Flask request's CPU (figures in ``bench/README.md``)."""
        assert app is not None and latency_as_histogram and group_by == "url_rule"
        self.info(f"{prefix}_exporter_info", "Information about the Prometheus Flask exporter",
                  version=getattr(self, "version", "unknown"))
        HttpMetrics(
            Histogram(f"{prefix}_http_request_duration_seconds",
                      "Flask HTTP request duration in seconds", ("method", "url_rule", "status"),
                      registry=self.registry, **({"buckets": buckets} if buckets else {})),
            Counter(f"{prefix}_http_request_total", "Total number of HTTP requests",
                    ("method", "status"), registry=self.registry),
            Counter(f"{prefix}_http_request_exceptions_total",
                    "Total number of HTTP requests which resulted in an exception",
                    ("method", "status"), registry=self.registry),
        ).init_app(app)

    def generate_metrics(self, accept_header: str | None = None,
                         names: list[str] | None = None) -> tuple[str, str]:
        # Plain text format on both sides, so that the two parts can be joined.
        http, content_type = super().generate_metrics(None, names)  # type: ignore[misc]
        return http + generate_latest(self.pipeline).decode(), content_type


class SingleProcessMetrics(_PipelineMixin, PrometheusMetrics):
    """One process (development server, tests)."""


class MultiprocessMetrics(_PipelineMixin, GunicornInternalPrometheusMetrics):
    """Several web worker processes sharing ``PROMETHEUS_MULTIPROC_DIR``."""

    def generate_metrics(self, accept_header: str | None = None,
                         names: list[str] | None = None) -> tuple[str, str]:
        forget_dead_processes(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        return super().generate_metrics(accept_header, names)


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live gauges of worker processes that have exited; return their pids.

    gunicorn told prometheus_client of a dead worker from its ``child_exit`` hook; the
    web server has no such hook, so each scrape looks for the files of processes that
    no longer run. Counters and histograms of a dead worker are kept, as gunicorn kept
    them: totals must not go down when a worker is replaced.
    """
    dead: set[int] = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:
            pass  # alive, another user's
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


class HttpMetrics:
    """Counts each request in the exporter's metrics, keeping each label set's samples.

    The exporter looks up the label set through ``labels(**values)`` and reads the request
    through Flask's proxies several times per request; the samples of a (method, rule,
    status) are looked up once here and kept. The number of label sets is the same.
    """

    def __init__(self, duration: Histogram, total: Counter, exceptions: Counter) -> None:
        self.duration = duration
        self.total = total
        self.exceptions = exceptions
        self._samples: dict[tuple[str, int, int], tuple[Any, Any]] = {}

    def init_app(self, app: Flask) -> None:
        app.before_request(self.start)
        app.after_request(self.record)
        app.teardown_request(self.record_exception)
        app.extensions["http_metrics"] = self

    def start(self) -> None:
        request.environ[STARTED] = default_timer()

    def record(self, response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        started = req.environ.pop(STARTED, None)
        if started is not None and req.path != "/metrics":
            self.observe(req.method, req.url_rule, response.status_code, started)
        return response

    def observe(self, method: str, rule: Rule | None, status: int, started: float) -> None:
        """Count one answered request that began at ``started`` (``default_timer()``)."""
        # Rules are not hashable; each is one object for the app's life.
        key = (method, id(rule), status)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = (
                self.duration.labels(method=method, url_rule=rule, status=str(status)),
                self.total.labels(method=method, status=str(status)),
            )
        samples[0].observe(max(default_timer() - started, 0))
        samples[1].inc()

    def record_exception(self, exception: BaseException | None = None) -> None:
        """A request that raised past every error handler: counted as a 500."""
        if exception is None:
            return
        started = request.environ.pop(STARTED, None)
        if request.path == "/metrics":
            return
        self.exceptions.labels(method=request.method, status="500").inc()
        if started is not None:
            self.observe(request.method, request.url_rule, 500, started)


#: Where the start of a request is kept, in its WSGI environ.
STARTED = "eventflow.metrics.started"


def init_metrics(app: Flask, store: EventStore, queue: str) -> PrometheusMetrics:
    """Serve ``/metrics``: HTTP metrics (every web worker's) and the pipeline's."""
    pipeline = CollectorRegistry(auto_describe=True)
    pipeline.register(PipelineCollector(store, queue))  # type: ignore[arg-type]
    options: dict[str, Any] = {"group_by": "url_rule", "excluded_paths": ["^/metrics$"]}
    metrics_class: type[SingleProcessMetrics | MultiprocessMetrics] = SingleProcessMetrics
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several web workers: each writes its samples to the shared directory and
        # whichever answers serves the sum.
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        metrics_class = MultiprocessMetrics
    else:
        options["registry"] = CollectorRegistry(auto_describe=True)
    metrics = metrics_class(app=None, **options)
    metrics.pipeline = pipeline
    metrics.init_app(app)
    return metrics
