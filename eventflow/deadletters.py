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
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from eventflow.clock import isoformat
from eventflow.enqueue import build_task_message
from eventflow.schemas import event_schema
from eventflow.settings import Settings
from eventflow.store import (
    PREFIX,
    STATS_KEY,
    WATCH_KEY,
    EventStore,
    event_key,
    history_key,
    lease_key,
    quota_key,
)

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


# Move an event to the dead-letter queue, in one step: the letter (the event as accepted,
# the failure and the history so far, built here so that what is read and what is
# written cannot disagree), the queue, the record, the quota given back (nothing was
# sent), the history and audit entries, the counter. Safe to run twice: a run with the
# token of one that already wrote returns that letter and changes nothing, and an event
# already dead-lettered, delivered or rate limited is left as it is.
# KEYS: event, history, letter, dlq, audit, audit index, stats, lease, watch.
# ARGV: id, error type, error, time (ISO), time ms, token, history entry.
# Returns the letter (JSON), or nil when nothing was dead-lettered.
_DEAD_LETTER = """
local r = redis.call('HMGET', KEYS[1], 'status', 'user_id', 'event_type', 'payload',
                     'producer', 'attempts', 'dead_letter_token')
local status = r[1]
if not status then return false end
if r[7] == ARGV[6] then return redis.call('GET', KEYS[3]) end
if status == 'delivered' or status == 'rate_limited' or status == 'dead_lettered' then
  return false
end
local function str(value) return cjson.encode(value or '') end
local attempts = string.format('%d', tonumber(r[6] or '0') or 0)
local letter = '{"id":' .. str(ARGV[1]) .. ',"event":{"user_id":' .. str(r[2])
  .. ',"event_type":' .. str(r[3]) .. ',"payload":' .. (r[4] or '{}') .. '},"producer":'
  .. (r[5] and str(r[5]) or 'null') .. ',"error_type":' .. str(ARGV[2]) .. ',"error":'
  .. str(ARGV[3]) .. ',"attempts":' .. attempts .. ',"failed_at":' .. str(ARGV[4])
  .. ',"history":[' .. table.concat(redis.call('LRANGE', KEYS[2], 0, -1), ',') .. ']}'
redis.call('SET', KEYS[3], letter)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'dead_lettered', 'last_error', ARGV[3],
           'updated_at', ARGV[4], 'send', '', 'claimed', '0', 'quota', '0',
           'dead_letter_token', ARGV[6])
redis.call('HDEL', KEYS[1], 'failed_as', 'take')
redis.call('ZREM', 'ef:quota:' .. (r[2] or ''), ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[7])
-- A dead letter is kept until it is deleted; so is the event it belongs to.
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('RPUSH', KEYS[5], '{"action":"dead_lettered","at":' .. str(ARGV[4])
           .. ',"error_type":' .. str(ARGV[2]) .. ',"error":' .. str(ARGV[3])
           .. ',"attempts":' .. attempts .. '}')
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[7], 'dead_lettered', 1)
redis.call('DEL', KEYS[8])
redis.call('ZREM', KEYS[9], ARGV[1])
return letter
"""


def record_dead_letter(
    store: EventStore, event_id: str, error_type: str, error: str, token: str | None = None,
) -> dict[str, Any] | None:
    """Move an event to the dead-letter queue with its reason, in one atomic step.

    Its quota reservation is given back, since nothing was sent. Returns the dead letter,
    or ``None`` if the event is unknown or already finished (delivered, rate limited,
    dead-lettered). Called again with the same ``token`` (a retry after a lost reply),
    it returns the same letter and changes nothing.
    """
    letter = store.redis.register_script(_DEAD_LETTER)(
        keys=[event_key(event_id), history_key(event_id), dead_letter_key(event_id), DLQ_KEY,
              audit_key(event_id), AUDIT_INDEX_KEY, STATS_KEY, lease_key(event_id), WATCH_KEY],
        args=[event_id, error_type, error, store.now(), int(store.clock.now() * 1000),
              token or uuid.uuid4().hex,
              store.entry("dead_lettered", error_type=error_type, error=error)],
    )
    return json.loads(letter) if letter else None


def dead_letter_count(store: EventStore) -> int:
    """How many dead letters wait now."""
    return int(store.redis.zcard(DLQ_KEY))


