"""What a worker does with one event: quota, ledger, send, and the decision that follows.

The Celery task in ``tasks/delivery.py`` only turns the :class:`Outcome` returned here
into a retry or an exception; everything that can be decided without Celery is here, so
it can be tested with a recording sender and a real Redis.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass

from eventflow.deadletters import original_event
from eventflow.failures import DeliveryFailed, classify
from eventflow.mailer import Sender, build_message
from eventflow.settings import Settings
from eventflow.store import EventStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the task should do next: nothing (``retry_in`` is ``None``) or retry later."""

    status: str
    retry_in: float | None = None


def full_jitter_backoff(retries: int, base: float, ceiling: float) -> float:
    """Seconds to wait before retry number ``retries + 1``: uniform in [0, base * 2**retries].

    "Full jitter" spreads the retries of many events that failed together, so that a
    server coming back is not met by all of them at once.
    """
    return random.uniform(0, min(ceiling, base * (2 ** retries)))


class Delivery:
    """Delivers events, one run at a time."""

    def __init__(self, store: EventStore, sender: Sender, settings: Settings) -> None:
        self.store = store
        self.sender = sender
        self.settings = settings

    def run(self, event_id: str) -> Outcome:
        """Take the event, check its quota, send it once, and record what happened.

        Raises :class:`DeliveryFailed` when the event must go to the dead-letter queue.
        """
        settings = self.settings
        claim = self.store.claim(event_id, uuid.uuid4().hex, settings.visibility_timeout * 1000)
        if claim.state == "busy":
            # Another run holds the event (or held it and died: its lease runs out).
            # The wait stays below the visibility timeout, like every retry's.
            wait = min(max(claim.lease_left_ms / 1000, 0.5), settings.visibility_timeout / 2)
            return Outcome("busy", retry_in=wait)
        if claim.record is None:
            log.info("event %s is %s; nothing to do", event_id, claim.state)
            return Outcome(claim.state)
        if claim.losses:
            self.store.note(event_id, "worker_lost", losses=claim.losses)
            if claim.losses >= settings.max_worker_losses:
                raise DeliveryFailed(
                    "worker_lost",
                    f"the worker died {claim.losses} times while handling this event",
                )
        record = claim.record
        event = original_event(record)

        limit = settings.rate_limit
        if not self.store.reserve_quota(event_id, event["user_id"], limit.count, limit.seconds):
            self.store.mark_rate_limited(event_id, str(limit))
            return Outcome("rate_limited")

        message = build_message(event_id, event, settings.mail_from, settings.mail_domain)
        attempt, ambiguous = self.store.begin_send(event_id)
        if ambiguous:
            # SMTP cannot tell whether the previous send was accepted: the worker died
            # between starting it and recording the reply. Sending again is the only way
            # not to lose the email; it is counted as ambiguous.
            self.store.note(event_id, "ambiguous_resend", attempt=attempt)
        started = time.perf_counter()
        try:
            reply = self.sender.send(settings.mail_from, event["payload"]["to_email"], message)
        except Exception as exc:  # noqa: BLE001 (every failure is classified: retry or dead letter)
            # A replayed dead letter gets the whole retry budget again; ``attempts``
            # keeps counting, so the budget starts after the attempts made before it.
            first = int(record.get("replay_base") or 0) + 1
            return self._failed(event_id, attempt, exc, time.perf_counter() - started, first)
        self.store.mark_delivered(event_id, attempt, reply, time.perf_counter() - started)
        return Outcome("delivered")

    def _failed(
        self, event_id: str, attempt: int, exc: Exception, duration: float,
        first_attempt: int = 1,
    ) -> Outcome:
        failure = classify(exc)
        retries_done = attempt - first_attempt
        retry = failure.transient and retries_done < self.settings.max_retries
        retry_in = (
            full_jitter_backoff(
                retries_done, self.settings.retry_backoff, self.settings.retry_backoff_max
            )
            if retry
            else None
        )
        self.store.mark_failed_attempt(
            event_id, attempt, failure.kind, failure.error, failure.details, duration, retry_in
        )
        if retry_in is not None:
            return Outcome("retrying", retry_in=retry_in)
        error_type = "permanent" if not failure.transient else "retries_exhausted"
        if failure.details.get("internal"):
            error_type = "internal"
        raise DeliveryFailed(error_type, failure.error)

