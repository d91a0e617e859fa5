"""The words of an event's life, one list each: its statuses and its history's steps.

The Lua scripts write the same words (``'status', 'delivered'``); ``tests/test_layout.py``
checks that every word they write is one of these.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where an event is: the ``status`` of its record."""

    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    RATE_LIMITED = "rate_limited"
    DEAD_LETTERED = "dead_lettered"
    #: The address is on the suppression list: nothing was sent.
    SUPPRESSED = "suppressed"
    #: Accepted by the SMTP server, then bounced back (a delivery status notification).
    BOUNCED = "bounced"


#: Statuses an event does not leave by itself (a replay may take a dead letter back).
FINAL = frozenset({Status.DELIVERED, Status.RATE_LIMITED, Status.DEAD_LETTERED,
                   Status.SUPPRESSED, Status.BOUNCED})


class Step(StrEnum):
    """What happened to an event: the ``step`` of an entry of its history."""

    ACCEPTED = "accepted"
    ATTEMPT = "attempt"
    DELIVERED = "delivered"
    RATE_LIMIT = "rate_limit"
    WORKER_LOST = "worker_lost"
    AMBIGUOUS_RESEND = "ambiguous_resend"
    SUPERSEDED = "superseded"
    REQUEUED = "requeued"
    DEAD_LETTERED = "dead_lettered"
    REPLAYED = "replayed"
    REPLAY_REFUSED = "replay_refused"
    DEAD_LETTER_DELETED = "dead_letter_deleted"
    DEAD_LETTER_PURGED = "dead_letter_purged"
    #: Not sent: the address is on the suppression list (the step names the entry).
    SUPPRESSED = "suppressed"
    #: A delivery status notification came back for the event.
    BOUNCED = "bounced"
    #: A status webhook was sent to the producer's receiver, or failed.
    WEBHOOK_SENT = "webhook_sent"
    WEBHOOK_FAILED = "webhook_failed"


class SuppressionReason(StrEnum):
    """Why an address is on the suppression list."""

    #: The SMTP server (or a later bounce) refused the mailbox for good: expires after
    #: ``EVENTFLOW_SUPPRESSION_TTL``.
    HARD_BOUNCE = "hard_bounce"
    #: Added by an operator: kept until deleted.
    MANUAL = "manual"
    #: The recipient complained (marked as spam): kept until deleted.
    COMPLAINT = "complaint"
