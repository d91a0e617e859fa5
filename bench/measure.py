"""The measurements of issue 7, each run next to its baseline in the same invocation."""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from bench.load import (
    ApiClient,
    LoadError,
    event_body,
    open_loop,
    post_backlog,
    run_wrk,
)
from bench.processes import Service, ServiceError
from bench.procfile import read_procfile, with_app
from bench.report import Series
from bench.sink import SinkClient
from bench.sink import command as sink_command

ROOT = Path(__file__).resolve().parent.parent

#: Loopback ports of the harness (19000-19099 belong to the benchmark).
PORT_BARE_FLASK = 19010
PORT_HOBBY = 19011
PORT_EVENTFLOW = 19012
PORT_FLASK_LPUSH = 19013
PORT_GUNICORN_EVENTFLOW = 19014
PORT_GUNICORN_BARE_FLASK = 19015

#: The web command before granian (bench/gunicorn_conf.py: 2 gthread workers x 4
#: threads, one socket each), kept to compare the two servers under the same apps.
GUNICORN_LINE = "gunicorn --config bench/gunicorn_conf.py --bind 127.0.0.1:{port} {app}"
PORT_SMTP_SINK = 19025
PORT_SINK_CONTROL = 19026


@dataclass
class Config:
    """How long and how hard to measure."""

    repetitions: int = 3
    duration_s: float = 6.0
    warmup_s: float = 2.0
    connections: int = 32
    wrk_threads: int = 2
    batch_size: int = 250
    backlog: int = 5000
    worker_counts: tuple[int, ...] = (1, 2, 4)
    latency_rate: float = 50.0
    latency_duration_s: float = 20.0
    #: How n "worker processes" are made: ``concurrency`` (one process, n pool processes)
    #: or ``instances`` (n processes of the ``worker`` type).
    scale_by: str = "concurrency"
    drain_timeout_s: float = 180.0
    redis_url: str = "redis://127.0.0.1:6379/14"
    log_dir: Path = field(default_factory=lambda: Path("/tmp"))


class Harness:
    """The shared pieces: Redis, the SMTP sink, the API key and the processes' environment."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.redis = redis.Redis.from_url(config.redis_url)
        self.api_key = secrets.token_hex(16)  # 32 characters
        self.sink = SinkClient("127.0.0.1", PORT_SINK_CONTROL)
        self.procfile = read_procfile(ROOT / "Procfile")
        self.notes: list[str] = []
        self.commands: dict[str, str] = {}
        self.services: list[Service] = []
        bin_dir = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": config.redis_url,
            "SMTP_URL": f"smtp://127.0.0.1:{PORT_SMTP_SINK}",
            "EVENTFLOW_API_KEYS": self.api_key,
            # Neither limit may shape the figures: every event has its own user anyway.
            "EVENTFLOW_RATE_LIMIT": "1000000/day",
            "EVENTFLOW_API_RATE_LIMIT": "1000000000/minute",
        }
        self.env.pop("WORKER_CONCURRENCY", None)

    def flush(self) -> None:
        """Empty the benchmark's Redis database (and only that one)."""
        self.redis.flushdb()

    def service(self, name: str, process_type: str, app_spec: str | None, **env: str) -> Service:
        """A process of the Procfile's ``process_type`` with ``app_spec`` swapped in."""
        command = with_app(self.procfile[process_type], app_spec, ROOT)
        for note in command.notes:
            if note not in self.notes:
                self.notes.append(note)
        self.commands[name] = command.line
        service = Service(name, command.line, {**self.env, **env}, ROOT, self.config.log_dir)
        self.services.append(service)
        return service

    def raw_service(self, name: str, line: str) -> Service:
        """A process that is not in the Procfile (the sink, the hobby design)."""
        self.commands[name] = line
        service = Service(name, line, self.env, ROOT, self.config.log_dir)
        self.services.append(service)
        return service

    @contextmanager
    def running(self, service: Service, port: int | None = None) -> Iterator[Service]:
        """Start ``service``, wait for its port, and stop it on the way out."""
        try:
            service.start()
            if port is not None:
                service.wait_for_port(port)
            yield service
        finally:
            service.stop()

    def stop_all(self) -> None:
        """Stop every process the harness started (after an interruption, say)."""
        for service in self.services:
            with suppress(Exception):
                service.stop()


