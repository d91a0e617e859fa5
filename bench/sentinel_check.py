"""What acknowledging a write costs with replicas, and with the Sentinels asked too.

    .venv/bin/python -m bench.sentinel_check [--events 2000] [--repetitions 3]

Starts the test suite's Sentinel layout (a master, two replicas, three Sentinels, real
``redis-server`` processes on free loopback ports) and times ``EventStore.accept`` (the
accept script of ``POST /api/v1/events``) called one after the other from one thread:

- ``plain``: ``redis://`` to the master, ``EVENTFLOW_REDIS_MIN_REPLICAS=0``;
- ``wait``: the same with ``EVENTFLOW_REDIS_MIN_REPLICAS=1`` (the script and ``WAIT`` in
  one round trip);
- ``sentinel``: the ``sentinel://`` URL with ``EVENTFLOW_REDIS_MIN_REPLICAS=1``: the
  same, then each Sentinel asked whether the server that took the write is the master.

Prints the median microseconds per accept of each; nothing is asserted (loopback: a
network's round trips add to ``wait`` once and to ``sentinel`` once per Sentinel).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from eventflow.clock import SystemClock
from eventflow.enqueue import TaskMessage
from eventflow.services import redis_client
from eventflow.settings import Settings
from eventflow.store import EventStore
from tests.sentinel_cluster import MASTER_NAME, SentinelCluster

EVENT = {"user_id": "user-123", "event_type": "USER_NOTIFICATION",
         "payload": {"to_email": "test@example.com", "message": "Hello"}}


def per_accept_us(store: EventStore, events: int) -> float:
    message = TaskMessage("bench", "{}")
    started = time.perf_counter()
    for _ in range(events):
        store.accept(uuid.uuid4().hex, EVENT, "bench", message)
    return (time.perf_counter() - started) / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repetitions", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cluster = SentinelCluster(Path(directory)).start()
        try:
            urls = {"plain": (cluster.master.url, 0), "wait": (cluster.master.url, 1),
                    "sentinel": (cluster.url, 1)}
            stores = {
                name: EventStore(redis_client(Settings.from_env(
                    {"REDIS_URL": url, "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME})),
                    SystemClock(), min_replicas=replicas)
                for name, (url, replicas) in urls.items()
            }
            figures: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(options.repetitions):
                for name, store in stores.items():
                    per_accept_us(store, 50)  # connections made, scripts loaded
                    figures[name].append(per_accept_us(store, options.events))
        finally:
            cluster.stop()
    for name, values in figures.items():
        print(f"{name:>9}: {statistics.median(values):7.1f} µs an accept "
              f"[{min(values):.1f}–{max(values):.1f}] over {options.repetitions} × "
              f"{options.events}")


if __name__ == "__main__":
    main()