# -- choosing dead letters -------------------------------------------------------------


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters an operation applies to; ``None`` matches everything.

    ``since_ms`` is inclusive and ``until_ms`` exclusive, both times of failure.
    """

    error_type: str | None = None
    event_type: str | None = None
    user_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, letter: Mapping[str, Any]) -> bool:
        event = letter.get("event") or {}
        return (
            (self.error_type is None or letter.get("error_type") == self.error_type)
            and (self.event_type is None or event.get("event_type") == self.event_type)
            and (self.user_id is None or event.get("user_id") == self.user_id)
        )

    def failed_before(self, until_ms: int) -> LetterFilter:
        """This filter, narrowed to letters that failed before ``until_ms``."""
        if self.until_ms is not None and self.until_ms <= until_ms:
            return self
        return replace(self, until_ms=until_ms)


def _milliseconds(moment: datetime) -> int:
    if moment.tzinfo is None:  # a time without offset is UTC, as everywhere in EventFlow
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class FilterSchema(Schema):
    """The filters of the dead-letter endpoints and of ``flask dlq``, from strings."""

    error_type = fields.String(validate=validate.OneOf(ERROR_TYPES))
    event_type = fields.String(validate=validate.Length(min=1, max=128))
    user_id = fields.String(validate=validate.Length(min=1, max=128))
    since = fields.DateTime(metadata={"description": "ISO 8601; failed at or after."})
    until = fields.DateTime(metadata={"description": "ISO 8601; failed before."})

    @validates_schema
    def _since_before_until(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        since, until = data.get("since"), data.get("until")
        if since and until and _milliseconds(since) >= _milliseconds(until):
            raise ValidationError("Must be later than 'since'.", "until")


def letter_filter(data: Mapping[str, Any]) -> LetterFilter:
    """A :class:`LetterFilter` from data loaded by a :class:`FilterSchema`."""
    return LetterFilter(
        error_type=data.get("error_type"),
        event_type=data.get("event_type"),
        user_id=data.get("user_id"),
        since_ms=_milliseconds(data["since"]) if data.get("since") else None,
        until_ms=_milliseconds(data["until"]) if data.get("until") else None,
    )


class InvalidCursor(ValueError):
    """A pagination cursor this server did not hand out."""


def encode_cursor(position: tuple[int, str]) -> str:
    """An opaque cursor for "after this (failed_at ms, id)"."""
    raw = _json(list(position)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str]:
    """The position a cursor stands for, or :class:`InvalidCursor`."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        score, event_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("This cursor was not handed out by this server.") from None
    if (type(score) is not int or not 0 <= score < 2**53 or not isinstance(event_id, str)
            or not 0 < len(event_id) <= 256):
        raise InvalidCursor("This cursor was not handed out by this server.")
    return score, event_id


# -- scripts ---------------------------------------------------------------------------

# The next ``count`` ids of the queue, newest first, strictly after the cursor, among
# those that failed from ARGV[2] to ARGV[1] (ms, inclusive; '-inf', '+inf': unbounded).
# The order is (failed_at, id), both descending: the order of ZREVRANGE, whose members of
# equal score come by their bytes, highest first. A cursor (score ARGV[3], id ARGV[4];
# ARGV[3] empty: from the top) is a position in that order, found by counting and by a
# binary search among the letters of its millisecond, so it holds whether or not its own
# letter is still there, and letters added or removed between two pages neither repeat
# nor hide others. Each call is O(log(n)^2 + count), however deep the page.
# ARGV: max score, min score, cursor score, cursor id, count. Returns {id, score, ...}.
_PAGE = """
local key = KEYS[1]
local function before(a, b)  -- a < b byte by byte, as Redis orders members
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local start = 0
if ARGV[1] ~= '+inf' then start = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf') end
if ARGV[3] ~= '' then
  local lo = redis.call('ZCOUNT', key, '(' .. ARGV[3], '+inf')
  local hi = lo + redis.call('ZCOUNT', key, ARGV[3], ARGV[3])
  -- Among the letters of the cursor's millisecond (ranks lo .. hi - 1, ids descending),
  -- the first one whose id sorts before the cursor's.
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if before(redis.call('ZREVRANGE', key, mid, mid)[1], ARGV[4]) then hi = mid
    else lo = mid + 1 end
  end
  if lo > start then start = lo end
end
local stop = start + tonumber(ARGV[5]) - 1
if ARGV[2] ~= '-inf' then
  local last = redis.call('ZCOUNT', key, ARGV[2], '+inf') - 1
  if last < stop then stop = last end
end
if stop < start then return {} end
return redis.call('ZREVRANGE', key, start, stop, 'WITHSCORES')
"""

