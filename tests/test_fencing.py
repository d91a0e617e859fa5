"""Every write of a worker run is fenced with its lease token: a run that lost the event to
a newer run (its lease ran out while it was cut off, say) changes nothing but the history.

The multi-host proof is in ``tests/test_hosts.py`` (root only); these run anywhere, on a
real Redis, with a sender that plays the newer run in the middle of the first one's send.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from email.message import EmailMessage

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from flask import Flask

from eventflow.delivery import Delivery
from eventflow.enqueue import DELIVER_TASK
from tasks.delivery import record_failure
from tests.test_delivery import RecordingSender, accepted, start_a_run, with_sender


class OvertakenSender:
    """A send during which the run's lease runs out and a newer run delivers the event;
    then it answers ``reply`` (or raises ``failure``)."""

    def __init__(self, newer_run: Callable[[], object], reply: str = "250 2.0.0 OK",
                 failure: BaseException | None = None) -> None:
        self.newer_run = newer_run
        self.reply = reply
        self.failure = failure

    def send(self, mail_from: str, recipient: str, message: EmailMessage) -> str:
        self.newer_run()
        if self.failure is not None:
            raise self.failure
        return self.reply


def overtaken(app: Flask, redis_client: redis.Redis, **outcome: object) -> Delivery:
    delivery = accepted(app)
    newer = with_sender(delivery, RecordingSender())

    def lease_runs_out_and_a_newer_run_delivers() -> None:
        redis_client.delete("ef:lease:ev-1")
        assert newer.run("ev-1").status == "delivered"

    return with_sender(delivery, OvertakenSender(lease_runs_out_and_a_newer_run_delivers,
                                                 **outcome))  # type: ignore[arg-type]


def history(redis_client: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(item) for item in redis_client.lrange("ef:hist:ev-1", 0, -1)]


def test_a_late_250_of_an_overtaken_run_is_noted_as_superseded_and_counted_once(
    app: Flask, redis_client: redis.Redis,
) -> None:
    # Given a run whose send is answered 250 after a newer run delivered the event
    delivery = overtaken(app, redis_client)
    # When it records its outcome
    outcome = delivery.run("ev-1")
    # Then the write is refused: the newer run's delivery stands, counted once
    assert outcome.status == "superseded" and outcome.retry_in is None
    record = redis_client.hgetall("ef:ev:ev-1")
    assert record["status"] == "delivered" and record["attempts"] == "2"
    assert redis_client.hget("ef:stats", "delivered") == "1"
    # And the history tells both runs' outcomes, in the order they came
    entries = history(redis_client)
    assert [e["step"] for e in entries] == [
        "accepted", "worker_lost", "ambiguous_resend", "attempt", "delivered", "superseded"]
    assert entries[-1]["attempt"] == 1 and entries[-1]["outcome"] == "delivered"


def test_a_late_failure_of_an_overtaken_run_neither_reopens_nor_retries_the_event(
    app: Flask, redis_client: redis.Redis,
) -> None:
    # Given a run whose send fails (transient) after a newer run delivered the event
    delivery = overtaken(app, redis_client,
                         failure=smtplib.SMTPServerDisconnected("Connection unexpectedly closed"))
    # When it records its failed attempt
    outcome = delivery.run("ev-1")
    # Then the event stays delivered, with no retry and no dead letter
    assert outcome.status == "superseded" and outcome.retry_in is None
    record = redis_client.hgetall("ef:ev:ev-1")
    assert record["status"] == "delivered" and "last_error" not in record
    assert redis_client.hget("ef:stats", "retried") is None
    entries = history(redis_client)
    assert entries[-1]["step"] == "superseded" and entries[-1]["outcome"] == "transient"


def test_a_slow_run_whose_lease_ran_out_with_no_newer_run_still_records_its_delivery(
    app: Flask, redis_client: redis.Redis,
) -> None:
    # Given a run whose lease runs out during its send, and no other run takes the event
    delivery = with_sender(accepted(app), OvertakenSender(
        lambda: redis_client.delete("ef:lease:ev-1")))
    # When its send is answered 250
    outcome = delivery.run("ev-1")
    # Then the event is the run's still: delivered
    assert outcome.status == "delivered"
    assert redis_client.hget("ef:ev:ev-1", "status") == "delivered"
    assert [e["step"] for e in history(redis_client)] == ["accepted", "attempt", "delivered"]


@pytest.mark.parametrize("failed_run", ["stale-run", "newer-run"])
def test_the_dead_letter_of_a_run_that_failed_after_a_newer_run_took_the_event_is_fenced(
    app: Flask, redis_client: redis.Redis, failed_run: str,
) -> None:
    # Given a run whose lease ran out, and a newer run that took the event (sending now)
    delivery = accepted(app)
    start_a_run(delivery, "stale-run", lease_ms=60_000)
    redis_client.delete("ef:lease:ev-1")
    start_a_run(delivery, "newer-run", lease_ms=60_000)
    # When the task of one of them fails in the worker (its soft time limit, say) and the
    # task_failure handler writes the dead letter
    delivery.runs["ev-1"] = failed_run
    record_failure(sender=app.extensions["celery"].tasks[DELIVER_TASK], task_id="task-1",
                   exception=SoftTimeLimitExceeded("soft time limit (5s) exceeded"),
                   args=("ev-1",))
    record = redis_client.hgetall("ef:ev:ev-1")
    last = history(redis_client)[-1]
    if failed_run == "stale-run":
        # Then the stale run's failure changes nothing but the history
        assert record["status"] == "sending" and record["run"] == "newer-run"
        assert redis_client.zcard("ef:dlq") == 0
        assert last["step"] == "superseded" and last["outcome"] == "dead_lettered"
        assert last["error_type"] == "time_limit"
    else:
        # And the run holding the event is dead-lettered as before
        assert record["status"] == "dead_lettered"
        assert redis_client.zscore("ef:dlq", "ev-1") is not None
        assert last["step"] == "dead_lettered"
