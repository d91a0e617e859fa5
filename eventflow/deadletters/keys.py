"""The keys of the dead-letter queue, and what its parts share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from eventflow.store import PREFIX

DLQ_KEY = PREFIX + "dlq"
AUDIT_INDEX_KEY = PREFIX + "audits"
REPLAY_SCHEDULE_KEY = PREFIX + "replay:next"

#: Kinds of failure a dead letter can carry.
ERROR_TYPES = ("permanent", "retries_exhausted", "worker_lost", "time_limit", "internal",
               "template_error")

#: Outcomes counted in ``eventflow_replays_total{outcome}`` (``replays:<outcome>`` in
#: ``ef:stats``): queued again, or refused because the event fails today's schema. Dry
#: runs and deferred letters change nothing, so they are not counted.
REPLAY_OUTCOMES = ("queued", "invalid")

#: How far ahead a paced replay may be scheduled, as a share of the visibility timeout.
#: A worker holds a message with an ETA unacknowledged until it runs; past the
#: visibility timeout Redis would hand it to a second worker, so the ETA, plus the time
#: the run itself takes, must stay well below it.
REPLAY_WINDOW_SHARE = 0.25

#: Dead letters read from Redis per round trip when listing or replaying.
SCAN_BATCH = 200

#: Dead letters queued again (or purged) per round trip in a bulk replay (or a purge).
REPLAY_BATCH = 100

#: Seconds a replay, deletion or refusal keeps its answer for the same call sent again
#: after a lost reply (redis-py sends it again at once, on a new connection).
OPERATION_TTL = 600


def dead_letter_key(event_id: str) -> str:
    return f"{PREFIX}dl:{event_id}"


def audit_key(event_id: str) -> str:
    return f"{PREFIX}audit:{event_id}"


def operation_key(token: str) -> str:
    """Where a replay, deletion or refusal keeps its answer, for a second run of it."""
    return f"{PREFIX}dlop:{token}"


def original_event(record: Mapping[str, str]) -> dict[str, Any]:
    """The event as its producer sent it, from a stored record."""
    return {
        "user_id": record.get("user_id", ""),
        "event_type": record.get("event_type", ""),
        "payload": json.loads(record.get("payload") or "{}"),
    }


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
