"""Load generation: wrk for throughput, and an open-loop Python client for latency."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WRK_SCRIPT = Path(__file__).with_name("wrk") / "post_events.lua"

#: The message of every benchmark event; with it an event is about 200 bytes of JSON.
MESSAGE = (
    "Hello from the EventFlow benchmark: your weekly report is ready, "
    "open the dashboard to read it."
)


def event_body(user_id: str) -> dict[str, Any]:
    """One event as the API takes it, to a recipient of the user's own: no cache of the
    address (its check, its ``To`` header) serves two events of a backlog."""
    return {
        "user_id": user_id,
        "event_type": "USER_NOTIFICATION",
        "payload": {"to_email": f"{user_id}@example.com", "message": MESSAGE},
    }


class LoadError(RuntimeError):
    """The load generator failed, or the server answered errors."""


@dataclass
class WrkResult:
    """What one wrk run measured."""

    requests_per_s: float
    requests: int
    errors: int
    non_2xx: int
    latency_ms: dict[str, float] = field(default_factory=dict)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise LoadError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Read wrk's text report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rate or not total:
        raise LoadError(f"unexpected wrk output: {output[-500:]}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency = {
        f"p{pct}": _ms(value)
        for pct, value in re.findall(r"^\s+(50|90|99)%\s+(\S+)", output, re.MULTILINE)
    }
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        requests=int(total.group(1)),
        errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        latency_ms=latency,
    )


def run_wrk(
    port: int,
    path: str,
    duration_s: float,
    connections: int,
    threads: int = 2,
    api_key: str = "",
    batch: int = 0,
    run_id: str = "0",
) -> WrkResult:
    """POST events to 127.0.0.1:``port`` for ``duration_s`` seconds (wrk stops by itself)."""
    env = {
        **os.environ,
        "BENCH_PATH": path,
        "BENCH_API_KEY": api_key,
        "BENCH_BATCH": str(batch),
        "BENCH_MESSAGE": MESSAGE,
        "BENCH_RUN": run_id,
    }
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=duration_s + 60
    )
    if done.returncode != 0:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    # A rate made of error answers measures nothing: refuse it rather than report it.
    if result.non_2xx > 0.01 * max(result.requests, 1) or result.errors > 0.01 * max(
        result.requests, 1
    ):
        raise LoadError(
            f"{result.non_2xx} non-2xx answers and {result.errors} socket errors "
            f"in {result.requests} requests"
        )
    return result


class ApiClient:
    """A small keep-alive HTTP client for probes, backlogs and the latency run."""

    def __init__(self, port: int, api_key: str, timeout: float = 30.0) -> None:
        self.port = port
        self.api_key = api_key
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST ``body`` as JSON; the status and the decoded answer."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode(errors="replace")[:300]
        return response.status, answer


def post_backlog(client: ApiClient, count: int, batch_size: int, run_id: str) -> int:
    """Create ``count`` events, in batches when ``batch_size`` > 1; how many were accepted."""
    accepted = 0
    if batch_size > 1:
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            events = [event_body(f"b{run_id}-{start + i}") for i in range(size)]
            status, answer = client.post("/api/v1/events/batch", {"events": events})
            if status != 207:
                raise LoadError(f"batch answered {status}: {str(answer)[:300]}")
            accepted += sum(1 for r in answer["results"] if r.get("status") == "queued")
        return accepted

    def one(i: int) -> bool:
        status, _ = client.post("/api/v1/events", event_body(f"b{run_id}-{i}"))
        return status == 202

    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(one, range(count)))
    return accepted


@dataclass
class OpenLoopResult:
    """Send times of an open-loop run, keyed by the event id the API answered."""

    sent_at: dict[str, float]
    failures: int
    max_lag_ms: float
    #: How long each POST took to be answered, in ms.
    answer_ms: list[float] = field(default_factory=list)


def open_loop(
    send: Callable[[int], str | None], rate: float, duration_s: float, threads: int = 16
) -> OpenLoopResult:
    """Call ``send(i)`` at a steady ``rate`` per second, whatever the answers' pace.

    ``send`` returns the event id, or None on failure. Each call's start time is recorded
    against its id; ``max_lag_ms`` says how far behind the schedule any call started.
    """
    sent_at: dict[str, float] = {}
    answer_ms: list[float] = []
    failures = 0
    max_lag = 0.0
    lock = threading.Lock()
    start = time.time() + 0.05

    def fire(i: int) -> None:
        nonlocal failures, max_lag
        began = time.time()
        event_id = send(i)
        answered = time.time()
        with lock:
            answer_ms.append((answered - began) * 1000)
            max_lag = max(max_lag, began - (start + i / rate))
            if event_id is None:
                failures += 1
            else:
                sent_at[event_id] = began

    total = int(rate * duration_s)
    with ThreadPoolExecutor(threads) as pool:
        for i in range(total):
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            pool.submit(fire, i)
    return OpenLoopResult(sent_at, failures, max_lag * 1000, answer_ms)
