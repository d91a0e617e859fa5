"""A full Redis (``maxmemory`` reached, ``noeviction``): new events are refused with 503,
the workers keep running and finish what they hold, and everything resumes once memory is
free, with nothing lost and nothing mailed twice.

Redis fills for real: a redis-server of the test's own with a small ``maxmemory``, and a
ballast key grown past the limit (Redis checks the limit before a command, so the write
that crosses it succeeds and every later one is refused); deleting the ballast frees it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults import StallingSMTPServer, event_to, final_record, metric, web_process
from tests.processes import worker_processes
from tests.redis_server import RedisServer
from tests.smtp_server import free_port
from tests.waiting import wait_for

#: Small enough to fill in a moment, large enough for an idle Redis and a few events.
MAXMEMORY = 8 * 1024 * 1024
BALLAST_KEY = "test:ballast"


@pytest.fixture
def smtp_server() -> Iterator[StallingSMTPServer]:
    """The scripted SMTP server, able to stall at RCPT (so that sends are in flight)."""
    server = StallingSMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, configured as shipped, with a small maxmemory."""
    server = RedisServer(free_port(), tmp_path / "redis", "--maxmemory", str(MAXMEMORY)).start()
    yield server
    server.kill()


def fill(client: redis.Redis) -> None:
    """Push Redis's used memory past its maxmemory with one ballast key."""
    # In steps: the command's own bytes count too while Redis reads it.
    chunk = b"x" * (256 * 1024)
    for _ in range(2 * MAXMEMORY // len(chunk)):
        try:
            client.append(BALLAST_KEY, chunk)
        except redis.exceptions.OutOfMemoryError:
            return
    raise AssertionError("Redis did not fill up")


def event_keys(client: redis.Redis) -> set[str]:
    return set(client.scan_iter("ef:ev:*")) | set(client.scan_iter("ef:hist:*"))


@pytest.mark.slow
def test_a_full_redis_refuses_new_events_and_the_workers_finish_what_they_hold(
    environment: dict[str, str], full_redis: RedisServer, smtp_server: StallingSMTPServer,
    tmp_path: Path,
) -> None:
    client = full_redis.client()
    # A visibility timeout long enough that the task's soft time limit (0.8 of it, less
    # one second) outlasts the time Redis is full here.
    env = {**environment, "REDIS_URL": full_redis.url, "EVENTFLOW_VISIBILITY_TIMEOUT": "30"}
    addresses = [f"held{n}@example.com" for n in range(6)]
    with web_process(env, tmp_path, free_port()) as web, \
            worker_processes(env, tmp_path, concurrency=2) as (worker,):
        # Given events accepted, two of them in the middle of their SMTP transaction
        smtp_server.stall_every_rcpt(1.5)
        ids = []
        for address in addresses:
            response = web.post("/api/v1/events", event_to(address))
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        smtp_server.wait_for_rcpt(addresses[0])
        # When Redis fills up
        fill(client)
        before = event_keys(client)
        queued = client.llen("celery")

        # Then a new event is refused at once with 503 storage-full and a Retry-After,
        # and nothing of it is stored
        started = time.monotonic()
        refused = web.post("/api/v1/events", event_to("late@example.com"))
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503, refused.text
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/storage-full")
        assert int(refused.headers["Retry-After"]) > 0
        batch = web.post("/api/v1/events/batch", {"events": [event_to("late@example.com")]})
        assert batch.status_code == 503 and batch.json()["type"].endswith("/storage-full")
        assert event_keys(client) == before and client.llen("celery") == queued
        # and a producer can still read what became of its events
        read = web.get(f"/api/v1/events/{ids[-1]}")
        assert read.status_code == 200 and read.json()["id"] == ids[-1]
        # /health says why, and /metrics shows the memory used
        health = web.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["redis"].startswith("full: ")
        assert metric(web.get("/metrics").text, "eventflow_redis_used_memory_bytes") > MAXMEMORY

        # The sends in flight end while Redis is full; the worker waits to record them
        # rather than exit
        wait_for(lambda: len(smtp_server.received) >= 2, 15, message="the sends in flight")
        wait_for(lambda: f"event {ids[0]}: delivery not recorded yet" in worker.output(), 15,
                 message="the worker to wait for memory to record the first send")
        assert worker.popen.poll() is None, worker.output()[-3000:]
        worker_pid = worker.pid

        # When memory is free again
        client.delete(BALLAST_KEY)

        # Then everything resumes without a restart: every event ends delivered, each
        # with exactly one email, and new events are accepted again
        for event_id in ids:
            assert final_record(client, event_id, timeout=30)["status"] == "delivered"
        recipients = [message.rcpt_tos[0] for message in smtp_server.received]
        assert sorted(recipients) == sorted(addresses)
        assert worker.popen.poll() is None and worker.pid == worker_pid
        assert "Unrecoverable error" not in worker.output()
        smtp_server.stall_every_rcpt(0)
        assert web.post("/api/v1/events", event_to("after@example.com")).status_code == 202
        assert web.get("/health").status_code == 200


@pytest.mark.slow
def test_a_worker_started_while_redis_is_full_waits_for_memory_instead_of_exiting(
    environment: dict[str, str], full_redis: RedisServer, smtp_server: StallingSMTPServer,
    tmp_path: Path,
) -> None:
    from tests.processes import Process, worker_command

    client = full_redis.client()
    env = {**environment, "REDIS_URL": full_redis.url}
    with web_process(env, tmp_path, free_port()) as web:
        # Given an event accepted, and Redis full before any worker runs
        event_id = web.post("/api/v1/events", event_to("early@example.com")).json()["id"]
        fill(client)
        # When a worker starts (the Procfile's command)
        worker = Process(worker_command(1), env, tmp_path / "worker.log")
        try:
            wait_for(lambda: "OutOfMemoryError" in worker.output(), 30,
                     message="the worker to meet the full Redis")
            # Then it keeps running, and delivers once memory is free
            assert worker.popen.poll() is None, worker.output()[-3000:]
            client.delete(BALLAST_KEY)
            assert final_record(client, event_id, timeout=30)["status"] == "delivered"
            assert [m.rcpt_tos for m in smtp_server.received] == [["early@example.com"]]
            assert "Unrecoverable error" not in worker.output()
        finally:
            worker.stop()
