"""``make bench-profile``: where a POST /api/v1/events and a delivery spend their time.

py-spy samples the web process's workers (granian's) while wrk loads the single-event
endpoint, then a worker process while it drains a backlog. Each profile is summed up by
the code that was running (self time, grouped by package, and EventFlow's own functions
inclusive); the flame graphs' raw stacks stay under ``bench/profiles/`` for a closer look.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import ApiClient, post_backlog, run_wrk
from bench.measure import PORT_EVENTFLOW, ROOT, Config, Harness, start_sink

PROFILE_DIR = ROOT / "bench" / "profiles"

#: ``function (path/to/file.py:123)`` as py-spy writes a frame.
_FRAME_RE = re.compile(r"^(?P<function>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def record(pid: int, seconds: float, out: Path, idle: bool) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` and its children for ``seconds``; stacks go to ``out``.

    ``idle``: every thread, waiting or not (wall time); otherwise only the thread that
    holds the GIL (Python's CPU time).
    """
    command = [
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    if idle:
        command.append("--idle")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def package_of(path: str) -> str:
    """The package of a frame's file as py-spy names it (``redis/connection.py`` → redis)."""
    first = path.split("/", 1)[0]
    return first.removesuffix(".py")


def _is_own(file: str) -> bool:
    return file.startswith(("eventflow/", "tasks/", "bench/")) or file in {"wsgi.py"}


def summarize(raw: Path, only_within: str | None, top: int = 30) -> str:
    """Self time by package, and the time of each EventFlow step, as shares of samples.

    A step is a function of EventFlow's own (inclusive time), or a library call made
    directly from one (``Throttle.check → Script.__call__``): the cost of each thing the
    code asks for. ``only_within`` keeps only the stacks that pass through a function of
    that name (the request handler, the task), so that waiting for work does not count.
    """
    by_package: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [m for m in map(_FRAME_RE.match, stack.split(";")) if m]
        if only_within and not any(m["function"].endswith(only_within) for m in frames):
            continue
        count = int(count_text)
        total += count
        if frames:
            by_package[package_of(frames[-1]["file"])] += count
        seen: set[str] = set()
        caller: str | None = None
        for match in frames:
            name = f"{match['function']} ({match['file']})"
            if _is_own(match["file"]):
                caller = name
                step = name
            elif caller is not None:
                step = f"{caller} → {match['function']} ({package_of(match['file'])})"
                caller = None
            else:
                continue
            if step not in seen:
                seen.add(step)
                steps[step] += count
    if not total:
        return f"{raw.name}: no samples\n"
    scope = f" within {only_within}" if only_within else ""
    lines = [f"{raw.name}: {total} samples{scope}", "  self time by package:"]
    for package, count in by_package.most_common(12):
        lines.append(f"    {100 * count / total:5.1f}%  {package}")
    lines.append("  EventFlow's steps, inclusive (→ a library call made from that step):")
    for step, count in steps.most_common(top):
        lines.append(f"    {100 * count / total:5.1f}%  {step}")
    return "\n".join(lines) + "\n"


def profile_web(harness: Harness, seconds: float) -> list[Path]:
    """Profile the web process under wrk load on POST /api/v1/events (workers stopped)."""
    web = harness.service("eventflow-web", "web", None, PORT=str(PORT_EVENTFLOW))
    outputs = []
    with harness.running(web, PORT_EVENTFLOW):
        run_wrk(PORT_EVENTFLOW, "/api/v1/events", 2, 32, api_key=harness.api_key, run_id="pw")
        for idle in (False, True):
            out = PROFILE_DIR / f"web-{'wall' if idle else 'cpu'}.txt"
            spy = record(web.pid, seconds + 1, out, idle)
            time.sleep(0.5)
            run_wrk(
                PORT_EVENTFLOW,
                "/api/v1/events",
                seconds,
                32,
                api_key=harness.api_key,
                run_id=f"p{int(idle)}",
            )
            spy.wait(60)
            outputs.append(out)
            harness.flush()
    return outputs


def profile_worker(harness: Harness, seconds: float, backlog: int) -> list[Path]:
    """Profile one worker process (concurrency 1) while it drains a backlog."""
    web = harness.service("eventflow-web", "web", None, PORT=str(PORT_EVENTFLOW))
    outputs = []
    with harness.running(web, PORT_EVENTFLOW):
        for idle in (False, True):
            harness.flush()
            post_backlog(ApiClient(PORT_EVENTFLOW, harness.api_key), backlog, 250, f"pf{idle}")
            worker = harness.service("worker-profile", "worker", None, WORKER_CONCURRENCY="1")
            with harness.running(worker):
                time.sleep(3)  # let it start and take its first tasks
                out = PROFILE_DIR / f"worker-{'wall' if idle else 'cpu'}.txt"
                record(worker.pid, seconds, out, idle).wait(60)
                outputs.append(out)
    harness.flush()
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--redis-port", type=int, default=6379)
    args = parser.parse_args(argv)
    redis_url = (
        os.environ.get("BENCH_REDIS_URL")
        or os.environ.get("REDIS_URL")
        or f"redis://127.0.0.1:{args.redis_port}/14"
    )
    PROFILE_DIR.mkdir(exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="eventflow-profile-"))
    harness = Harness(Config(redis_url=redis_url, log_dir=log_dir))
    try:
        harness.flush()
        start_sink(harness)
        web_cpu, web_wall = profile_web(harness, args.seconds)
        worker_cpu, worker_wall = profile_worker(harness, args.seconds, 3000)
    finally:
        harness.stop_all()
        harness.flush()
    report = [
        "== web, CPU (active samples) ==",
        summarize(web_cpu, "FastIngest.__call__"),
        "== web, wall time inside a request (idle samples too) ==",
        summarize(web_wall, "FastIngest.__call__"),
        "== web, CPU, whole process (server overhead included) ==",
        summarize(web_cpu, None),
        "== worker, CPU ==",
        summarize(worker_cpu, None),
        "== worker, wall time inside a task (idle samples too) ==",
        summarize(worker_wall, "trace_task"),
    ]
    text = "\n".join(report)
    (PROFILE_DIR / "summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
