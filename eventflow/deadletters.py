"""The dead-letter queue: events that could not be delivered, kept with their reason.

A dead letter is the event as it was accepted plus the failure: ``error_type``,
``error``, ``attempts``, ``failed_at`` and the event's history up to then. It stays until
it is replayed or deleted. Keys: ``ef:dlq`` (sorted set of event ids by time of failure,
in milliseconds) and ``ef:dl:<id>`` (the record, JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from eventflow.store import (
    PREFIX,
    STATS_KEY,
    EventStore,
    event_key,
    history_key,
    lease_key,
    quota_key,
)

DLQ_KEY = PREFIX + "dlq"

#: Kinds of failure a dead letter can carry.
ERROR_TYPES = ("permanent", "retries_exhausted", "worker_lost", "time_limit", "internal")


def dead_letter_key(event_id: str) -> str:
    return f"{PREFIX}dl:{event_id}"


def original_event(record: Mapping[str, str]) -> dict[str, Any]:
    """The event as its producer sent it, from a stored record."""
    return {
        "user_id": record.get("user_id", ""),
        "event_type": record.get("event_type", ""),
        "payload": json.loads(record.get("payload") or "{}"),
    }


def record_dead_letter(
    store: EventStore, event_id: str, error_type: str, error: str
) -> dict[str, Any] | None:
    """Move an event to the dead-letter queue with its reason, in one atomic step.

    Its quota reservation is given back, since nothing was sent. Returns the dead letter,
    or ``None`` if the event is unknown or already finished (delivered, rate limited).
    """
    record, history = store.get_with_history(event_id)
    if not record or record.get("status") in ("delivered", "rate_limited"):
        return None
    now_ts = store.clock.now()
    failed_at = store.now()
    letter = {
        "id": event_id,
        "event": original_event(record),
        "producer": record.get("producer"),
        "error_type": error_type,
        "error": error,
        "attempts": int(record.get("attempts") or 0),
        "failed_at": failed_at,
        "history": history,
    }
    pipe = store.redis.pipeline()
    pipe.set(dead_letter_key(event_id), json.dumps(letter, separators=(",", ":")))
    pipe.zadd(DLQ_KEY, {event_id: int(now_ts * 1000)})
    pipe.hset(
        event_key(event_id),
        mapping={"status": "dead_lettered", "last_error": error, "updated_at": failed_at,
                 "send": "", "claimed": "0", "quota": "0"},
    )
    pipe.zrem(quota_key(record.get("user_id", "")), event_id)
    pipe.rpush(history_key(event_id), store.entry("dead_lettered", error_type=error_type,
                                                  error=error))
    # A dead letter is kept until it is deleted; so is the event it belongs to.
    pipe.persist(event_key(event_id))
    pipe.persist(history_key(event_id))
    pipe.hincrby(STATS_KEY, "dead_lettered", 1)
    pipe.delete(lease_key(event_id))
    pipe.execute()
    return letter


def dead_letter_count(store: EventStore) -> int:
    """How many dead letters wait now."""
    return int(store.redis.zcard(DLQ_KEY))
