"""What a worker does with one event: quota, ledger, send, and the decision that follows.

The Celery task in ``tasks/delivery.py`` only runs it: a transient failure with retries
left ends here as :class:`RetryLater` (which the task's ``autoretry_for`` retries), a
failure for good as :class:`DeliveryFailed` (which its failure handler dead-letters).
Everything that can be decided without Celery is here, so it can be tested with a
recording sender and a real Redis.

Once the SMTP server has answered, the run knows the outcome; it records it however long
Redis takes (up to the run's deadline), holding the event's lease meanwhile, since giving
up would let the next run send the email again.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventflow.deadletters import original_event
from eventflow.failures import DeliveryFailed, RetryLater, classify, suppressing_status
from eventflow.mailer import Sender, build_message
from eventflow.rendering import TemplateFailed, Templates
from eventflow.settings import Settings, verp_address
from eventflow.statuses import Status, SuppressionReason
from eventflow.store import EventStore
from eventflow.suppressions import Suppressions, suppression_address
from eventflow.webhooks import Webhooks

log = logging.getLogger(__name__)

#: Errors after which writing a known outcome is tried again: Redis stalled (a slow
#: fsync, a fork, a failover), away, or full for now.
UNRECORDED = (RedisConnectionError, RedisTimeoutError, RedisOutOfMemoryError)
#: First and longest wait between two tries at recording a known outcome, in seconds.
RECORD_BACKOFF = (0.05, 1.0)


@dataclass(frozen=True)
class Outcome:
    """What the task should do next: nothing (``retry_in`` is ``None``), or look again
    later because another run holds the event (``busy``)."""

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
                 templates: Templates | None = None,
                 suppressions: Suppressions | None = None,
                 webhooks: Webhooks | None = None) -> None:
        self.store = store
        self.sender = sender
        self.settings = settings
        self.templates = templates or Templates.from_settings(settings.templates_dir)
        self.suppressions = suppressions or Suppressions(store.redis, store.clock,
                                                         settings.suppression_ttl)
        #: The producers' status webhooks, told of each final status recorded here.
        self.webhooks = webhooks or Webhooks(store, settings)
        #: The token of each run of this process that took its event, by event id, until
        #: the task ends: the task's failure handler fences its dead letter with it.
        self.runs: dict[str, str] = {}

    def run(self, event_id: str, deadline: float | None = None) -> Outcome:
        """Take the event, check its quota, send it once, and record what happened.

        Raises :class:`RetryLater` after a transient failure with retries left (its
        attempt and the wait recorded), and :class:`DeliveryFailed` when the event must
        go to the dead-letter queue.
        ``deadline`` (``time.monotonic()``) is when the run must be over: the task's
        time limit. Until then an outcome the run knows (the server said 250, or
        refused) is recorded again and again while Redis does not answer.
        """
        settings = self.settings
        limit = settings.rate_limit
        if deadline is None:
            deadline = time.monotonic() + settings.visibility_timeout / 2
        token = uuid.uuid4().hex
        lease_ms = settings.visibility_timeout * 1000
        # Claim, losses, quota and ledger in one round trip (EventStore.take).
        taken = self.store.take(event_id, token, lease_ms, limit.count, limit.seconds,
                                settings.max_worker_losses)
        claim = taken.claim
        if claim.state == "busy":
            # Another run holds the event (or held it and died: its lease runs out).
            # The wait stays below the visibility timeout, like every retry's.
            wait = min(max(claim.lease_left_ms / 1000, 0.5), settings.visibility_timeout / 2)
            return Outcome("busy", retry_in=wait)
        if claim.record is None:
            log.info("event %s is %s; nothing to do", event_id, claim.state)
            return Outcome(claim.state)
        held = _Held(self.store, event_id, token, lease_ms, deadline)
        self.runs[event_id] = token
        if taken.step == "lost":
            # Noted as worker_lost in its history by the script.
            raise DeliveryFailed(
                "worker_lost",
                f"the worker died {claim.losses} times while handling this event",
            )
        if taken.step == "failed":
            # An earlier run failed it for good and could not write the dead letter.
            raise DeliveryFailed(claim.record.get("failed_as") or "internal",
                                 claim.record.get("last_error") or "")
        producer = claim.record.get("producer")
        if taken.step == "suppressed":
            # Found on the list by the take, before the quota: nothing taken, nothing sent.
            address = suppression_address(original_event(claim.record)["payload"]["to_email"])
            entry = self.suppressions.get(address) or {"address": address}
            pending = self.webhooks.expect(event_id, Status.SUPPRESSED, producer)
            if not held.record("suppression", lambda: self.store.mark_suppressed(
                    event_id, {k: v for k, v in entry.items() if v}, run=token)):
                return self._superseded(event_id, "suppressed")
            self.webhooks.notify_final(event_id, Status.SUPPRESSED, pending)
            log.info("event %s not sent: %s is on the suppression list", event_id, address)
            return Outcome("suppressed")
        if taken.step == "refused":
            pending = self.webhooks.expect(event_id, Status.RATE_LIMITED, producer)
            if not held.record("rate limit", lambda: self.store.mark_rate_limited(
                    event_id, str(limit), run=token)):
                return self._superseded(event_id, "rate_limited")
            log.warning("event %s not sent: rate limit %s reached for its user", event_id, limit)
            self.webhooks.notify_final(event_id, Status.RATE_LIMITED, pending)
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
            envelope_from = (verp_address(settings.bounce_address, event_id)
                             if settings.bounce_address else settings.mail_from)
            reply = self.sender.send(envelope_from, event["payload"]["to_email"], message)
        except Exception as exc:  # noqa: BLE001 (every failure is classified: retry or dead letter)
            # A replayed dead letter gets the whole retry budget again; ``attempts``
            # keeps counting, so the budget starts after the attempts made before it.
            first = int(record.get("replay_base") or 0) + 1
            return self._failed(held, attempt, exc, time.perf_counter() - started, first,
                                recipient=record_recipient(record))
        duration = time.perf_counter() - started
        # The server took the message: from here on the run knows the outcome, and a
        # second send would be a second email. It records it however long Redis takes.
        at = self.store.now()  # the same entries on every try
        pending = self.webhooks.expect(event_id, Status.DELIVERED, producer)
        if not held.record("delivery", lambda: self.store.mark_delivered(
                event_id, attempt, reply, duration, rendered.describe(), at=at, run=token)):
            return self._superseded(event_id, "delivered")
        self.webhooks.notify_final(event_id, Status.DELIVERED, pending)
        return Outcome("delivered")

    def _superseded(self, event_id: str, outcome: str) -> Outcome:
        # Not retried, not dead-lettered: the event is the newer run's.
        log.warning("event %s: this run's outcome (%s) came after a newer run took the event; "
                    "noted in its history, nothing else changed", event_id, outcome)
        return Outcome("superseded")

    def _failed(
        self, held: _Held, attempt: int, exc: Exception, duration: float,
        first_attempt: int = 1, recipient: str = "",
    ) -> Outcome:
        failure = classify(exc)
        status = suppressing_status(failure)
        if status and recipient:
            # The server refused the mailbox for good: no later event mails it again.
            # Written before the attempt, so that a run that dies between the two leaves
            # the address suppressed (the next run then finds it so and sends nothing).
            record_until(held.deadline, held.event_id, "suppression", lambda: (
                self.suppressions.add(recipient, SuppressionReason.HARD_BOUNCE,
                                      event_id=held.event_id, keep_permanent=True,
                                      smtp_reply=str(failure.details.get("smtp_reply", "")))))
            failure.details["suppressed"] = recipient
        retries_done = attempt - first_attempt
        retry = failure.transient and retries_done < self.settings.max_retries
        retry_in = (
            full_jitter_backoff(
                retries_done, self.settings.retry_backoff, self.settings.retry_backoff_max
            )
            if retry
            else None
        )
        error_type = None
        if retry_in is None:
            error_type = "permanent" if not failure.transient else "retries_exhausted"
            if isinstance(exc, TemplateFailed):
                # Today's template does not render with the event (changed since it was
                # accepted): nothing was sent, and a retry would fail the same way.
                error_type = exc.error_type
            elif failure.details.get("internal"):
                # Not a refusal but a fault of ours: its traceback goes to the log.
                error_type = "internal"
                log.error("event %s: unexpected error while sending", held.event_id,
                          exc_info=exc)
        at = self.store.now()  # the same entry on every try
        if not held.record("failed attempt", lambda: self.store.mark_failed_attempt(
                held.event_id, attempt, failure.kind, failure.error, failure.details, duration,
                retry_in, fails_as=error_type, at=at, run=held.token)):
            return self._superseded(held.event_id, failure.kind)
        if error_type is None:
            raise RetryLater(failure.error, retry_in or 0.0)
        raise DeliveryFailed(error_type, failure.error)


def record_recipient(record: Mapping[str, str]) -> str:
    """The event's recipient as the suppression list writes it, or '' if unreadable."""
    try:
        return suppression_address(original_event(record)["payload"]["to_email"])
    except Exception:  # noqa: BLE001 (a record that does not read fails its attempt anyway)
        return ""


