"""What one Redis carries: its CPU per accepted and per delivered event (issue 14).

    .venv/bin/python -m bench.redis_cost [--repetitions 3] [--duration 6] [--backlog 3000]
                                         [--redis-option NAME=VALUE] [--json]

Starts a redis-server of its own (the shipped durability settings and hash encoding, on a
free port), the SMTP sink, and the Procfile's ``web`` process, then in each repetition:

- single ingest: ``wrk`` POSTs one event a request to ``/api/v1/events`` (as ``make
  bench`` does: the same load, the same events, each for its own user);
- batch ingest: the same, 250 events a request to ``/api/v1/events/batch``;
- delivery: a backlog of ``--backlog`` events (made in batches, not counted) drained by
  the Procfile's ``worker`` process (its default concurrency) to the sink.

For each it reads Redis's ``INFO commandstats`` (reset before the run) and counts, per
accepted or delivered event, the microseconds Redis spent in commands (``usec`` summed
over the commands sent by clients: a script's or a MULTI/EXEC's own ``usec`` includes the
commands it runs, which are listed, marked "inside", but not added again), and Redis's whole CPU time (user + system of the redis-server process, as its
``INFO cpu`` reports them: commands, network reads and writes, the append-only file); and the CPU time
of the web server's processes (ingest) or the worker's (delivery, start-up included) an
event. The events/s of
the ingest runs are printed too, the batch's as a ratio of the single ingest's in the
same repetition (``make bench``'s goal: ≥ 10×). No figure is asserted: other processes
on the machine change them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.load import ApiClient, LoadError, post_backlog, run_wrk
from bench.measure import (
    Config,
    Harness,
    accepted,
    probe_batch,
    probe_eventflow,
    redis_cpu_s,
    tree_cpu_s,
)
from bench.memory import free_port, start_redis
from bench.sink import SinkClient
from bench.sink import command as sink_command

#: Commands that run others: their ``usec`` includes the commands they run, which
#: ``INFO commandstats`` counts again on their own.
CONTAINERS = ("evalsha", "eval", "fcall", "exec")
#: What kombu (the Celery broker) sends inside MULTI/EXEC: a taken message's entry in the
#: ``unacked`` hash and index, and their removal when it is acknowledged.
KOMBU_TRANSACTION_COMMANDS = frozenset(("hset", "zadd", "zrem", "hdel"))


def commands_run_inside() -> frozenset[str]:
    """Every command EventFlow's Lua scripts call, and what kombu sends in MULTI."""
    called = set(KOMBU_TRANSACTION_COMMANDS)
    for script in Path(__file__).resolve().parent.parent.joinpath("eventflow").rglob("*.lua"):
        called.update(name.lower() for name in
                      re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", script.read_text()))
    return frozenset(called)


@dataclasses.dataclass
class Run:
    """One measured run: how many events, and what Redis spent on them."""

    events: int
    seconds: float
    command_usec: float
    process_cpu_s: float
    #: usec per event of each command (those run inside scripts or MULTI marked so).
    commands: dict[str, float]
    #: calls per event of each command.
    calls: dict[str, float]
    #: events/s, when measured otherwise than events / seconds.
    rate: float = 0.0
    #: CPU seconds of the process measured with Redis: the web server, or the worker.
    own_cpu_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        per = max(self.events, 1)
        return {
            "events": self.events,
            "events_per_s": round(self.rate or self.events / self.seconds, 1),
            "redis_command_us_per_event": round(self.command_usec / per, 2),
            "redis_cpu_us_per_event": round(self.process_cpu_s * 1e6 / per, 2),
            "web_or_worker_cpu_us_per_event": round(self.own_cpu_s * 1e6 / per, 2),
            "commands_us_per_event": self.commands,
            "calls_per_event": self.calls,
        }


class RedisMeter:
    """Redis's command time and process CPU between :meth:`start` and :meth:`stop`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def start(self) -> None:
        self.client.config_resetstat()
        self._cpu = redis_cpu_s(self.client)
        self._at = time.perf_counter()

    def stop(self, events: int) -> Run:
        seconds = time.perf_counter() - self._at
        cpu = redis_cpu_s(self.client) - self._cpu
        stats = self.client.info("commandstats")
        stats.pop("cmdstat_config|resetstat", None)
        stats.pop("cmdstat_info", None)
        inside = commands_run_inside()
        total = 0.0
        commands: dict[str, float] = {}
        calls: dict[str, float] = {}
        for name, figures in sorted(stats.items(), key=lambda item: -item[1]["usec"]):
            short = name.removeprefix("cmdstat_")
            if short in CONTAINERS or short not in inside:
                total += figures["usec"]
            else:
                short += " (inside)"
            commands[short] = round(figures["usec"] / max(events, 1), 2)
            calls[short] = round(figures["calls"] / max(events, 1), 2)
        return Run(events, seconds, total, cpu, commands, calls)


def measure(repetitions: int, duration: float, backlog: int,
            redis_options: tuple[str, ...]) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="eventflow-redis-cost-"))
    process, redis_port = start_redis(data, *redis_options)
    smtp_port, control_port, web_port = free_port(), free_port(), free_port()
    config = Config(redis_url=f"redis://127.0.0.1:{redis_port}/0", log_dir=data)
    harness = Harness(config)
    harness.env["SMTP_URL"] = f"smtp://127.0.0.1:{smtp_port}"
    harness.sink = SinkClient("127.0.0.1", control_port)
    client = redis.Redis(port=redis_port)
    meter = RedisMeter(client)
    out: dict[str, list[dict[str, Any]]] = {"single": [], "batch": [], "delivery": []}
    ratios: list[float] = []
    try:
        harness.raw_service("smtp-sink", sink_command(smtp_port, control_port)).start() \
            .wait_for_port(control_port)
        web = harness.service("eventflow-web", "web", None, PORT=str(web_port)).start()
        web.wait_for_port(web_port)
        api = ApiClient(web_port, harness.api_key)
        probe_eventflow(api)
        batch_size = probe_batch(api, config.batch_size)
        for path, batch in (("/api/v1/events", 0), ("/api/v1/events/batch", batch_size)):
            run_wrk(web_port, path, config.warmup_s, config.connections, config.wrk_threads,
                    harness.api_key, batch, run_id="warm")
        for rep in range(repetitions):
            rates = {}
            for name, path, batch in (("single", "/api/v1/events", 0),
                                      ("batch", "/api/v1/events/batch", batch_size)):
                harness.flush()
                meter.start()
                web_cpu = tree_cpu_s(web.pid)
                result = run_wrk(web_port, path, max(duration, 5.0) if batch else duration,
                                 config.connections, config.wrk_threads, harness.api_key,
                                 batch, run_id=f"c{rep}{name}")
                run = meter.stop(accepted(client))
                run.own_cpu_s = tree_cpu_s(web.pid) - web_cpu
                # The rate as make bench takes it: wrk's answered requests in its run.
                rates[name] = run.rate = result.requests_per_s * (batch or 1)
                out[name].append(run.as_dict())
            ratios.append(rates["batch"] / rates["single"])
            out["delivery"].append(_delivery(harness, api, meter, backlog, batch_size, rep))
            _progress(rep, out, ratios)
    finally:
        harness.stop_all()
        process.kill()
        process.wait(timeout=10)
    return {"redis_options": list(redis_options), "batch_size": batch_size,
            "batch_over_single": [round(r, 2) for r in ratios], "runs": out,
            "summary": _summary(out, ratios)}


def _delivery(harness: Harness, api: ApiClient, meter: RedisMeter, backlog: int,
              batch_size: int, rep: int) -> dict[str, Any]:
    harness.flush()
    made = post_backlog(api, backlog, batch_size, f"cost{rep}")
    if made != backlog:
        raise LoadError(f"only {made} of {backlog} backlog events were accepted")
    harness.sink.reset()
    meter.start()
    worker = harness.service(f"worker-{rep}", "worker", None).start()
    try:
        deadline = time.monotonic() + harness.config.drain_timeout_s
        while harness.sink.stats()["count"] < backlog:
            if time.monotonic() > deadline:
                raise LoadError(f"{harness.sink.stats()['count']} of {backlog} delivered")
            worker.check_alive()
            time.sleep(0.05)
        # The last messages' "delivered" steps and acknowledgements follow their 250s.
        queue_left = harness.redis.llen("celery") + harness.redis.hlen("unacked")
        while queue_left and time.monotonic() < deadline:
            time.sleep(0.05)
            queue_left = harness.redis.llen("celery") + harness.redis.hlen("unacked")
        worker_cpu = tree_cpu_s(worker.pid)
    finally:
        worker.stop()
    run = meter.stop(backlog)
    run.own_cpu_s = worker_cpu
    sink = harness.sink.stats()
    # The rate as make bench takes it: from the first email at the sink to the last.
    run.rate = (sink["count"] - 1) / max(sink["last"] - sink["first"], 1e-6)
    return run.as_dict()


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} [{min(values):,.1f}–{max(values):,.1f}]"


def _summary(out: dict[str, list[dict[str, Any]]], ratios: list[float]) -> dict[str, str]:
    summary = {}
    for name, runs in out.items():
        if not runs:
            continue
        summary[name] = (
            f"{_median([r['events_per_s'] for r in runs])} events/s; Redis "
            f"{_median([r['redis_command_us_per_event'] for r in runs])} µs in commands, "
            f"{_median([r['redis_cpu_us_per_event'] for r in runs])} µs CPU an event; "
            f"{'worker' if name == 'delivery' else 'web'} "
            f"{_median([r['web_or_worker_cpu_us_per_event'] for r in runs])} µs CPU an event")
    if ratios:
        summary["batch / single"] = _median(ratios) + "×"
    return summary


def _progress(rep: int, out: dict[str, list[dict[str, Any]]], ratios: list[float]) -> None:
    line = ", ".join(f"{name} {runs[-1]['events_per_s']:,.0f}/s "
                     f"{runs[-1]['redis_command_us_per_event']}/"
                     f"{runs[-1]['redis_cpu_us_per_event']} µs "
                     f"(own {runs[-1]['web_or_worker_cpu_us_per_event']})"
                     for name, runs in out.items() if runs)
    print(f"[redis_cost] rep {rep + 1}: {line}; batch/single {ratios[-1]:.2f}×",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of wrk a run")
    parser.add_argument("--backlog", type=int, default=3000, help="events a delivery run")
    parser.add_argument("--redis-option", action="append",
                        default=["hash-max-listpack-value=1024"], metavar="NAME=VALUE",
                        help="a redis-server option (default: deploy/redis.conf's hash "
                        "encoding, hash-max-listpack-value=1024)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON")
    args = parser.parse_args(argv)
    options = tuple(part for option in args.redis_option
                    for part in ("--" + option.partition("=")[0], option.partition("=")[2]))
    figures = measure(args.repetitions, args.duration, args.backlog, options)
    if args.json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return 0
    for name, line in figures["summary"].items():
        print(f"{name}: {line}")
    for name, runs in figures["runs"].items():
        if runs:
            top = sorted(runs[-1]["commands_us_per_event"].items(), key=lambda kv: -kv[1])[:6]
            print(f"  {name}, last run, µs an event: "
                  + ", ".join(f"{command} {us}" for command, us in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
