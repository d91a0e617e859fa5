"""A worker stopped while it holds only messages waiting for their retry time (ETA)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from flask import Flask

from eventflow.enqueue import build_task_message
from tests.faults import event_to, final_record
from tests.processes import worker_processes
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

#: Events whose message waits for its time in the worker.
WAITING = 24


@pytest.mark.slow
def test_sigterm_to_an_idle_worker_holding_only_retry_waits_hands_them_back_at_once(
    environment: dict[str, str], app: Flask, smtp_server: ScriptedSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker (2 pool processes, visibility timeout 30 s: a message held back
    # would come back only after it) with 4 s for the tasks in hand when told to stop
    env = {**environment, "EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT": "4"}
    services, celery_app = app.extensions["eventflow"], app.extensions["celery"]
    ids = []
    with worker_processes(env, tmp_path, count=1, concurrency=2) as (worker,):
        # holding only events that wait for their retry time, 20 s from now
        eta = datetime.now(UTC) + timedelta(seconds=20)
        for n in range(WAITING):
            event_id = str(uuid.uuid4())
            message = build_task_message(celery_app, event_id, (event_id,), eta=eta)
            services.store.accept(event_id, event_to(f"w{n}@example.com"), "producer", message)
            ids.append(event_id)
        wait_for(lambda: redis_client.llen("celery") == 0
                 and redis_client.hlen("unacked") == WAITING, 10,
                 message="the worker to hold every waiting message")
        # When the dyno restarts: SIGTERM to every process of the worker
        stopping = time.monotonic()
        os.killpg(worker.pid, signal.SIGTERM)
        worker.popen.wait(timeout=30)
        stopped_in = time.monotonic() - stopping
        # Then it exits within its shutdown timeout, every message back in the queue
        assert stopped_in < 4 + 3, stopped_in
        assert redis_client.hlen("unacked") == 0, worker.output()[-2000:]
        assert redis_client.llen("celery") == WAITING
    # And another worker delivers each of them once, at their time, not a visibility
    # timeout later
    with worker_processes(env, tmp_path, count=1, concurrency=2):
        finals = [final_record(redis_client, event_id, timeout=30) for event_id in ids]
        assert datetime.now(UTC) < eta + timedelta(seconds=8)
    assert [f["status"] for f in finals] == ["delivered"] * WAITING
    assert [len(smtp_server.messages_for(event_id)) for event_id in ids] == [1] * WAITING
