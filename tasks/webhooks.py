"""The task that sends one status webhook, and tries it again while the receiver fails."""

from __future__ import annotations

import logging

from celery import Task, shared_task
from celery.exceptions import Reject
from flask import current_app
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventflow.delivery import full_jitter_backoff
from eventflow.services import Services
from eventflow.webhooks import WEBHOOK_TASK

log = logging.getLogger(__name__)


@shared_task(bind=True, name=WEBHOOK_TASK, max_retries=None)
def send_webhook(self: Task, event_id: str, status: str, at: str, tries: int = 0) -> str:
    """POST the webhook of ``event_id`` reaching ``status`` (at ``at``) to its producer.

    A 5xx, 429 or network error is tried again after a full-jitter backoff, with the
    email's retry settings (``EVENTFLOW_MAX_RETRIES``, ``EVENTFLOW_RETRY_BACKOFF``,
    ``EVENTFLOW_RETRY_BACKOFF_MAX``, which keep every wait below the visibility timeout);
    another answer, or the last failure, ends it with a ``webhook_failed`` entry marked
    ``final`` in the event's history. ``tries``: the attempts made so far (a wait for a
    hanging receiver, with no POST, is not one).
    """
    services: Services = current_app.extensions["eventflow"]
    settings = services.settings
    retry_in = (full_jitter_backoff(tries, settings.retry_backoff, settings.retry_backoff_max)
                if tries < settings.max_retries else None)
    try:
        result = services.webhooks.send(event_id, status, at, tries + 1, retry_in)
    except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError) as exc:
        # The message goes back to the queue: the webhook is sent at least once.
        log.warning("Redis unreachable or full while sending the webhook of %s: %s",
                    event_id, exc)
        raise Reject(str(exc), requeue=True) from exc
    if result is None:
        return "skipped"
    if result.ok:
        return "sent"
    args = (event_id, status, at)
    if not result.tried:
        # The receiver hangs: wait (below the visibility timeout) without using a try.
        wait = min(result.wait, settings.visibility_timeout / 2)
        raise self.retry(args=args, kwargs={"tries": tries}, countdown=wait)
    if result.retry and retry_in is not None:
        raise self.retry(args=args, kwargs={"tries": tries + 1}, countdown=retry_in)
    log.warning("event %s: webhook for %s not delivered: %s", event_id, status, result.error)
    return "failed"