def start_sink(harness: Harness) -> Service:
    """Start the SMTP sink in its own process."""
    line = sink_command(PORT_SMTP_SINK, PORT_SINK_CONTROL)
    sink = harness.raw_service("smtp-sink", line).start()
    sink.wait_for_port(PORT_SINK_CONTROL)
    sink.wait_for_port(PORT_SMTP_SINK)
    return sink


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its living descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def redis_cpu_s(client: redis.Redis) -> float:
    """User + system CPU seconds of the Redis server behind ``client`` (``INFO cpu``)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def accepted(client: redis.Redis, quiet_s: float = 0.5, timeout_s: float = 30.0) -> int:
    """Events accepted, once the count has stopped changing: when wrk stops, the requests
    it had in flight are still being answered (up to 32 batches of 250 events)."""
    deadline = time.monotonic() + timeout_s
    count = -1
    while True:
        now = int(client.hget("ef:stats", "accepted") or 0)
        if now == count or time.monotonic() > deadline:
            return now
        count = now
        time.sleep(quiet_s)


@dataclass
class CpuMeter:
    """The CPU that the web server's processes and the Redis server spend per accepted
    event between :meth:`start` and :meth:`stop`, added to ``web`` and ``redis_cpu``."""

    client: redis.Redis
    web_pid: int
    web: Series
    redis_cpu: Series
    _at: tuple[int, float, float] = (0, 0.0, 0.0)

    def _read(self) -> tuple[int, float, float]:
        # The count first: it waits until the requests in flight are answered.
        return accepted(self.client), tree_cpu_s(self.web_pid), redis_cpu_s(self.client)

    def start(self) -> None:
        self._at = self._read()

    def stop(self) -> None:
        events, web, redis_s = self._read()
        events = max(events - self._at[0], 1)
        self.web.add((web - self._at[1]) * 1e6 / events)
        self.redis_cpu.add((redis_s - self._at[2]) * 1e6 / events)


# --- ingest ---------------------------------------------------------------------------


@dataclass
class IngestSeries:
    """Request rates of the ingest phase."""

    bare_flask: Series = field(default_factory=lambda: Series("bare Flask", "req/s"))
    hobby: Series = field(default_factory=lambda: Series("hobby design", "req/s"))
    flask_lpush: Series = field(default_factory=lambda: Series("bare Flask + LPUSH", "req/s"))
    single: Series = field(default_factory=lambda: Series("ingest", "req/s"))
    batch: Series = field(default_factory=lambda: Series("batch ingest", "events/s"))
    gunicorn_single: Series = field(
        default_factory=lambda: Series("ingest under gunicorn", "req/s"))
    gunicorn_bare_flask: Series = field(
        default_factory=lambda: Series("bare Flask under gunicorn", "req/s"))
    #: The CPU an accepted event costs over each timed run, in µs: the EventFlow web
    #: server's processes, and the Redis server (wrk's own CPU is not counted).
    web_cpu_single: Series = field(
        default_factory=lambda: Series("web CPU a single POST", "µs/event"))
    web_cpu_batch: Series = field(
        default_factory=lambda: Series("web CPU a batched event", "µs/event"))
    redis_cpu_single: Series = field(
        default_factory=lambda: Series("Redis CPU a single POST", "µs/event"))
    redis_cpu_batch: Series = field(
        default_factory=lambda: Series("Redis CPU a batched event", "µs/event"))
    batch_size: int = 0
    latency_ms: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def cpu_ceiling(self) -> Series:
        """The batch/single ratio that the CPU of each repetition allows when web and Redis
        share the cores: (web + Redis) a single POST over (web + Redis) a batched event."""
        ceiling = Series("batch/single that web + Redis CPU allow", "×")
        parts = (self.web_cpu_single, self.redis_cpu_single,
                 self.web_cpu_batch, self.redis_cpu_batch)
        for part in parts:
            if part.error:
                ceiling.fail(part.error)
                return ceiling
        for ws, rs, wb, rb in zip(*(part.values for part in parts), strict=False):
            ceiling.add((ws + rs) / (wb + rb))
        return ceiling


def probe_eventflow(client: ApiClient) -> None:
    """Check that one event is accepted, or raise with what the API answered."""
    status, answer = client.post("/api/v1/events", event_body("probe-user"))
    if status != 202:
        raise LoadError(f"POST /api/v1/events answered {status}: {str(answer)[:300]}")


def probe_batch(client: ApiClient, wanted: int) -> int:
    """The largest batch size up to ``wanted`` that the API accepts whole."""
    size = wanted
    while size >= 10:
        events = [event_body(f"probe-{i}") for i in range(size)]
        status, answer = client.post("/api/v1/events/batch", {"events": events})
        if status == 207:
            queued = sum(1 for r in answer["results"] if r.get("status") == "queued")
            if queued != size:
                raise LoadError(f"batch of {size} queued only {queued}: {str(answer)[:300]}")
            return size
        if status != 413:
            raise LoadError(f"POST /api/v1/events/batch answered {status}: {str(answer)[:300]}")
        size //= 2
    raise LoadError("every batch size answered 413")


def measure_ingest(
    harness: Harness, eventflow_web: Service | None, not_ready: str | None = None
) -> IngestSeries:
    """Rates of the bare Flask app (alone and with one LPUSH), the hobby design and
    EventFlow, rep by rep (workers off).

    All servers are up at once (idle ones cost nothing) and measured in turn within each
    repetition, so each ratio compares runs a few seconds apart.
    """
    config = harness.config
    out = IngestSeries()
    bare = harness.service(
        "bare-flask", "web", "bench.apps.bare_flask:app", PORT=str(PORT_BARE_FLASK)
    )
    lpush = harness.service(
        "flask-lpush", "web", "bench.apps.flask_lpush:app", PORT=str(PORT_FLASK_LPUSH)
    )
    hobby = harness.raw_service(
        "hobby",
        f"uvicorn bench.apps.hobby:app --host 127.0.0.1 --port {PORT_HOBBY} --workers 2 "
        "--no-access-log --log-level warning",
    )
    gunicorn_bare = harness.raw_service("gunicorn-bare-flask", GUNICORN_LINE.format(
        port=PORT_GUNICORN_BARE_FLASK, app="bench.apps.bare_flask:app"))
    gunicorn_eventflow = harness.raw_service("gunicorn-eventflow", GUNICORN_LINE.format(
        port=PORT_GUNICORN_EVENTFLOW, app="wsgi:app"))
    #: (rate, port, key, batch size, the CPU meter of EventFlow's own runs)
    targets: list[tuple[Series, int, str, int, CpuMeter | None]] = []
    for service, port, series in (
        (bare, PORT_BARE_FLASK, out.bare_flask),
        (lpush, PORT_FLASK_LPUSH, out.flask_lpush),
        (hobby, PORT_HOBBY, out.hobby),
        (gunicorn_bare, PORT_GUNICORN_BARE_FLASK, out.gunicorn_bare_flask),
    ):
        try:
            service.start().wait_for_port(port)
            targets.append((series, port, "", 0, None))
        except ServiceError as error:
            series.fail(error)
    if eventflow_web is not None:
        client = ApiClient(PORT_EVENTFLOW, harness.api_key)
        try:
            probe_eventflow(client)
            targets.append((out.single, PORT_EVENTFLOW, harness.api_key, 0, CpuMeter(
                harness.redis, eventflow_web.pid, out.web_cpu_single, out.redis_cpu_single)))
        except (LoadError, OSError) as error:
            out.single.fail(error)
        try:
            out.batch_size = probe_batch(client, config.batch_size)
            targets.append((out.batch, PORT_EVENTFLOW, harness.api_key, out.batch_size, CpuMeter(
                harness.redis, eventflow_web.pid, out.web_cpu_batch, out.redis_cpu_batch)))
        except (LoadError, OSError, KeyError, TypeError) as error:
            out.batch.fail(error)
        try:
            gunicorn_eventflow.start().wait_for_port(PORT_GUNICORN_EVENTFLOW)
            probe_eventflow(ApiClient(PORT_GUNICORN_EVENTFLOW, harness.api_key))
            targets.append(
                (out.gunicorn_single, PORT_GUNICORN_EVENTFLOW, harness.api_key, 0, None))
        except (ServiceError, LoadError, OSError) as error:
            out.gunicorn_single.fail(error)
    else:
        out.single.fail(not_ready or "the EventFlow web process did not start")
        out.batch.fail(not_ready or "the EventFlow web process did not start")

    try:
        for rep in range(config.repetitions):
            for series, port, key, batch, meter in targets:
                if series.error:
                    continue
                try:
                    if rep == 0 and config.warmup_s > 0:
                        run_wrk(
                            port,
                            "/api/v1/events" + ("/batch" if batch else ""),
                            config.warmup_s,
                            config.connections,
                            config.wrk_threads,
                            key,
                            batch,
                            run_id=f"w{port}",
                        )
                    if meter is not None:
                        meter.start()
                    result = run_wrk(
                        port,
                        "/api/v1/events" + ("/batch" if batch else ""),
                        # A batch takes long enough that a short run would count none.
                        max(config.duration_s, 5.0) if batch else config.duration_s,
                        config.connections,
                        config.wrk_threads,
                        key,
                        batch,
                        run_id=f"r{rep}p{port}",
                    )
                    series.add(result.requests_per_s * (batch or 1))
                    if meter is not None:
                        meter.stop()
                    out.latency_ms.setdefault(series.name, []).append(result.latency_ms)
                except LoadError as error:
                    series.fail(error)
                harness.flush()
            report_progress(
                f"ingest rep {rep + 1}/{config.repetitions}",
                out.bare_flask,
                out.flask_lpush,
                out.hobby,
                out.single,
                out.batch,
                out.gunicorn_bare_flask,
                out.gunicorn_single,
            )
    finally:
        bare.stop()
        lpush.stop()
        hobby.stop()
        gunicorn_bare.stop()
        gunicorn_eventflow.stop()
    return out


# --- delivery -------------------------------------------------------------------------


@dataclass
class DeliverySeries:
    """Send rates of the delivery phase."""

    smtplib: Series = field(default_factory=lambda: Series("raw smtplib loop", "emails/s"))
    noop: dict[int, Series] = field(default_factory=dict)
    eventflow: dict[int, Series] = field(default_factory=dict)


def smtplib_loop(count: int) -> float:
    """Emails/s of a plain smtplib loop on one reused connection to the sink.

    Each message is built as EventFlow builds it (headers, Message-ID, event id), since
    every real email has to be.
    """
    import smtplib
    from email.message import EmailMessage

    with smtplib.SMTP("127.0.0.1", PORT_SMTP_SINK, timeout=30) as smtp:
        started = time.perf_counter()
        for i in range(count):
            message = EmailMessage()
            message["From"] = "EventFlow <noreply@localhost>"
            message["To"] = f"user-{i}@example.com"  # a recipient each, as the backlog's
            message["Subject"] = "Notification"
            message["Message-ID"] = f"<smtplib-{i}@localhost>"
            message["X-EventFlow-Event-Id"] = f"smtplib-{i}"
            message.set_content("Hello from the EventFlow benchmark.")
            smtp.send_message(message)
        return count / (time.perf_counter() - started)


@contextmanager
def workers(harness: Harness, name: str, app_spec: str | None, n: int) -> Iterator[list[Service]]:
    """``n`` worker processes of the Procfile's ``worker`` type, as ``config.scale_by`` says.

    ``concurrency``: one ``worker`` process with WORKER_CONCURRENCY=n pool processes.
    ``instances``: n ``worker`` processes, each with the Procfile's default concurrency
    (as a PaaS scales ``worker=n``).
    """
    if harness.config.scale_by == "instances":
        started = [harness.service(f"{name}-{n}.{i}", "worker", app_spec) for i in range(n)]
    else:
        started = [harness.service(f"{name}-{n}", "worker", app_spec, WORKER_CONCURRENCY=str(n))]
    try:
        for service in started:
            service.start()
        yield started
    finally:
        for service in started:
            service.stop()


def check_alive(services: list[Service]) -> None:
    """Raise if any of ``services`` has exited."""
    for service in services:
        service.check_alive()


def drain_rate(
    remaining: Callable[[], int], total: int, timeout: float, services: list[Service]
) -> float:
    """Items/s while a backlog of ``total`` drains, from the first item taken to the last."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    while time.monotonic() < deadline:
        left = remaining()
        now = time.perf_counter()
        if first is None and left < total:
            first = now
        if left <= 0 and first is not None:
            return total / max(now - first, 1e-6)
        check_alive(services)
        time.sleep(0.005)
    raise LoadError(f"backlog not drained in {timeout}s ({remaining()} of {total} left)")


