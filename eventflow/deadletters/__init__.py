"""The dead-letter queue: events that could not be delivered, kept with their reason.

A dead letter is the event as it was accepted plus the failure: ``error_type``,
``error``, ``attempts``, ``failed_at`` and the event's history up to then. It stays until
it is replayed, deleted or purged. Keys:

- ``ef:dlq``: sorted set of the event ids waiting, by time of failure in milliseconds;
- ``ef:dl:<id>``: the dead letter (JSON);
- ``ef:audit:<id>``: the dead letter's audit trail, a list of JSON entries (``action``
  ``dead_lettered``, ``replay`` with its ``outcome``, ``deleted``). It outlives replays
  and deletions, so an event that fails again keeps the story of its earlier replays;
  only a purge removes it;
- ``ef:audits``: sorted set of the event ids with an audit trail, by time of its last
  entry, so that a purge finds the old ones;
- ``ef:replay:next``: the next free slot of the replay schedule (milliseconds, on
  Redis's clock), shared by every web process and CLI so that replays together never
  exceed ``EVENTFLOW_REPLAY_RATE``;
- ``ef:dlop:<token>``: the answer of one replay (token: its task id), deletion or
  refused replay, kept ``OPERATION_TTL`` seconds, so that the same script sent again
  after a lost reply answers the same and changes nothing.

A listing's cursor is a position in (``failed_at`` ms, id) order, newest first: the order
of ``ZREVRANGE`` on ``ef:dlq``. Each batch is read by rank, from the rank the position
has now (found by counting, and by a binary search among the letters of its
millisecond), so a cursor stays exact whatever letters arrive or leave in between.

Replay is one Lua script: status back to ``queued``, the ``replayed`` history entry, the
Celery message (a fresh task id, the event id as its argument), the removal from
``ef:dlq`` and the audit entry are written at once. A crash before it leaves the dead
letter where it was; a crash after it leaves the event queued.

The code is split by who calls it: ``record.py`` (the worker's failure handler),
``operations.py`` (the operator: API and CLI), ``selection.py`` (filters and cursors),
``keys.py``; each script is a ``.lua`` file beside the code that runs it.
"""

from __future__ import annotations

from eventflow.deadletters.keys import (
    DLQ_KEY,
    ERROR_TYPES,
    REPLAY_OUTCOMES,
    original_event,
)
from eventflow.deadletters.operations import (
    DeadLetters,
    Page,
    PurgeReport,
    ReplayOutcome,
    ReplayReport,
    schema_errors,
    summary,
)
from eventflow.deadletters.record import dead_letter_count, record_dead_letter
from eventflow.deadletters.selection import (
    FilterSchema,
    InvalidCursor,
    LetterFilter,
    decode_cursor,
    encode_cursor,
    letter_filter,
)

__all__ = [
    "DLQ_KEY", "ERROR_TYPES", "REPLAY_OUTCOMES", "DeadLetters", "FilterSchema",
    "InvalidCursor", "LetterFilter", "Page", "PurgeReport", "ReplayOutcome", "ReplayReport",
    "dead_letter_count", "decode_cursor", "encode_cursor", "letter_filter",
    "original_event", "record_dead_letter", "schema_errors", "summary",
]
