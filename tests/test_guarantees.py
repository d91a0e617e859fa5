"""Delivery guarantees under real faults: nothing accepted is lost, nothing is mailed twice.

Each test injects its fault for real (SIGKILL or SIGTERM of real worker processes, a
redis-server of the test's own killed and restarted on its data directory, an SMTP server
that stalls, refuses or answers 421) and asserts on what a user sees: the event's final
status and how many messages the SMTP server accepted for it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery.signals import task_postrun
from flask.testing import FlaskClient

from eventflow.enqueue import build_task_message
from tests.conftest import EXAMPLE_EVENT, auth
from tests.faults import (
    FAST_RECOVERY,
    StallingSMTPServer,
    event_to,
    final_record,
    metric,
    record,
    steps,
    web_process,
)
from tests.processes import Process, worker_processes
from tests.redis_server import RedisServer
from tests.smtp_server import free_port
from tests.waiting import wait_for


@pytest.fixture
def smtp_server() -> Iterator[StallingSMTPServer]:
    """The scripted SMTP server, able to stall at RCPT too (before anything is sent)."""
    server = StallingSMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(environment: dict[str, str]) -> dict[str, str]:
    """The process environment with a visibility timeout of a few seconds."""
    return {**environment, **FAST_RECOVERY}


def pool_child(worker: Process) -> int:
    """The pid of a concurrency-1 worker's only pool process."""
    return int(wait_for(lambda: worker.children(), 10, message="a pool process")[0])


# -- 1. Idempotency keys ---------------------------------------------------------------


def test_twenty_concurrent_posts_with_one_idempotency_key_create_one_event_and_one_email(
    fault_env: dict[str, str], smtp_server: StallingSMTPServer, redis_client: redis.Redis,
    worker: Any, tmp_path: Path,
) -> None:
    # Given the real web process (granian: 2 processes x 4 threads) and a worker
    with web_process(fault_env, tmp_path, free_port()) as web:
        event = event_to("idem@example.com")
        start = threading.Barrier(20)

        def post(_: int) -> Any:
            start.wait()
            return web.post("/api/v1/events", event, **{"Idempotency-Key": "order-42"})

        # When 20 requests with the same key arrive at once
        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(post, range(20)))

        # Then all are answered 202 with the same id (the accept script checks and writes
        # the key atomically with the event: there is no in-flight window to answer 409)
        assert [r.status_code for r in responses] == [202] * 20
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        (event_id,) = ids
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 19
        assert {r.headers["Location"] for r in responses} == {f"/api/v1/events/{event_id}"}
        # And one event was stored, and one email sent
        assert redis_client.keys("ef:ev:*") == [f"ef:ev:{event_id}"]
        assert final_record(redis_client, event_id)["status"] == "delivered"

        # When the same request comes again after delivery
        again = web.post("/api/v1/events", event, **{"Idempotency-Key": "order-42"})
        # Then it gets the first answer again, and nothing more is queued or sent
        assert again.status_code == 202
        assert (again.json()["id"], again.json()["status"]) == (event_id, "queued")
        assert redis_client.llen("celery") == 0
        assert redis_client.hget("ef:stats", "accepted") == "1"
        # And the same key with another body is refused
        other = web.post("/api/v1/events", event_to("else@example.com"),
                         **{"Idempotency-Key": "order-42"})
        assert other.status_code == 422
        assert other.headers["Content-Type"] == "application/problem+json"
        # And another producer's identical key is its own
        from tests.conftest import OTHER_PRODUCER_KEY

        theirs = web.post("/api/v1/events", event, key=OTHER_PRODUCER_KEY,
                          **{"Idempotency-Key": "order-42"})
        assert theirs.status_code == 202 and theirs.json()["id"] != event_id

        # When ten identical batches with one key arrive at once
        batch = {"events": [event_to(f"b{n}@example.com") for n in range(3)]}
        start_batch = threading.Barrier(10)

        def post_batch(_: int) -> Any:
            start_batch.wait()
            return web.post("/api/v1/events/batch", batch, **{"Idempotency-Key": "batch-7"})

        with ThreadPoolExecutor(10) as pool:
            batches = list(pool.map(post_batch, range(10)))
        # Then each is answered with the first result or 409 (still in flight), never a copy
        codes = sorted(r.status_code for r in batches)
        assert set(codes) <= {207, 409} and 207 in codes
        assert len({r.text for r in batches if r.status_code == 207}) == 1
        assert all(r.headers.get("Retry-After") for r in batches if r.status_code == 409)
        assert len(redis_client.keys("ef:ev:*")) == 2 + 3

    wait_for(lambda: len(smtp_server.received) == 5, 20, message="the 5 emails")
    assert len(smtp_server.messages_for(event_id)) == 1


