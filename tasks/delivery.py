"""The task that delivers one event, and the handler that dead-letters what fails."""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task, bootsteps, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure
from flask import current_app
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventflow.deadletters import record_dead_letter
from eventflow.enqueue import DELIVER_TASK, build_task_message
from eventflow.failures import DeliveryFailed
from eventflow.services import Services

log = logging.getLogger(__name__)


@shared_task(bind=True, name=DELIVER_TASK, max_retries=None)
def deliver(self: Task, event_id: str) -> str:
    """Deliver the event ``event_id`` (the only argument: the state is in Redis)."""
    services: Services = current_app.extensions["eventflow"]
    try:
        outcome = services.delivery.run(event_id)
    except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError) as exc:
        # Redis is the broker too: the message goes back, or stays unacknowledged and
        # comes back after the visibility timeout (a full Redis: once memory is free).
        log.warning("Redis unreachable or full while delivering %s: %s", event_id, exc)
        raise Reject(str(exc), requeue=True) from exc
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return outcome.status


@task_failure.connect
def record_failure(
    sender: Task | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: tuple[Any, ...] = (),
    **kwargs: Any,
) -> None:
    """Every failure of the delivery task ends as a dead letter with its reason."""
    if sender is None or sender.name != DELIVER_TASK or not args:
        return
    error_type, error = failure_reason(exception)
    # Sent outside the task's app context (and, for a time limit, in the parent process).
    services: Services = sender.app.flask_app.extensions["eventflow"]
    letter = record_dead_letter(services.store, str(args[0]), error_type, error)
    if letter is not None:
        log.warning("event %s dead-lettered: %s: %s", args[0], error_type, error)


def failure_reason(exception: BaseException | None) -> tuple[str, str]:
    """The ``error_type`` and ``error`` of a dead letter, from the task's exception."""
    if isinstance(exception, DeliveryFailed):
        return exception.error_type, exception.error
    if isinstance(exception, (TimeLimitExceeded, SoftTimeLimitExceeded)):
        return "time_limit", f"the delivery took longer than its time limit ({exception})"
    if isinstance(exception, WorkerLostError):
        return "worker_lost", str(exception)
    return "internal", f"{type(exception).__name__}: {exception}"


#: Above this queue depth, an event not taken for a while is explained by the backlog.
SWEEP_MAX_QUEUE = 1000


class StalledEventSweep(bootsteps.StartStopStep):
    """Every visibility timeout, give a new message to events whose message was lost.

    kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged:
    a worker SIGKILLed in between loses it, and its event would stay ``queued`` for ever.
    An unfinished event that no run has taken for three visibility timeouts, and that no
    run holds, gets a new message (a duplicate is harmless: the claim and the ledger make
    a second run do nothing). Runs in the worker's main process, on its timer.
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        services: Services = worker.app.flask_app.extensions["eventflow"]
        self.tref = worker.timer.call_repeatedly(
            float(services.settings.visibility_timeout), sweep_stalled, (worker.app,)
        )

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()


def sweep_stalled(celery_app: Any) -> int:
    """Requeue the events whose task message was lost; returns how many."""
    services: Services = celery_app.flask_app.extensions["eventflow"]
    older_than = 3.0 * services.settings.visibility_timeout
    queue = celery_app.conf.task_default_queue
    requeued = 0
    try:
        if services.redis.llen(queue) > SWEEP_MAX_QUEUE:
            return 0
        for event_id in services.store.stalled(older_than):
            message = build_task_message(celery_app, event_id, (event_id,))
            if services.store.requeue_stalled(event_id, older_than, message) == "requeued":
                log.warning("event %s had no task message for %gs: requeued", event_id,
                            older_than)
                requeued += 1
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("stalled-event sweep skipped, Redis unreachable: %s", exc)
    return requeued
