"""The delivery logic on a real Redis, with a recording sender at the SMTP boundary."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from typing import Any

import pytest
from flask import Flask

from eventflow.delivery import Delivery, full_jitter_backoff
from eventflow.enqueue import build_task_message
from eventflow.failures import DeliveryFailed, RetryLater
from tests.conftest import EXAMPLE_EVENT


class RecordingSender:
    """Records each message; raises the scripted exceptions first."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.sent: list[tuple[str, EmailMessage]] = []

    def send(self, mail_from: str, recipient: str, message: EmailMessage) -> str:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((recipient, message))
        return "250 2.0.0 OK"


def accepted(app: Flask, event_id: str = "ev-1") -> Delivery:
    services = app.extensions["eventflow"]
    message = build_task_message(app.extensions["celery"], event_id, (event_id,))
    services.store.accept(event_id, EXAMPLE_EVENT, "producer", message)
    return services.delivery  # type: ignore[no-any-return]


def start_a_run(delivery: Delivery, token: str, lease_ms: int) -> None:
    """A run's start as a worker makes it (claim, quota, ledger), and nothing after."""
    delivery.store.take("ev-1", token, lease_ms, quota_limit=20, quota_seconds=86400,
                        max_losses=100)


def with_sender(delivery: Delivery, sender: RecordingSender) -> Delivery:
    return Delivery(delivery.store, sender, delivery.settings)


def test_a_delivered_event_is_not_sent_again_when_its_task_comes_back(app: Flask) -> None:
    sender = RecordingSender()
    delivery = with_sender(accepted(app), sender)
    assert delivery.run("ev-1").status == "delivered"
    assert delivery.run("ev-1").status == "delivered"
    assert len(sender.sent) == 1


def test_a_send_started_but_never_recorded_is_sent_again_and_counted_ambiguous(
    app: Flask,
) -> None:
    # Given a run that died after starting its send (claimed, ledger says "started")
    delivery = accepted(app)
    store = delivery.store
    start_a_run(delivery, "dead-run", 1)
    store.redis.delete("ef:lease:ev-1")
    # When the task comes back
    sender = RecordingSender()
    assert with_sender(delivery, sender).run("ev-1").status == "delivered"
    # Then it sends once more, and says it may have been twice
    assert len(sender.sent) == 1
    assert store.counters()["ambiguous"] == 1
    steps = [entry["step"] for entry in store.history("ev-1")]
    assert "worker_lost" in steps and "ambiguous_resend" in steps


def test_a_run_that_finds_another_holding_the_event_waits_without_sending(app: Flask) -> None:
    delivery = accepted(app)
    start_a_run(delivery, "other-run", 60_000)
    sender = RecordingSender()
    outcome = with_sender(delivery, sender).run("ev-1")
    assert outcome.status == "busy" and outcome.retry_in and outcome.retry_in > 0
    assert sender.sent == []


def test_an_event_whose_worker_keeps_dying_is_dead_lettered_as_worker_lost(app: Flask) -> None:
    delivery = accepted(app)
    for n in range(3):
        start_a_run(delivery, f"run-{n}", 1)
        delivery.store.redis.delete("ef:lease:ev-1")
    with pytest.raises(DeliveryFailed) as failed:
        with_sender(delivery, RecordingSender()).run("ev-1")
    assert failed.value.error_type == "worker_lost"


def test_a_transient_failure_asks_for_a_retry_within_the_backoff(app: Flask) -> None:
    sender = RecordingSender(smtplib.SMTPDataError(451, b"later"))
    delivery = with_sender(accepted(app), sender)
    with pytest.raises(RetryLater) as retry:
        delivery.run("ev-1")
    assert delivery.store.get("ev-1")["status"] == "retrying"  # type: ignore[index]
    assert 0 <= retry.value.countdown <= 0.05


def test_full_jitter_stays_within_the_exponential_bound_and_the_ceiling() -> None:
    waits = [full_jitter_backoff(4, base=2, ceiling=600) for _ in range(200)]
    assert all(0 <= w <= 32 for w in waits) and max(waits) > 16
    assert all(0 <= full_jitter_backoff(20, base=2, ceiling=10) <= 10 for _ in range(50))


def test_the_task_retries_transient_failures_with_celerys_autoretry_set_from_the_settings(
    make_app: Any,
) -> None:
    app = make_app(EVENTFLOW_MAX_RETRIES="7", EVENTFLOW_RETRY_BACKOFF="3",
                   EVENTFLOW_RETRY_BACKOFF_MAX="20")
    task = app.extensions["celery"].tasks["eventflow.deliver"]
    assert task.autoretry_for == (RetryLater,)
    assert (task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (3.0, 20.0, True)
    assert task.retry_kwargs == {"max_retries": 7}
    # Expected ends are logged without a traceback
    assert set(task.throws) == {DeliveryFailed, RetryLater}