# -- 2. The send ledger ----------------------------------------------------------------


def test_a_redelivered_task_for_a_delivered_event_sends_nothing(
    app: Any, client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, worker: Any,
) -> None:
    finished: list[tuple[str, Any]] = []

    def on_postrun(task_id: str = "", retval: Any = None, **_: Any) -> None:
        finished.append((task_id, retval))

    task_postrun.connect(on_postrun, weak=False)
    try:
        # Given a delivered event
        event_id = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
        assert final_record(redis_client, event_id)["status"] == "delivered"
        before = redis_client.lrange(f"ef:hist:{event_id}", 0, -1)
        # When its task message is delivered again (as kombu restores an unacked message)
        message = build_task_message(app.extensions["celery"], event_id, (event_id,))
        redis_client.lpush(message.queue, message.payload)
        # Then the second run finds the event delivered and does nothing
        wait_for(lambda: len([f for f in finished if f[0] == event_id]) == 2, 15,
                 message="the redelivered run")
        assert finished[-1] == (event_id, "delivered")
    finally:
        task_postrun.disconnect(on_postrun)
    assert len(smtp_server.messages_for(event_id)) == 1
    assert redis_client.lrange(f"ef:hist:{event_id}", 0, -1) == before
    assert record(redis_client, event_id)["attempts"] == "1"


