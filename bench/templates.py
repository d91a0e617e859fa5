"""What email templates cost (issue 15): rendering per message, and the delivery rate of one
worker with the shipped HTML template, next to a text-only template and to the raw smtplib
loop of the main benchmark.

    .venv/bin/python -m bench.templates [--backlog 3000] [--repetitions 3]

It needs a Redis on 127.0.0.1: it uses database 14 (``BENCH_REDIS_URL`` names another;
database 0 is refused) and empties only that one. Every port is a free ephemeral one, so
it runs beside other suites. The SMTP sink (the project's server, ``bench/sink.py``) and
the worker (the Procfile's ``worker`` command, ``WORKER_CONCURRENCY`` from
``--concurrency``, 1 by default) run in processes of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import redis

from bench.sink import SinkClient, command
from eventflow import create_app
from eventflow.devstack.processes import Process, procfile_command
from eventflow.devstack.smtp import free_port
from eventflow.mailer import as_smtp_bytes, build_message
from eventflow.rendering import Templates
from eventflow.settings import Settings

KEY = "bench-templates-key-0123456789abcdef"
MAIL_FROM = "EventFlow <noreply@localhost>"


def event(i: int) -> dict[str, Any]:
    """A different message each time, so that no cache makes the figures."""
    return {"user_id": f"user-{i}", "event_type": "USER_NOTIFICATION",
            "payload": {"to_email": "test@example.com",
                        "message": f"Hello from the EventFlow benchmark, message {i}."}}


def per_message_us(work: Callable[[int], Any], count: int) -> float:
    """Microseconds per call of ``work(i)``, the best of three runs of ``count``."""
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        for i in range(count):
            work(i)
        runs.append((time.perf_counter() - started) / count * 1e6)
    return min(runs)


def render_costs(count: int, text_only: Path) -> dict[str, float]:
    """Per-message costs of each step, in microseconds."""
    shipped, plain = Templates(), Templates(text_only)
    rendered = {i: shipped.render_event(str(i), event(i)) for i in range(count)}
    return {
        "check at the door, shipped templates (known to render, not rendered)":
            per_message_us(lambda i: shipped.check_event(event(i)), count),
        "check at the door, shipped templates rendered (no CSS inlining)": per_message_us(
            lambda i: shipped.render_event(str(i), event(i), inline_css=False), count),
        "check at the door, an operator's text-only template (rendered)": per_message_us(
            lambda i: plain.check_event(event(i)), count),
        "render, CSS inlined (shipped HTML template)": per_message_us(
            lambda i: shipped.render_event(str(i), event(i)), count),
        "render (text-only template)": per_message_us(
            lambda i: plain.render_event(str(i), event(i)), count),
        "build + serialize, text/plain (no template, as before)": per_message_us(
            lambda i: as_smtp_bytes(build_message(str(i), event(i), MAIL_FROM, "localhost")),
            count),
        "build + serialize, multipart/alternative": per_message_us(
            lambda i: as_smtp_bytes(build_message(str(i), event(i), MAIL_FROM, "localhost",
                                                  rendered[i])), count),
    }


def smtplib_loop(port: int, count: int) -> float:
    """Emails/s of the main benchmark's raw smtplib loop (``bench/measure.py``)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        started = time.perf_counter()
        for i in range(count):
            message = EmailMessage()
            message["From"] = MAIL_FROM
            message["To"] = "test@example.com"
            message["Subject"] = "Notification"
            message["Message-ID"] = f"<smtplib-{i}@localhost>"
            message["X-EventFlow-Event-Id"] = f"smtplib-{i}"
            message.set_content("Hello from the EventFlow benchmark.")
            smtp.send_message(message)
        return count / (time.perf_counter() - started)