def record_until(
    deadline: float, event_id: str, what: str, write: Callable[[], Any],
    between: Callable[[], None] | None = None,
) -> Any:
    """Run ``write`` until Redis takes it, waiting longer each time, up to ``deadline``
    (``time.monotonic()``); then re-raise. ``between`` runs after each wait."""
    wait, longest = RECORD_BACKOFF
    tries = 0
    while True:
        try:
            result = write()
        except UNRECORDED as exc:
            tries += 1
            if time.monotonic() + wait >= deadline:
                log.error("event %s: %s not recorded after %d tries, Redis still "
                          "unavailable (%s); giving up", event_id, what, tries, exc)
                raise
            if tries == 1:
                log.warning("event %s: %s not recorded yet, Redis unavailable (%s); "
                            "trying again", event_id, what, exc)
            time.sleep(wait)
            wait = min(wait * 2, longest)
            if between is not None:
                between()
            continue
        if tries:
            log.warning("event %s: %s recorded after %d failed tries", event_id, what, tries)
        return result


@dataclass
class _Held:
    """An event a run holds (its lease), and the writing of what the run learnt."""

    store: EventStore
    event_id: str
    token: str
    lease_ms: int
    deadline: float

    def record(self, what: str, write: Callable[[], bool]) -> bool:
        """Run ``write`` (one atomic step), trying again while Redis does not take it.

        The run holds a known outcome: giving up would let the next run, finding the
        ledger at ``started``, send the email a second time. Between tries the lease is
        extended when Redis answers (a full Redis refuses writes, not ``PEXPIRE``), so
        that no other run takes the event meanwhile. Gives up (re-raising) only at the
        deadline: beyond it the task's time limit would end the run anyway. False when a
        newer run holds the event (the write was fenced: see ``EventStore.superseded``).
        """
        return bool(record_until(self.deadline, self.event_id, what, write,
                                 between=self._extend_lease))

    def _extend_lease(self) -> None:
        try:
            self.store.extend_lease(self.event_id, self.token, self.lease_ms)
        except RedisError:
            pass  # unreachable still: the next try at the record says so
