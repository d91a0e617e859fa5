"""The task that delivers one event, and the handler that dead-letters what fails."""

from __future__ import annotations

import logging
import time
import uuid
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
from eventflow.delivery import UNRECORDED, record_until
from eventflow.enqueue import DELIVER_TASK, build_task_message
from eventflow.failures import DeliveryFailed, RetryLater
from eventflow.services import Services
from eventflow.settings import Settings
from eventflow.statuses import Status

log = logging.getLogger(__name__)

#: Longest time, in seconds, the failure handler tries to write a dead letter while Redis
#: does not answer (also at most a quarter of the visibility timeout).
DEAD_LETTER_PATIENCE = 10.0


class DeliveryTask(Task):
    """The delivery task's class: runs inside the Flask app context, and retries after
    the wait the delivery step chose.

    ``autoretry_for`` would wait ``retry_backoff`` * 2**retries whole seconds (Celery
    rounds the base up to 1 s and the ceiling down to a whole second: the tests' 0.05 s
    and 0.2 s would become no wait at all). The step computes the same full-jitter
    backoff from the same settings in fractional seconds and writes it to the event's
    history before it raises :class:`RetryLater`, so the retry waits what the history
    says.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.app.flask_app.app_context():  # type: ignore[attr-defined]
            return self.run(*args, **kwargs)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        # After the failure handler (which read the run's token), whatever the outcome.
        if args:
            services: Services = self.app.flask_app.extensions["eventflow"]  # type: ignore[attr-defined]
            services.delivery.runs.pop(str(args[0]), None)

    def retry(self, args: Any = None, kwargs: Any = None, exc: Any = None, throw: bool = True,
              eta: Any = None, countdown: Any = None, max_retries: Any = None,
              **options: Any) -> Any:
        if isinstance(exc, RetryLater):
            countdown = exc.countdown
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)


def retry_policy(settings: Settings) -> dict[str, Any]:
    """The delivery task's retry options from the settings (``task_annotations``).

    ``max_retries`` goes in ``retry_kwargs``: it bounds the retries of transient
    failures, not the waits of a run that finds the event held by another.
    """
    return {
        "retry_backoff": settings.retry_backoff,
        "retry_backoff_max": settings.retry_backoff_max,
        "retry_jitter": True,
        "retry_kwargs": {"max_retries": settings.max_retries},
    }


@shared_task(
    bind=True, base=DeliveryTask, name=DELIVER_TASK, max_retries=None,
    # A transient failure with retries left is retried; its attempt is recorded first.
    autoretry_for=(RetryLater,),
    # Expected ends: one line in the log (the dead letter's, or Celery's at INFO), no
    # traceback. Anything else is a fault and keeps its traceback.
    throws=(DeliveryFailed, RetryLater),
)
def deliver(self: Task, event_id: str) -> str:
    """Deliver the event ``event_id`` (the only argument: the state is in Redis)."""
    services: Services = current_app.extensions["eventflow"]
    try:
        outcome = services.delivery.run(event_id, deadline=run_deadline(self))
    except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError) as exc:
        # Redis is the broker too: the message goes back, or stays unacknowledged and
        # comes back after the visibility timeout (a full Redis: once memory is free).
        log.warning("Redis unreachable or full while delivering %s: %s", event_id, exc)
        raise Reject(str(exc), requeue=True) from exc
    if outcome.retry_in is not None:
        # Another run holds the event: look again later. Not a retry of the budget.
        raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return outcome.status


def run_deadline(task: Task) -> float:
    """When this run must be over (``time.monotonic()``): a second before its soft time
    limit, which would otherwise interrupt the recording of an email already sent."""
    soft_limit = (task.soft_time_limit or task.app.conf.task_soft_time_limit
                  or task.app.conf.task_time_limit or 60)
    return time.monotonic() + max(float(soft_limit) - 1.0, 0.5)


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
    event_id = str(args[0])
    error_type, error = failure_reason(exception)
    # Sent outside the task's app context (and, for a time limit, in the parent process).
    services: Services = sender.app.flask_app.extensions["eventflow"]
    token = uuid.uuid4().hex  # the same for every try: a try that did write is not redone
    # The failed run's own token, when it failed in this process after taking the event
    # (not for a hard time limit or a lost worker: those are handled in the parent).
    run = services.delivery.runs.get(event_id, "")
    deadline = time.monotonic() + min(DEAD_LETTER_PATIENCE,
                                      services.settings.visibility_timeout / 4)
    pending = services.webhooks.expect(event_id, Status.DEAD_LETTERED)
    try:
        letter = record_until(deadline, event_id, "dead letter", lambda: record_dead_letter(
            services.store, event_id, error_type, error, token, run))
    except UNRECORDED:
        # The event stays unfinished and watched: the stalled-event sweep gives it a new
        # message, and that run (finding it failed for good, or its worker lost again)
        # dead-letters it without sending.
        log.error("event %s: dead letter (%s) not written, Redis unavailable; the next run "
                  "of the event writes it", event_id, error_type)
        return
    if letter is not None:
        log.warning("event %s dead-lettered: %s: %s", event_id, error_type, error)
        services.webhooks.notify_final(event_id, Status.DEAD_LETTERED, pending)
    else:
        log.info("event %s not dead-lettered (%s): it is finished, or a newer run holds it",
                 event_id, error_type)


def failure_reason(exception: BaseException | None) -> tuple[str, str]:
    """The ``error_type`` and ``error`` of a dead letter, from the task's exception."""
    if isinstance(exception, DeliveryFailed):
        return exception.error_type, exception.error
    if isinstance(exception, RetryLater):  # Celery's max_retries reached first
        return "retries_exhausted", exception.error
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
        every = float(services.settings.visibility_timeout)
        self.tref = worker.timer.call_repeatedly(every, sweep_stalled, (worker.app,))
        self.webhooks_tref = worker.timer.call_repeatedly(every, sweep_webhooks, (worker.app,))

    def stop(self, worker: Any) -> None:
        for tref in (self.tref, getattr(self, "webhooks_tref", None)):
            if tref is not None:
                tref.cancel()


def sweep_webhooks(celery_app: Any) -> int:
    """Enqueue the status webhooks a dead worker left pending; returns how many."""
    services: Services = celery_app.flask_app.extensions["eventflow"]
    try:
        # Older than a visibility timeout: every run that noted one has ended by then.
        return services.webhooks.sweep_pending(float(services.settings.visibility_timeout))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("pending-webhook sweep skipped, Redis unreachable: %s", exc)
        return 0


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
