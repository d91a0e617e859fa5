"""Soak: many events while workers are SIGKILLed and restarted every few seconds.

Every event must end delivered exactly once or dead-lettered with a reason; a second
message for an event is allowed only where a send was counted ambiguous (the worker died
between handing the message over and recording the reply).

The default is short enough for every CI run (200 events). For the long run:
``EVENTFLOW_SOAK_EVENTS=2000 pytest -s tests/test_soak.py``; it prints its figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from tests.conftest import auth
from tests.faults import FAST_RECOVERY, FINAL, event_to
from tests.processes import Process, worker_command
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

EVENTS = int(os.environ.get("EVENTFLOW_SOAK_EVENTS") or 200)
#: Seconds between two kills (drawn uniformly in this range).
KILL_EVERY = (2.0, 4.0)
#: Seconds over which the events arrive (20 events a second, 20 s at least).
ARRIVAL_SECONDS = max(20.0, EVENTS / 20)
TICK = 0.5
BATCH = max(1, round(EVENTS / (ARRIVAL_SECONDS / TICK)))


class Chaos:
    """Two workers; every few seconds one is SIGKILLed (whole, or one pool process) and a
    whole worker killed is started again at once."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = env
        self.tmp_path = tmp_path
        self.kills: Counter[str] = Counter()
        self.started = 0
        self.workers = [self._start(n) for n in range(2)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _start(self, n: int) -> Process:
        self.started += 1
        name = f"soak{n}-{self.started}"
        return Process(worker_command(2, f"-n {name}@%h"), self.env,
                       self.tmp_path / f"worker{n}.log")

    def start(self) -> Chaos:
        for worker in self.workers:
            worker.wait_for_output("ready.", timeout=45)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(7)
        while not self._stop.wait(rng.uniform(*KILL_EVERY)):
            n = rng.randrange(2)
            worker = self.workers[n]
            children = worker.children()
            if children and rng.random() < 0.5:
                try:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    self.kills["pool_process"] += 1
                except ProcessLookupError:
                    pass
            else:
                worker.kill_group()
                worker.stop()  # closes its log
                self.kills["whole_worker"] += 1
                self.workers[n] = self._start(n)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def chaos(environment: dict[str, str], tmp_path: Path) -> Iterator[Chaos]:
    env = {**environment, **FAST_RECOVERY, "EVENTFLOW_MAX_RETRIES": "8"}
    running = Chaos(env, tmp_path).start()
    yield running
    running.stop()


@pytest.mark.slow
@pytest.mark.timeout(ARRIVAL_SECONDS + 150)
def test_every_event_ends_delivered_once_or_dead_lettered_while_workers_keep_dying(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, redis_client: redis.Redis,
    chaos: Chaos,
) -> None:
    started = time.monotonic()
    smtp_server.stall(0.05)  # a send takes a moment, so that some kills land mid-send
    # Given workers killed every few seconds, when events keep arriving
    ids: list[str] = []
    for first in range(0, EVENTS, BATCH):
        events = [event_to(f"soak{n}@example.com") for n in range(first, min(EVENTS, first + BATCH))]
        answer = client.post("/api/v1/events/batch", json={"events": events}, headers=auth())
        assert answer.status_code == 207
        ids += [result["id"] for result in answer.json["results"]]
        time.sleep(TICK)

    # Then every one of them reaches a final status
    def unfinished() -> list[str]:
        pipe = redis_client.pipeline(transaction=False)
        for event_id in ids:
            pipe.hget(f"ef:ev:{event_id}", "status")
        return [i for i, s in zip(ids, pipe.execute()) if s not in FINAL]

    try:
        wait_for(lambda: not unfinished(), timeout=100, interval=0.5, message="every event")
    except AssertionError:
        left = unfinished()
        raise AssertionError(f"{len(left)} events never finished, e.g. "
                             f"{redis_client.hgetall(f'ef:ev:{left[0]}')}") from None
    elapsed = time.monotonic() - started
    chaos.stop()

    pipe = redis_client.pipeline(transaction=False)
    for event_id in ids:
        pipe.hgetall(f"ef:ev:{event_id}")
    records = dict(zip(ids, pipe.execute()))
    sent = Counter(message.event_id for message in smtp_server.received)
    statuses = Counter(record["status"] for record in records.values())
    ambiguous = int(redis_client.hget("ef:stats", "ambiguous") or 0)
    duplicates = sum(count - 1 for count in sent.values() if count > 1)
    reasons: Counter[str] = Counter()
    for event_id, record in records.items():
        if record["status"] == "delivered":
            assert sent[event_id] >= 1, event_id
        else:
            # Dead-lettered, with its reason (nothing is rate limited here)
            assert record["status"] == "dead_lettered", record
            letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
            assert letter["error_type"] and letter["error"]
            reasons[letter["error_type"]] += 1
    figures = {
        "events": len(ids), "seconds": round(elapsed, 1), "kills": dict(chaos.kills),
        "statuses": dict(statuses), "dead_letter_reasons": dict(reasons),
        "messages": sum(sent.values()), "duplicates": duplicates, "ambiguous_sends": ambiguous,
    }
    print("\nsoak:", json.dumps(figures))
    # And a second message went out only where a send was counted ambiguous
    assert duplicates <= ambiguous
    assert sum(sent[i] for i in ids) == statuses["delivered"] + duplicates
    assert sum(chaos.kills.values()) >= 2