# Take up to ARGV[3] slots of the replay schedule, ARGV[1] ms apart from the previous
# one, as many as lie at most ARGV[2] ms ahead. Returns {first slot ms, now ms, slots
# taken, ms until the next slot is free (when fewer than asked were taken)}.
_RESERVE_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if slot < now then slot = now end
local interval, window = tonumber(ARGV[1]), tonumber(ARGV[2])
if slot - now > window then return {slot, now, 0, slot - now - window} end
local taken = math.min(tonumber(ARGV[3]), math.floor((window - (slot - now)) / interval) + 1)
local next_slot = slot + taken * interval
redis.call('SET', KEYS[1], next_slot, 'PX', window + 60000)
return {slot, now, taken, next_slot - now - window}
"""

# Queue a dead letter again, all at once or not at all. If the event's record is gone
# it is written again from the dead letter (ARGV[8..]: field/value pairs). The call's
# key (KEYS[12], named by the task id) keeps its answer for OPERATION_TTL seconds: the
# same call run a second time (the client sent it again after a lost reply) gives the
# same answer and changes nothing.
# KEYS: dlq, letter, event, history, queue, stats, audit, audit index, lease, quota, watch,
# operation. ARGV: id, now, now ms, history entry, message, audit entry, ttl, fields...
_REPLAY = """
local done = redis.call('GET', KEYS[12])
if done then return done end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'missing' end
redis.call('SET', KEYS[12], 'queued', 'EX', ARGV[7])
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 8)) end
local attempts = redis.call('HGET', KEYS[3], 'attempts') or '0'
redis.call('HSET', KEYS[3], 'status', 'queued', 'updated_at', ARGV[2], 'send', '',
           'claimed', '0', 'losses', '0', 'quota', '0', 'replay_base', attempts)
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('LPUSH', KEYS[5], ARGV[5])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[9])
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('RPUSH', KEYS[7], ARGV[6])
redis.call('ZADD', KEYS[8], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'replays:queued', 1)
-- Watched like a newly accepted event, so that a lost message is given a new one.
redis.call('ZADD', KEYS[11], redis.call('TIME')[1], ARGV[1])
return 'queued'
"""

# Delete one dead letter; the event is then kept as long as any finished event. Run a
# second time (after a lost reply), it finds its answer under the call's key.
# KEYS: dlq, letter, event, history, audit, audit index, operation.
# ARGV: id, now ms, audit entry, history entry, retention seconds, operation ttl.
_DELETE = """
local done = redis.call('GET', KEYS[7])
if done then return tonumber(done) end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[7], 1, 'EX', ARGV[6])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
"""

# Purge what is older than the cutoff (ARGV[2], ms): the dead letter if it failed
# before it (with its audit trail), or else the audit trail of a letter that left the
# queue if its last entry is older. KEYS as for _DELETE. ARGV: id, cutoff, history
# entry, retention seconds, '1' to only count. Returns {letters purged, trails purged}.
_PURGE = """
local cutoff = tonumber(ARGV[2])
local failed = redis.call('ZSCORE', KEYS[1], ARGV[1])
if failed then
  if tonumber(failed) >= cutoff then return {0, 0} end
  if ARGV[5] == '1' then return {1, 0} end
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[5])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  return {1, 0}
end
local last = redis.call('ZSCORE', KEYS[6], ARGV[1])
if not last or tonumber(last) >= cutoff then return {0, 0} end
if ARGV[5] == '1' then return {0, 1} end
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[1])
return {0, 1}
"""


# A replay refused because the event fails today's schema: the refusal joins the audit
# trail and the history, and is counted, once even if the call is sent twice (the
# call's key says it was done). KEYS: audit, audit index, history, stats, operation.
# ARGV: id, now ms, audit entry, history entry, operation ttl. Returns 1, or 0 if done.
_REFUSE = """
if redis.call('SET', KEYS[5], 1, 'NX', 'EX', ARGV[5]) == false then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'replays:invalid', 1)
return 1
"""


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """One page of dead letters, newest first, and the cursor of the next one."""

    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class ReplayOutcome:
    """What became of one dead letter asked to be replayed.

    ``state``: ``queued``; ``invalid`` (fails today's
    schema: ``errors``); ``deferred`` (the replay schedule is full for now: try again
    after ``retry_after`` seconds); ``missing`` (not in the dead-letter queue).
    """

    event_id: str
    state: str
    errors: dict[str, Any] | None = None
    task_id: str | None = None
    scheduled_for: str | None = None
    retry_after: float | None = None


@dataclass
class ReplayReport:
    """What a bulk replay did (or, for a dry run, would do)."""

    dry_run: bool
    replayed: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deferred: int = 0
    retry_after: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "replayed": len(self.replayed),
            "dry_run": self.dry_run,
            "ids": self.replayed,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "deferred": self.deferred,
            "retry_after": self.retry_after,
        }


@dataclass(frozen=True)
class PurgeReport:
    """How many dead letters, and audit trails of letters already gone, were purged."""

    letters: int
    audit_trails: int


def schema_errors(event: Mapping[str, Any]) -> dict[str, Any]:
    """Why ``event`` would be refused by ``POST /api/v1/events`` today (empty if it passes)."""
    return dict(event_schema.validate(dict(event)))


# -- operations ------------------------------------------------------------------------


class DeadLetters:
    """Lists, shows, replays, deletes and purges dead letters (for the API and the CLI)."""

    def __init__(self, store: EventStore, celery_app: Celery, settings: Settings) -> None:
        self.store = store
        self.redis = store.redis
        self.celery_app = celery_app
        #: Milliseconds between two paced replays; whole, as Redis keeps the schedule.
        self.interval_ms = max(1, round(1000 / settings.replay_rate))
        self.window_ms = int(settings.visibility_timeout * 1000 * REPLAY_WINDOW_SHARE)
        self._page = self.redis.register_script(_PAGE)
        self._reserve_slots = self.redis.register_script(_RESERVE_SLOTS)
        self._replay = self.redis.register_script(_REPLAY)
        self._delete = self.redis.register_script(_DELETE)
        self._refuse = self.redis.register_script(_REFUSE)
        self._purge = self.redis.register_script(_PURGE)

    # -- reading -----------------------------------------------------------------------

    def get(self, event_id: str) -> dict[str, Any] | None:
        """The dead letter with its audit trail, or ``None`` if it is not in the queue."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(DLQ_KEY, event_id)
        pipe.get(dead_letter_key(event_id))
        pipe.lrange(audit_key(event_id), 0, -1)
        score, raw, audit = pipe.execute()
        if score is None or raw is None:
            return None
        letter: dict[str, Any] = json.loads(raw)
        letter["audit"] = [json.loads(entry) for entry in audit]
        return letter

    def audit(self, event_id: str) -> list[dict[str, Any]]:
        """The audit trail of an event's dead letters, oldest first (kept after replays)."""
        return [json.loads(entry) for entry in self.redis.lrange(audit_key(event_id), 0, -1)]

    def letters(
        self, flt: LetterFilter, after: tuple[int, str] | None = None
    ) -> Iterator[tuple[tuple[int, str], dict[str, Any]]]:
        """Every matching dead letter, newest first, with its position for a cursor.

        Read ``SCAN_BATCH`` at a time, each batch strictly after the last letter of the
        one before (whether or not that letter is still there), so letters added or
        removed meanwhile neither repeat nor hide others.
        """
        max_score = "+inf" if flt.until_ms is None else str(flt.until_ms - 1)
        min_score = "-inf" if flt.since_ms is None else str(flt.since_ms)
        while True:
            cursor_score, cursor_id = after if after is not None else ("", "")
            flat = self._page(keys=[DLQ_KEY],
                              args=[max_score, min_score, cursor_score, cursor_id, SCAN_BATCH])
            if not flat:
                return
            positions = [(int(float(flat[i + 1])), _text(flat[i])) for i in range(0, len(flat), 2)]
            raws = self.redis.mget([dead_letter_key(event_id) for _, event_id in positions])
            for position, raw in zip(positions, raws, strict=True):
                after = position
                if raw is None:  # replayed or deleted since the page was read
                    continue
                letter = json.loads(raw)
                if flt.matches(letter):
                    yield position, letter
            if len(positions) < SCAN_BATCH:
                return

    def page(self, flt: LetterFilter, limit: int, cursor: str | None = None) -> Page:
        """Up to ``limit`` dead letters after ``cursor``, newest first (raises InvalidCursor)."""
        after = decode_cursor(cursor) if cursor else None
        items: list[dict[str, Any]] = []
        last: tuple[int, str] | None = None
        for position, letter in self.letters(flt, after):
            items.append(summary(letter))
            last = position
            if len(items) == limit:
                break
        return Page(items, encode_cursor(last) if last and len(items) == limit else None)

    # -- replaying ---------------------------------------------------------------------

    def replay(self, event_id: str, by: str) -> ReplayOutcome:
        """Queue one dead letter again (same id), unless it fails today's schema."""
        raw = self.redis.get(dead_letter_key(event_id))
        if raw is None or self.redis.zscore(DLQ_KEY, event_id) is None:
            return ReplayOutcome(event_id, "missing")
        letter = json.loads(raw)
        errors = schema_errors(letter["event"])
        if errors:
            self._record_refusal(event_id, by, errors)
            return ReplayOutcome(event_id, "invalid", errors=errors)
        outcomes, retry_after = self._queue([letter], by)
        return outcomes[0] if outcomes else ReplayOutcome(event_id, "deferred",
                                                          retry_after=retry_after)

    def replay_matching(
        self, flt: LetterFilter, by: str, *, dry_run: bool = False, limit: int | None = None
    ) -> ReplayReport:
        """Replay the matching dead letters that failed before now, paced.

        Letters that fail again meanwhile are not taken a second time. When the replay
        schedule is full (``REPLAY_WINDOW_SHARE``), the rest stay in the queue and are
        counted as ``deferred``, with ``retry_after``: call again with the same filter.
        """
        flt = self.snapshot(flt)
        report = ReplayReport(dry_run)
        matching = self.letters(flt)
        while limit is None or len(report.replayed) + len(report.rejected) < limit:
            room = REPLAY_BATCH if limit is None else min(
                REPLAY_BATCH, limit - len(report.replayed) - len(report.rejected))
            batch = [letter for _, letter in itertools.islice(matching, room)]
            if not batch:
                break
            valid = []
            for letter in batch:
                errors = schema_errors(letter["event"])
                if errors:
                    if not dry_run:
                        self._record_refusal(str(letter["id"]), by, errors)
                    report.rejected.append({"id": letter["id"], "reason": "invalid",
                                            "errors": errors})
                elif dry_run:
                    report.replayed.append(str(letter["id"]))
                else:
                    valid.append(letter)
            if not valid:
                continue
            outcomes, retry_after = self._queue(valid, by)
            for outcome in outcomes:
                if outcome.state == "queued":
                    report.replayed.append(outcome.event_id)
                else:
                    report.skipped.append(outcome.event_id)
            if retry_after is not None:  # the schedule is full: count what is left
                report.retry_after = retry_after
                report.deferred = len(valid) - len(outcomes) + sum(1 for _ in matching)
                break
        return report

    def snapshot(self, flt: LetterFilter) -> LetterFilter:
        """``flt`` limited to the letters that failed up to now."""
        return flt.failed_before(int(self.store.clock.now() * 1000) + 1)

    def _queue(
        self, letters: Sequence[Mapping[str, Any]], by: str
    ) -> tuple[list[ReplayOutcome], float | None]:
        """Queue these letters (which pass today's schema) again, paced, in two round trips.

        Returns the outcome of each letter that found room in the replay schedule, in
        order, and, if some did not, the seconds until there is room again.
        """
        slot_ms, now_ms, taken, wait_ms = self._reserve_slots(
            keys=[REPLAY_SCHEDULE_KEY], args=[self.interval_ms, self.window_ms, len(letters)])
        retry_after = round(wait_ms / 1000 + 0.05, 2) if taken < len(letters) else None
        store = self.store
        now, now_ms_local = store.now(), int(store.clock.now() * 1000)
        pipe = self.redis.pipeline(transaction=False) if taken > 1 else None
        outcomes, states = [], []
        for letter in letters[:taken]:
            event_id = str(letter["id"])
            eta = datetime.fromtimestamp(slot_ms / 1000, UTC) if slot_ms > now_ms else None
            scheduled_for = isoformat(slot_ms / 1000) if eta else None
            slot_ms += self.interval_ms
            task_id = str(uuid.uuid4())
            message = build_task_message(self.celery_app, task_id, (event_id,), eta=eta)
            event = letter["event"]
            details = {"by": by, "task_id": task_id,
                       **({"scheduled_for": scheduled_for} if scheduled_for else {})}
            # Written again only if the event's own record was lost: the letter keeps it all.
            recreate = ["id", event_id, "user_id", event["user_id"],
                        "event_type", event["event_type"], "payload", _json(event["payload"]),
                        "producer", letter.get("producer") or "",
                        "attempts", str(letter["attempts"]), "created_at", letter["failed_at"]]
            states.append(self._replay(
                keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id),
                      history_key(event_id), message.queue, STATS_KEY, audit_key(event_id),
                      AUDIT_INDEX_KEY, lease_key(event_id), quota_key(event["user_id"]),
                      WATCH_KEY, operation_key(task_id)],
                args=[event_id, now, now_ms_local, store.entry("replayed", **details),
                      message.payload,
                      _json({"action": "replay", "at": now, "outcome": "queued", **details}),
                      OPERATION_TTL, *recreate],
                **({"client": pipe} if pipe is not None else {}),
            ))
            outcomes.append(ReplayOutcome(event_id, "", task_id=task_id,
                                          scheduled_for=scheduled_for))
        if pipe is not None:
            states = pipe.execute()
        return ([replace(outcome, state=_text(state))
                 for outcome, state in zip(outcomes, states, strict=True)], retry_after)

    def _record_refusal(self, event_id: str, by: str, errors: Mapping[str, Any]) -> None:
        # The letter stays in the queue; the refusal joins its audit trail and timeline.
        store = self.store
        self._refuse(
            keys=[audit_key(event_id), AUDIT_INDEX_KEY, history_key(event_id), STATS_KEY,
                  operation_key(str(uuid.uuid4()))],
            args=[event_id, int(store.clock.now() * 1000),
                  _json({"action": "replay", "at": store.now(), "by": by, "outcome": "invalid",
                         "errors": errors}),
                  store.entry("replay_refused", by=by, errors=errors), OPERATION_TTL],
        )

    # -- removing ----------------------------------------------------------------------

    def delete(self, event_id: str, by: str) -> bool:
        """Delete one dead letter (its audit trail records it); ``False`` if unknown."""
        store = self.store
        deleted = self._delete(
            keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id), history_key(event_id),
                  audit_key(event_id), AUDIT_INDEX_KEY, operation_key(str(uuid.uuid4()))],
            args=[event_id, int(store.clock.now() * 1000),
                  _json({"action": "deleted", "at": store.now(), "by": by}),
                  store.entry("dead_letter_deleted", by=by), store.retention_seconds,
                  OPERATION_TTL],
        )
        return bool(deleted)

    def purge(self, older_than_seconds: float, by: str, *, dry_run: bool = False) -> PurgeReport:
        """Remove dead letters that failed longer ago than this, and old audit trails."""
        store = self.store
        cutoff = int((store.clock.now() - older_than_seconds) * 1000)
        candidates = {_text(m) for m in self.redis.zrangebyscore(DLQ_KEY, "-inf", f"({cutoff}")}
        candidates |= {_text(m) for m in
                       self.redis.zrangebyscore(AUDIT_INDEX_KEY, "-inf", f"({cutoff}")}
        letters = trails = 0
        entry = store.entry("dead_letter_purged", by=by)
        ordered = iter(sorted(candidates))
        while batch := list(itertools.islice(ordered, REPLAY_BATCH)):
            pipe = self.redis.pipeline(transaction=False)
            for event_id in batch:
                self._purge(
                    keys=[DLQ_KEY, dead_letter_key(event_id), event_key(event_id),
                          history_key(event_id), audit_key(event_id), AUDIT_INDEX_KEY],
                    args=[event_id, cutoff, entry, store.retention_seconds,
                          "1" if dry_run else "0"],
                    client=pipe,
                )
            for purged_letter, purged_trail in pipe.execute():
                letters += int(purged_letter)
                trails += int(purged_trail)
        return PurgeReport(letters, trails)


def summary(letter: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter as listed: without the history and audit trail."""
    return {name: letter.get(name) for name in
            ("id", "event", "producer", "error_type", "error", "attempts", "failed_at")}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