def delivery_rate(env: dict[str, str], sink: SinkClient, count: int, logs: Path,
                  label: str, tree: Path | None = None) -> float:
    """Emails/s of one worker process (``WORKER_CONCURRENCY`` of ``env``) draining a
    backlog of ``count`` events."""
    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    sink.reset()
    app = create_app(Settings.from_env(env), {"TESTING": True})
    client = app.test_client()
    for start in range(0, count, 250):
        batch = [event(i) for i in range(start, min(start + 250, count))]
        response = client.post("/api/v1/events/batch", json={"events": batch},
                               headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 207, response.get_data(as_text=True)
    worker_env = dict(env)
    if tree is not None:  # another checkout's code (the events in Redis are the same)
        worker_env["PYTHONPATH"] = str(tree)
        worker = Process(procfile_command("worker", tree / "Procfile"), worker_env,
                         logs / f"worker-{label}.log", cwd=tree)
    else:
        worker = Process(procfile_command("worker"), worker_env, logs / f"worker-{label}.log")
    try:
        deadline = time.monotonic() + 600
        while (stats := sink.stats())["count"] < count:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{stats['count']} of {count} emails in 600 s")
            time.sleep(0.2)
    finally:
        worker.stop()
    return (stats["count"] - 1) / max(stats["last"] - stats["first"], 1e-6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.templates", description=__doc__)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--render-count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1,
                        help="WORKER_CONCURRENCY of the worker process")
    parser.add_argument("--render-only", action="store_true",
                        help="only the per-message costs, no worker")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also measure the worker of this checkout (say, `git archive "
                             "main` unpacked): the delivery rate before templates")
    args = parser.parse_args(argv)
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    if redis_url.rstrip("/").endswith("/0"):
        parser.error("database 0 is refused: name another in BENCH_REDIS_URL")

    logs = Path(tempfile.mkdtemp(prefix="eventflow-bench-templates-"))
    text_only = logs / "text-only"
    (text_only / "USER_NOTIFICATION").mkdir(parents=True)
    (text_only / "USER_NOTIFICATION" / "subject.txt").write_text(
        '{{ payload.subject | default("You have a new notification") }}\n')
    (text_only / "USER_NOTIFICATION" / "body.txt").write_text("{{ payload.message }}\n")

    costs = render_costs(args.render_count, text_only)
    print(f"Per message ({args.render_count} different messages, best of 3), "
          "in microseconds:")
    for name, value in costs.items():
        print(f"  {value:8.1f}  {name}")
    if args.render_only:
        return 0

    smtp_port, control_port = free_port(), free_port()
    sink_process = Process(command(smtp_port, control_port), {}, logs / "sink.log")
    sink = SinkClient("127.0.0.1", control_port)
    env = {
        "REDIS_URL": redis_url, "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "MAIL_FROM": MAIL_FROM, "EVENTFLOW_API_KEYS": KEY,
        "EVENTFLOW_RATE_LIMIT": "1000000/day", "EVENTFLOW_API_RATE_LIMIT": "1000000000/minute",
        "WORKER_CONCURRENCY": str(args.concurrency),
    }
    rates: dict[str, list[float]] = {"raw smtplib loop": [], "shipped HTML template": [],
                                     "text-only template": []}
    if args.baseline_tree:
        rates["before templates (baseline tree)"] = []
    try:
        sink_process.wait_for_port(control_port, timeout=30)
        for rep in range(args.repetitions):
            sink.reset()
            rates["raw smtplib loop"].append(smtplib_loop(smtp_port, args.backlog))
            rates["shipped HTML template"].append(
                delivery_rate(env, sink, args.backlog, logs, f"html-{rep}"))
            rates["text-only template"].append(delivery_rate(
                {**env, "EVENTFLOW_TEMPLATES_DIR": str(text_only)}, sink, args.backlog, logs,
                f"text-{rep}"))
            if args.baseline_tree:
                rates["before templates (baseline tree)"].append(delivery_rate(
                    env, sink, args.backlog, logs, f"baseline-{rep}",
                    args.baseline_tree.resolve()))
            print(f"repetition {rep + 1}: " + ", ".join(
                f"{name} {values[-1]:.0f}/s" for name, values in rates.items()), flush=True)
    finally:
        sink_process.stop()
    baseline = statistics.median(rates["raw smtplib loop"])
    print(f"\nDelivery from a backlog of {args.backlog}, one worker process with "
          f"{args.concurrency} pool process(es) (median of "
          f"{args.repetitions}; ratios to the raw smtplib loop, repetition by repetition):")
    results: dict[str, Any] = {"per_message_us": costs, "emails_per_s": rates}
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates["raw smtplib loop"], strict=True)]
        results.setdefault("ratio", {})[name] = ratios
        print(f"  {statistics.median(values):7.0f} emails/s  [{min(values):.0f}-{max(values):.0f}]"
              f"  {statistics.median(ratios):.2f}x  {name}")
    print(f"\nlogs in {logs}; raw smtplib loop median {baseline:.0f}/s")
    (logs / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