def test_a_worker_killed_after_the_message_was_sent_sends_it_again_and_counts_it_ambiguous(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker, and a server that takes the next message but answers 3 s late
    smtp_server.reply_delay = 3
    with worker_processes(fault_env, tmp_path, count=1, concurrency=1) as (worker,):
        event_id = client.post("/api/v1/events", json=event_to("amb@example.com"),
                               headers=auth()).json["id"]
        # When the pool process is SIGKILLed after the whole message went out, before
        # the reply: the window SMTP leaves open
        wait_for(lambda: smtp_server.received, 15, message="the message to be taken")
        os.kill(pool_child(worker), signal.SIGKILL)
        # Then the event is delivered by a new run after the lease runs out
        final = final_record(redis_client, event_id, timeout=30)
    assert final["status"] == "delivered"
    # And that run, finding a send started but never confirmed, sent again and counted it
    assert "ambiguous_resend" in steps(redis_client, event_id)
    assert metric(client.get("/metrics").text, "eventflow_ambiguous_sends_total") == 1
    # The server saw the message twice: this is the one duplicate SMTP allows
    assert len(smtp_server.messages_for(event_id)) == 2


# -- 3. Worker death -------------------------------------------------------------------


def test_a_whole_worker_sigkilled_mid_send_leaves_the_event_to_another_worker_which_sends_it_once(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given two workers, and a server that holds the first RCPT for 30 s
    smtp_server.stall_next_rcpt(30)
    with worker_processes(fault_env, tmp_path, count=2, concurrency=1) as workers:
        event_id = client.post("/api/v1/events", json=event_to("kill@example.com"),
                               headers=auth()).json["id"]
        smtp_server.wait_for_rcpt("kill@example.com")
        # When the worker in the middle of the send is SIGKILLed with its pool
        victim = next(w for w in workers if event_id in w.output())
        survivor = next(w for w in workers if w is not victim)
        victim.kill_group()
        killed_at = time.monotonic()
        # Then the other worker gets the message back after the visibility timeout
        final = final_record(redis_client, event_id, timeout=30)
        took = time.monotonic() - killed_at
        assert event_id in survivor.output()
    assert final["status"] == "delivered"
    # And the email went out exactly once
    assert len(smtp_server.messages_for(event_id)) == 1
    assert smtp_server.rcpt_seen.count("kill@example.com") == 2
    assert "worker_lost" in steps(redis_client, event_id)
    visibility = float(FAST_RECOVERY["EVENTFLOW_VISIBILITY_TIMEOUT"])
    assert visibility * 0.5 < took < visibility + 10, took
    assert redis_client.hlen("unacked") == 0


def test_an_event_whose_worker_dies_every_time_is_dead_lettered_as_worker_lost(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker, and an event whose every send stalls at RCPT
    smtp_server.stall_every_rcpt(30)
    with worker_processes(fault_env, tmp_path, count=1, concurrency=1) as (worker,):
        event_id = client.post("/api/v1/events", json=event_to("poison@example.com"),
                               headers=auth()).json["id"]
        # When its pool process is SIGKILLed at each attempt (EVENTFLOW_MAX_WORKER_LOSSES=3)
        for attempt in range(1, 4):
            smtp_server.wait_for_rcpt("poison@example.com", count=attempt, timeout=20)
            os.kill(pool_child(worker), signal.SIGKILL)
        # Then the event is dead-lettered with the reason, without a fourth send
        final = final_record(redis_client, event_id, timeout=20)
    assert final["status"] == "dead_lettered"
    assert smtp_server.rcpt_seen.count("poison@example.com") == 3
    assert smtp_server.messages_for(event_id) == []
    letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
    assert letter["error_type"] == "worker_lost"
    assert "3 times" in letter["error"]
    assert redis_client.llen("celery") == 0


# -- 4. Warm shutdown ------------------------------------------------------------------


def test_sigterm_to_the_worker_finishes_the_task_in_hand_and_hands_back_the_rest(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker (visibility timeout 30 s, so that anything stuck would show)
    # and 4 s for the tasks in hand to finish when told to stop
    env = {**fault_env, "EVENTFLOW_VISIBILITY_TIMEOUT": "30", "EVENTFLOW_RETRY_BACKOFF": "8",
           "EVENTFLOW_RETRY_BACKOFF_MAX": "8", "EVENTFLOW_SMTP_TIMEOUT": "5",
           "EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT": "4"}

    def post(address: str) -> str:
        return str(client.post("/api/v1/events", json=event_to(address), headers=auth())
                   .json["id"])

    with worker_processes(env, tmp_path, count=1, concurrency=1) as (worker,):
        # with one event waiting for a retry (the server said 451),
        smtp_server.reply_next("451 4.3.0 Try later")
        waiting = post("retry@example.com")
        wait_for(lambda: smtp_server.attempts, 10, message="the 451")
        # one in hand (its send takes 2 s) and two more in the queue
        smtp_server.stall_next_rcpt(2)
        in_hand = post("hand@example.com")
        smtp_server.wait_for_rcpt("hand@example.com")
        queued = [post("q1@example.com"), post("q2@example.com")]
        # When the dyno restarts: SIGTERM to every process of the worker
        os.killpg(worker.pid, signal.SIGTERM)
        worker.popen.wait(timeout=20)
        stopped_at = time.monotonic()
        # Then it exits by itself, having finished the send in hand
        assert record(redis_client, in_hand)["status"] == "delivered", worker.output()[-3000:]
        # And nothing is left unacknowledged: the rest is back in the queue
        assert redis_client.hlen("unacked") == 0
        assert "Restoring" in worker.output() or redis_client.llen("celery") >= 2
    # And a new worker delivers everything well before the visibility timeout
    ids = [waiting, in_hand, *queued]
    with worker_processes(env, tmp_path, count=1, concurrency=1):
        finals = [final_record(redis_client, event_id, timeout=25) for event_id in ids]
        took = time.monotonic() - stopped_at
    assert [f["status"] for f in finals] == ["delivered"] * 4
    assert [len(smtp_server.messages_for(event_id)) for event_id in ids] == [1] * 4
    assert took < 8 + 10, took


# -- 5. Redis outage and crash ---------------------------------------------------------


def test_a_redis_crash_loses_no_accepted_event_and_everything_recovers_by_itself(
    fault_env: dict[str, str], smtp_server: StallingSMTPServer, tmp_path: Path,
) -> None:
    # Given a Redis of our own with the shipped durability settings (append-only file,
    # fsync every second), the web process and a worker using it
    server = RedisServer(free_port(), tmp_path / "redis").start()
    env = {**fault_env, "REDIS_URL": server.url, "EVENTFLOW_SMTP_TIMEOUT": "0.9"}
    store = server.client()
    try:
        with web_process(env, tmp_path, free_port()) as web, \
                worker_processes(env, tmp_path, count=1, concurrency=1):
            # and the worker held up in a send (RCPT stalls 8 s), so that events queue up
            smtp_server.stall_next_rcpt(8)
            ids = [web.post("/api/v1/events", event_to("first@example.com")).json()["id"]]
            smtp_server.wait_for_rcpt("first@example.com")
            for n in range(20):
                answer = web.post("/api/v1/events", event_to(f"r{n}@example.com"))
                assert answer.status_code == 202
                ids.append(answer.json()["id"])
            # When Redis is SIGKILLed more than a second after the last 202
            time.sleep(1.2)
            server.kill()
            # Then the API answers 503 at once, never hangs, and /health says why
            started = time.monotonic()
            down = web.post("/api/v1/events", event_to("down@example.com"), timeout=10)
            assert down.status_code == 503
            assert down.headers["Content-Type"] == "application/problem+json"
            assert time.monotonic() - started < 4
            health = requests.get(web.base + "/health", timeout=10)
            assert health.status_code == 503
            assert health.json()["checks"]["redis"].startswith("error")
            # When Redis comes back on its data
            server.start()
            # Then the web process answers again by itself
            wait_for(lambda: requests.get(web.base + "/health", timeout=5).status_code == 200,
                     10, message="/health to recover")
            after = web.post("/api/v1/events", event_to("after@example.com"))
            assert after.status_code == 202
            ids.append(after.json()["id"])
            # And every event accepted before the crash is still there, and the worker
            # (reconnecting by itself) delivers each of them exactly once
            finals = [final_record(store, event_id, timeout=60) for event_id in ids]
        assert [f["status"] for f in finals] == ["delivered"] * len(ids)
        assert [len(smtp_server.messages_for(event_id)) for event_id in ids] == [1] * len(ids)
        # "down@example.com" was answered 503 and never stored
        assert all(m.rcpt_tos != ["down@example.com"] for m in smtp_server.received)
    finally:
        store.close()
        server.kill()


# -- 6. SMTP outage --------------------------------------------------------------------


def test_an_smtp_outage_ends_with_every_event_delivered_once_or_dead_lettered_with_its_reason(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given two workers with 10 retries (0.1 s backoff base, 1 s ceiling)
    env = {**fault_env, "EVENTFLOW_MAX_RETRIES": "10", "EVENTFLOW_RETRY_BACKOFF": "0.1",
           "EVENTFLOW_RETRY_BACKOFF_MAX": "1"}
    with worker_processes(env, tmp_path, count=2, concurrency=2):
        # When the server answers 421 to everything, then refuses connections
        smtp_server.reply_always("421 4.3.2 Service shutting down", stage="RCPT")
        ids = [client.post("/api/v1/events", json=event_to(f"o{n}@example.com"),
                           headers=auth()).json["id"] for n in range(12)]
        wait_for(lambda: len(smtp_server.attempts) >= 12, 15, message="12 refused attempts")
        smtp_server.stop()
        time.sleep(1.0)
        # and comes back
        smtp_server.reply_always(None, stage="RCPT")
        smtp_server.start()
        finals = {event_id: final_record(redis_client, event_id, timeout=40) for event_id in ids}
    # Then every event is delivered once, or dead-lettered with the reason
    delivered = [i for i, f in finals.items() if f["status"] == "delivered"]
    for event_id, final in finals.items():
        sent = len(smtp_server.messages_for(event_id))
        if final["status"] == "delivered":
            assert sent == 1
        else:
            assert final["status"] == "dead_lettered" and sent == 0
            letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
            assert letter["error_type"] == "retries_exhausted"
            assert letter["attempts"] == 11
            assert "421" in letter["error"] or "refused" in letter["error"]
    # And the retries carried most of them across the outage
    assert len(delivered) >= 6
    assert all(int(finals[i]["attempts"]) >= 2 for i in delivered)
    assert redis_client.llen("celery") == 0


def test_an_smtp_server_down_for_longer_than_the_retries_dead_letters_with_the_reply(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, worker: Any,
) -> None:
    # Given a server that answers 421 for good (and EVENTFLOW_MAX_RETRIES=5)
    smtp_server.reply_always("421 4.3.2 Service shutting down", stage="RCPT")
    event_id = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
    # Then the event is dead-lettered with the reply, after 6 attempts, nothing sent
    final = final_record(redis_client, event_id)
    assert final["status"] == "dead_lettered"
    letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
    assert (letter["error_type"], letter["attempts"]) == ("retries_exhausted", 6)
    assert letter["error"].startswith("421")
    assert smtp_server.received == []


# -- 7. The configuration doctor -------------------------------------------------------


def test_the_doctor_refuses_an_evicting_redis_and_warns_about_one_that_does_not_persist(
    environment: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from eventflow import create_app
    from eventflow.settings import ConfigError, Settings

    # Given a Redis that evicts keys when full
    evicting = RedisServer(free_port(), tmp_path / "evicting", "--maxmemory", "64mb",
                           "--maxmemory-policy", "allkeys-lru").start()
    # and one that keeps nothing on disk
    volatile = RedisServer(free_port(), tmp_path / "volatile", "--appendonly", "no").start()
    try:
        # Then a web or worker process refuses to start on the first, saying why
        with pytest.raises(ConfigError, match="allkeys-lru"):
            create_app(Settings.from_env({**environment, "REDIS_URL": evicting.url}))
        refused = Process(
            "celery -A wsgi:celery_app worker --pool=solo",
            {**environment, "REDIS_URL": evicting.url}, tmp_path / "refused.log")
        assert refused.popen.wait(timeout=30) != 0
        assert "maxmemory-policy allkeys-lru" in refused.output()
        # And starts on the second with a warning, or refuses if told to be strict
        caplog.set_level("WARNING", logger="eventflow.doctor")
        create_app(Settings.from_env({**environment, "REDIS_URL": volatile.url}))
        assert "no persistence" in caplog.text
        with pytest.raises(ConfigError, match="no persistence"):
            create_app(Settings.from_env({**environment, "REDIS_URL": volatile.url,
                                          "EVENTFLOW_STRICT_REDIS": "true"}))
    finally:
        evicting.kill()
        volatile.kill()


def test_the_web_process_starts_at_once_while_redis_is_down_and_answers_503(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    # Given no Redis at REDIS_URL
    server = RedisServer(free_port(), tmp_path / "late")
    env = {**environment, "REDIS_URL": server.url}
    started = time.monotonic()
    # When the web process starts, it answers within seconds: 503, not a crash
    with web_process(env, tmp_path, free_port()) as web:
        assert time.monotonic() - started < 15
        assert requests.get(web.base + "/health", timeout=5).status_code == 503
        assert web.post("/api/v1/events", EXAMPLE_EVENT).status_code == 503
        # And once Redis is there, it works without a restart
        server.start()
        try:
            assert web.post("/api/v1/events", EXAMPLE_EVENT).status_code == 202
        finally:
            server.kill()
    assert "was not checked" in web.process.output()


def test_an_event_whose_message_was_popped_by_a_worker_killed_at_once_is_requeued_and_sent_once(
    fault_env: dict[str, str], client: FlaskClient, smtp_server: StallingSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given an accepted event whose message was taken off the queue by a worker that died
    # before recording it (kombu pops first, records second): here, popped by the test
    event_id = client.post("/api/v1/events", json=event_to("popped@example.com"),
                           headers=auth()).json["id"]
    assert redis_client.rpop("celery")
    # When a worker runs (visibility timeout 2 s: the sweep acts after 6 s)
    env = {**fault_env, "EVENTFLOW_VISIBILITY_TIMEOUT": "2", "EVENTFLOW_SMTP_TIMEOUT": "0.4",
           "EVENTFLOW_RETRY_BACKOFF_MAX": "0.1"}
    with worker_processes(env, tmp_path, count=1, concurrency=1):
        final = final_record(redis_client, event_id, timeout=20)
    # Then the event got a new message and was delivered, once
    assert final["status"] == "delivered"
    assert "requeued" in steps(redis_client, event_id)
    assert len(smtp_server.messages_for(event_id)) == 1