def noop_rate(harness: Harness, n: int) -> float:
    """Tasks/s of a bare Celery no-op task drained from a backlog by the ``worker`` command."""
    from bench.apps.celery_noop import NOOP_TASK, celery_app

    config = harness.config
    celery_app.conf.broker_url = config.redis_url
    harness.flush()
    for i in range(config.backlog):
        celery_app.send_task(NOOP_TASK, args=[f"noop-{i}"])

    def remaining() -> int:
        # Taken-but-unacknowledged messages sit in kombu's "unacked" hash (acks late).
        return int(harness.redis.llen("celery")) + int(harness.redis.hlen("unacked"))

    with workers(harness, "noop-worker", "bench.apps.celery_noop:celery_app", n) as started:
        return drain_rate(remaining, config.backlog, config.drain_timeout_s, started)


def eventflow_delivery_rate(harness: Harness, n: int, rep: int) -> tuple[float, dict[str, float]]:
    """Emails/s at the sink while ``worker`` processes send a backlog of events.

    The backlog is created through the API with the workers stopped; the rate counts
    from the first message the sink receives to the last. Also returns the RSS of the
    worker processes.
    """
    config = harness.config
    harness.flush()
    client = ApiClient(PORT_EVENTFLOW, harness.api_key)
    try:
        accepted = post_backlog(client, config.backlog, config.batch_size, f"{rep}-{n}")
    except LoadError:
        accepted = post_backlog(client, config.backlog, 1, f"{rep}-{n}")
    if accepted != config.backlog:
        raise LoadError(f"only {accepted} of {config.backlog} backlog events were accepted")
    harness.sink.reset()
    with workers(harness, "worker", None, n) as started:
        deadline = time.monotonic() + config.drain_timeout_s
        while time.monotonic() < deadline:
            stats = harness.sink.stats()
            if stats["count"] >= config.backlog:
                break
            check_alive(started)
            time.sleep(0.05)
        else:
            raise LoadError(
                f"{stats['count']} of {config.backlog} emails in {config.drain_timeout_s}s"
            )
        rss: dict[str, float] = {}
        for service in started:
            rss.update(service.rss_mb())
    if stats["count"] != config.backlog:
        raise LoadError(f"{stats['count']} emails for {config.backlog} events")
    return (stats["count"] - 1) / max(stats["last"] - stats["first"], 1e-6), rss


