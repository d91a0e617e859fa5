"""The keys of EventFlow's state in Redis, and what every part of the store shares."""

from __future__ import annotations

from typing import Any

PREFIX = "ef:"
STATS_KEY = PREFIX + "stats"
TIMING_KEY = PREFIX + "timing"
#: Sorted set of unfinished events by the time a run last took them (or they were
#: accepted): what the stalled-event sweep looks at.
WATCH_KEY = PREFIX + "watch"

#: How long a finished event and its history stay readable, unless
#: ``EVENTFLOW_EVENT_RETENTION`` says otherwise (:attr:`EventStore.retention_seconds`).
RETENTION_SECONDS = 8 * 86400
#: How long an ``Idempotency-Key`` is remembered.
IDEMPOTENCY_SECONDS = 86400

#: How long a write waits for ``EVENTFLOW_REDIS_MIN_REPLICAS`` replicas to confirm it.
REPLICA_WAIT_MS = 2000

#: Upper bounds of the send-duration histogram buckets, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def event_key(event_id: str) -> str:
    return f"{PREFIX}ev:{event_id}"


def history_key(event_id: str) -> str:
    return f"{PREFIX}hist:{event_id}"


def lease_key(event_id: str) -> str:
    return f"{PREFIX}lease:{event_id}"


def quota_key(user_id: str) -> str:
    return f"{PREFIX}quota:{user_id}"


def idempotency_key(producer: str, key: str) -> str:
    return f"{PREFIX}idem:{producer}:{key}"


def _buckets(seconds: float) -> list[str]:
    """The send-duration histogram's buckets that ``seconds`` falls in: cumulative, as
    Prometheus wants them, so a read needs no arithmetic."""
    return [f"le:{bound}" for bound in DURATION_BUCKETS if seconds <= bound]



def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

