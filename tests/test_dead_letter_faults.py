"""The dead letter is written in one step, once, and even when Redis was away at the
moment the failure handler wrote it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask

from eventflow.failures import DeliveryFailed
from tasks.delivery import record_failure
from tests.conftest import TEST_REDIS_URL, auth
from tests.cutting_proxy import CuttingProxy
from tests.faults import event_to, final_record, record, steps
from tests.processes import worker_processes
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

DB = int(TEST_REDIS_URL.rsplit("/", 1)[-1] or 0)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[CuttingProxy]:
    """A TCP proxy in front of the test Redis that can cut connections."""
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("port", 6379)
    cutting = CuttingProxy(int(port))
    yield cutting
    cutting.close()


def test_a_dead_letter_whose_reply_was_lost_is_written_once(
    make_app: Callable[..., Flask], proxy: CuttingProxy, redis_client: redis.Redis,
) -> None:
    # Given an event sent and refused for good, in an app that reaches Redis through
    # a proxy
    app = make_app(REDIS_URL=proxy.url(DB))
    event_id = app.test_client().post("/api/v1/events", json=event_to("lost@example.com"),
                                      headers=auth()).json["id"]
    task = app.extensions["celery"].tasks["eventflow.deliver"]
    # When the failure handler writes the dead letter and the reply is lost after Redis
    # ran it (the connection cut on the way back)
    proxy.cut(b"ef:dlq", mode="lose_reply", times=1)
    record_failure(sender=task, task_id="t-1", args=(event_id,),
                   exception=DeliveryFailed("permanent", "550 5.1.1 No such user"))
    # Then the handler, trying again, finds it written: one letter, counted once
    assert record(redis_client, event_id)["status"] == "dead_lettered"
    letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
    assert (letter["error_type"], letter["error"]) == ("permanent", "550 5.1.1 No such user")
    assert letter["event"] == event_to("lost@example.com")
    assert redis_client.hget("ef:stats", "dead_lettered") == "1"
    assert steps(redis_client, event_id).count("dead_lettered") == 1
    assert redis_client.llen(f"ef:audit:{event_id}") == 1
    assert redis_client.zrange("ef:dlq", 0, -1) == [event_id]


@pytest.mark.slow
def test_an_event_whose_failure_handler_could_not_reach_redis_still_ends_dead_lettered(
    environment: dict[str, str], client: object, smtp_server: ScriptedSMTPServer,
    proxy: CuttingProxy, redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker that reaches Redis through a proxy (visibility timeout 2 s), and an
    # SMTP server that refuses an address for good
    env = {**environment, "REDIS_URL": proxy.url(DB), "EVENTFLOW_VISIBILITY_TIMEOUT": "2",
           "EVENTFLOW_SMTP_TIMEOUT": "0.4", "EVENTFLOW_RETRY_BACKOFF_MAX": "0.1"}
    smtp_server.reply_always("550 5.1.1 No such user", stage="RCPT")
    # When Redis cannot be reached at the moment the dead letter is written
    proxy.cut(b"ef:dlq")
    with worker_processes(env, tmp_path, count=1, concurrency=1) as (worker,):
        event_id = client.post("/api/v1/events", json=event_to("gone@example.com"),  # type: ignore[attr-defined]
                               headers=auth()).json["id"]
        # (the handler gives up, or, if it lets its error out, Celery logs it)
        wait_for(lambda: "dead letter (permanent) not written" in worker.output()
                 or "Signal handler" in worker.output(), 15,
                 message="the failure handler to give up")
        assert record(redis_client, event_id)["status"] != "dead_lettered"
        # and Redis answers again
        proxy.disarm()
        # Then the event ends dead-lettered (a later run writes it) with its reason
        final = final_record(redis_client, event_id, timeout=20)
    assert final["status"] == "dead_lettered"
    letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
    assert (letter["error_type"], letter["attempts"]) == ("permanent", 1)
    assert letter["error"] == "550 5.1.1 No such user"
    # And the server was not asked again, and the history says what happened
    assert len(smtp_server.attempts) == 1
    history = steps(redis_client, event_id)
    assert history[:2] == ["accepted", "attempt"] and history[-1] == "dead_lettered"
    assert "worker_lost" not in history and "ambiguous_resend" not in history
    assert redis_client.hget("ef:stats", "dead_lettered") == "1"


def test_writing_the_same_dead_letter_twice_changes_nothing_the_second_time(
    app: Flask, redis_client: redis.Redis,
) -> None:
    from eventflow.deadletters import record_dead_letter

    # Given an accepted event
    store = app.extensions["eventflow"].store
    event_id = app.test_client().post("/api/v1/events", json=event_to("twice@example.com"),
                                      headers=auth()).json["id"]
    # When its dead letter is written, and the same write runs again (a retry)
    first = record_dead_letter(store, event_id, "permanent", "550 no", token="tok-1")
    again = record_dead_letter(store, event_id, "permanent", "550 no", token="tok-1")
    # Then the second run gives the same letter and changes nothing
    assert first is not None and again == first
    assert first["event"] == event_to("twice@example.com") and first["attempts"] == 0
    # And another failure of the event, already dead-lettered, is not written over it
    assert record_dead_letter(store, event_id, "internal", "boom", token="tok-2") is None
    assert redis_client.hget("ef:stats", "dead_lettered") == "1"
    assert steps(redis_client, event_id) == ["accepted", "dead_lettered"]
    assert redis_client.llen(f"ef:audit:{event_id}") == 1
