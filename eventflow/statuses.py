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


#: Statuses an event does not leave by itself (a replay may take a dead letter back).
FINAL = frozenset({Status.DELIVERED, Status.RATE_LIMITED, Status.DEAD_LETTERED})


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
    WEBHOOK_SENT = "webhook_sent"
    WEBHOOK_FAILED = "webhook_failed"
