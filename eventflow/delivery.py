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
from eventflow.rendering import TemplateFailed, Templates
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

    def __init__(self, store: EventStore, sender: Sender, settings: Settings,
                 templates: Templates | None = None) -> None:
        self.store = store
        self.sender = sender
        self.settings = settings
        self.templates = templates or Templates.from_settings(settings.templates_dir)

    def run(self, event_id: str) -> Outcome:
        """Take the event, check its quota, send it once, and record what happened.

        Raises :class:`DeliveryFailed` when the event must go to the dead-letter queue.
        """
        settings = self.settings
        limit = settings.rate_limit
        # Claim, losses, quota and ledger in one round trip (EventStore.take).
        taken = self.store.take(event_id, uuid.uuid4().hex, settings.visibility_timeout * 1000,
                                limit.count, limit.seconds, settings.max_worker_losses)
        claim = taken.claim
        if claim.state == "busy":
            # Another run holds the event (or held it and died: its lease runs out).
            # The wait stays below the visibility timeout, like every retry's.
            wait = min(max(claim.lease_left_ms / 1000, 0.5), settings.visibility_timeout / 2)
            return Outcome("busy", retry_in=wait)
        if claim.record is None:
            log.info("event %s is %s; nothing to do", event_id, claim.state)
            return Outcome(claim.state)
        if taken.step == "lost":
            # Noted as worker_lost in its history by the script.
            raise DeliveryFailed(
                "worker_lost",
                f"the worker died {claim.losses} times while handling this event",
            )
        if taken.step == "refused":
            self.store.mark_rate_limited(event_id, str(limit))
            return Outcome("rate_limited")

        # The ledger says "started" (counted ambiguous, and noted, when the previous run
        # had started a send and never recorded its reply: SMTP cannot tell whether it was
        # accepted, and sending again is the only way not to lose the email).
        record = claim.record
        attempt = taken.attempt
        started = time.perf_counter()
        try:
            # Built inside the try: a message that cannot be built fails its attempt like
            # a send that fails, with the ledger reset, and is dead-lettered as internal.
            event = original_event(record)
            rendered = self.templates.render_event(event_id, event)
            message = build_message(event_id, event, settings.mail_from, settings.mail_domain,
                                    rendered)
            reply = self.sender.send(settings.mail_from, event["payload"]["to_email"], message)
        except TemplateFailed:
            # Today's template does not render with the event (changed since it was
            # accepted): nothing was sent, and a retry would fail the same way. The
            # task's failure handler dead-letters it as ``template_error``.
            raise
        except Exception as exc:  # noqa: BLE001 (every failure is classified: retry or dead letter)
            # A replayed dead letter gets the whole retry budget again; ``attempts``
            # keeps counting, so the budget starts after the attempts made before it.
            first = int(record.get("replay_base") or 0) + 1
            return self._failed(event_id, attempt, exc, time.perf_counter() - started, first)
        self.store.mark_delivered(event_id, attempt, reply, time.perf_counter() - started,
                                  rendered.describe())
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

