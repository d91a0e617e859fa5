"""Writing a dead letter: the worker's side, called by the ``task_failure`` signal
handler (``tasks/delivery.py``), in one atomic step (``dead_letter.lua``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from eventflow.deadletters.keys import (
    AUDIT_INDEX_KEY,
    DLQ_KEY,
    audit_key,
    dead_letter_key,
)
from eventflow.scripts import lua_source
from eventflow.statuses import Step
from eventflow.store import STATS_KEY, WATCH_KEY, EventStore, event_key, history_key, lease_key

DEAD_LETTER = lua_source("eventflow.store", "fence.lua") + lua_source(
    "eventflow.deadletters", "dead_letter.lua")


def record_dead_letter(
    store: EventStore, event_id: str, error_type: str, error: str, token: str | None = None,
    run: str = "",
) -> dict[str, Any] | None:
    """Move an event to the dead-letter queue with its reason, in one atomic step.

    Its quota reservation is given back, since nothing was sent. Returns the dead letter,
    or ``None`` if the event is unknown or already finished (delivered, rate limited,
    dead-lettered), or if ``run`` (the token of the run that failed) is no longer the run
    holding the event: a newer run took it, and the failure is only noted in its history
    as ``superseded``. Called again with the same ``token`` (a retry after a lost reply),
    it returns the same letter and changes nothing.
    """
    letter = store.redis.register_script(DEAD_LETTER)(
        keys=[event_key(event_id), history_key(event_id), dead_letter_key(event_id), DLQ_KEY,
              audit_key(event_id), AUDIT_INDEX_KEY, STATS_KEY, lease_key(event_id), WATCH_KEY],
        args=[event_id, error_type, error, store.now(), int(store.clock.now() * 1000),
              token or uuid.uuid4().hex,
              store.entry(Step.DEAD_LETTERED, error_type=error_type, error=error), run,
              store.superseded(None, "dead_lettered", error_type=error_type, error=error)
              if run else ""],
    )
    return json.loads(letter) if letter else None


def dead_letter_count(store: EventStore) -> int:
    """How many dead letters wait now."""
    return int(store.redis.zcard(DLQ_KEY))

