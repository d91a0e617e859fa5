"""The state of every event in Redis: its record, its timeline and its delivery ledger.

Every change of an event's status is written together with its history entry and the
counters that ``/stats`` and ``/metrics`` read, in one atomic step (a Lua script or a
``MULTI`` block), so the figures never disagree with the records.

Keys (all under ``ef:``):

- ``ef:ev:<id>``: hash, the event record and its ledger fields (``send``, ``claimed``,
  ``losses``, ``quota``, and ``take``: the current run's token and what its take
  answered, until its attempt is recorded);
- ``ef:hist:<id>``: list of JSON history entries;
- ``ef:lease:<id>``: held by the one worker run that is working on the event;
- ``ef:quota:<user_id>``: sorted set of the event ids that used the user's quota, scored
  by time (a moving-window log);
- ``ef:idem:<producer>:<key>``: the first response to an ``Idempotency-Key``;
- ``ef:stats`` and ``ef:timing``: the pipeline counters and the send-duration histogram.

The code is split by who calls it: ``intake.py`` (the web: accepting events),
``ledger.py`` (the worker: a run's ledger), ``base.py`` (reads, and the write that waits
for replicas), ``keys.py``; each script is a ``.lua`` file beside the code that runs it.
"""

from __future__ import annotations

from eventflow.store.base import NotReplicated, StoreBase, not_replicated
from eventflow.store.intake import Accepted, Intake, ThrottleArgs
from eventflow.store.keys import (
    DURATION_BUCKETS,
    IDEMPOTENCY_SECONDS,
    PREFIX,
    RETENTION_SECONDS,
    STATS_KEY,
    TIMING_KEY,
    WATCH_KEY,
    event_key,
    history_key,
    idempotency_key,
    lease_key,
    quota_key,
)
from eventflow.store.ledger import Claim, Ledger, Taken

__all__ = [
    "DURATION_BUCKETS", "IDEMPOTENCY_SECONDS", "PREFIX", "RETENTION_SECONDS", "STATS_KEY",
    "TIMING_KEY", "WATCH_KEY", "Accepted", "Claim", "EventStore", "NotReplicated",
    "Taken", "ThrottleArgs", "event_key", "history_key", "idempotency_key", "lease_key",
    "not_replicated", "quota_key",
]


class EventStore(Intake, Ledger, StoreBase):
    """Reads and writes event state in Redis: the web's side and the worker's side."""