def measure_delivery(
    harness: Harness, eventflow_ready: str | None
) -> tuple[DeliverySeries, dict[str, float]]:
    """Per repetition: the smtplib loop, the no-op task and EventFlow at each worker count."""
    config = harness.config
    out = DeliverySeries()
    worker_rss: dict[str, float] = {}
    for n in config.worker_counts:
        out.noop[n] = Series(f"Celery no-op ×{n}", "tasks/s")
        out.eventflow[n] = Series(f"delivery ×{n}", "emails/s")
        if eventflow_ready:
            out.eventflow[n].fail(eventflow_ready)
    for rep in range(config.repetitions):
        harness.sink.reset()
        try:
            out.smtplib.add(smtplib_loop(config.backlog))
        except OSError as error:
            out.smtplib.fail(error)
        for n in config.worker_counts:
            if not out.noop[n].error:
                try:
                    out.noop[n].add(noop_rate(harness, n))
                except (LoadError, ServiceError, OSError) as error:
                    out.noop[n].fail(error)
            if not out.eventflow[n].error:
                try:
                    rate, worker_rss = eventflow_delivery_rate(harness, n, rep)
                    out.eventflow[n].add(rate)
                except (LoadError, ServiceError, OSError) as error:
                    out.eventflow[n].fail(error)
        report_progress(
            f"delivery rep {rep + 1}/{config.repetitions}",
            out.smtplib,
            *out.noop.values(),
            *out.eventflow.values(),
        )
    harness.flush()
    return out, worker_rss


# --- latency and memory ---------------------------------------------------------------


@dataclass
class LatencySeries:
    """End-to-end latency, POST to the sink's 250, at a steady rate."""

    p50: Series = field(default_factory=lambda: Series("latency p50", "ms"))
    p99: Series = field(default_factory=lambda: Series("latency p99", "ms"))
    #: Of that, the web's part: POST to its 202, p50 and p99 per repetition.
    answer_p50: Series = field(default_factory=lambda: Series("POST answered p50", "ms"))
    answer_p99: Series = field(default_factory=lambda: Series("POST answered p99", "ms"))
    max_schedule_lag_ms: float = 0.0
    delivered: list[int] = field(default_factory=list)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def measure_latency(harness: Harness) -> tuple[LatencySeries, dict[str, float]]:
    """Open-loop POSTs at ``latency_rate``/s, each matched to its arrival at the sink.

    Runs one ``worker`` process with the Procfile's default concurrency. Returns the
    latencies and, after the run, the RSS of the web and the worker processes.
    """
    config = harness.config
    out = LatencySeries()
    client = ApiClient(PORT_EVENTFLOW, harness.api_key)
    harness.flush()

    def send(i: int) -> str | None:
        status, answer = client.post("/api/v1/events", event_body(f"lat-{i}"))
        return answer.get("id") if status == 202 and isinstance(answer, dict) else None

    worker = harness.service("worker-latency", "worker", None)
    with harness.running(worker):
        # Warm up: worker processes forked, SMTP connections open.
        open_loop(send, config.latency_rate, min(3.0, config.latency_duration_s))
        time.sleep(1.0)
        for rep in range(config.repetitions):
            harness.sink.reset()
            result = open_loop(send, config.latency_rate, config.latency_duration_s)
            out.max_schedule_lag_ms = max(out.max_schedule_lag_ms, result.max_lag_ms)
            # Wait for these events themselves: the count alone also counts warm-up
            # events that arrived after the reset, and stopped one event short once.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if harness.sink.stats()["count"] >= len(result.sent_at) and \
                        result.sent_at.keys() <= harness.sink.arrivals().keys():
                    break
                time.sleep(0.2)
            arrivals = harness.sink.arrivals()
            latencies = [
                (arrivals[event_id] - sent) * 1000
                for event_id, sent in result.sent_at.items()
                if event_id in arrivals
            ]
            out.delivered.append(len(latencies))
            if result.failures or len(latencies) < len(result.sent_at):
                error = (
                    f"{result.failures} POSTs failed, {len(latencies)} of "
                    f"{len(result.sent_at)} delivered within 30s"
                )
                out.p50.fail(error)
                out.p99.fail(error)
                break
            out.p50.add(percentile(latencies, 50))
            out.p99.add(percentile(latencies, 99))
            out.answer_p50.add(percentile(result.answer_ms, 50))
            out.answer_p99.add(percentile(result.answer_ms, 99))
            report_progress(f"latency rep {rep + 1}/{config.repetitions}", out.p50, out.p99)
        worker_rss = worker.rss_mb()
    return out, worker_rss


def report_progress(stage: str, *series: Series) -> None:
    """One progress line on stderr, so that stdout holds only the table."""
    parts = []
    for s in series:
        last = f"{s.values[-1]:,.0f}" if s.values else "-"
        parts.append(f"{s.name}={'n/a' if s.error else last}")
    print(f"[bench] {stage}: " + ", ".join(parts), file=sys.stderr, flush=True)
