"""The state of every event in Redis: its record, its timeline and its delivery ledger.

Every change of an event's status is written together with its history entry and the
counters that ``/stats`` and ``/metrics`` read, in one atomic step (a Lua script or a
``MULTI`` block), so the figures never disagree with the records.

Keys (all under ``ef:``):

- ``ef:ev:<id>``: hash, the event record and its ledger fields (``send``, ``claimed``,
  ``losses``, ``quota``);
- ``ef:hist:<id>``: list of JSON history entries;
- ``ef:lease:<id>``: held by the one worker run that is working on the event;
- ``ef:quota:<user_id>``: sorted set of the event ids that used the user's quota, scored
  by time (a moving-window log);
- ``ef:idem:<producer>:<key>``: the first response to an ``Idempotency-Key``;
- ``ef:stats`` and ``ef:timing``: the pipeline counters and the send-duration histogram.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from eventflow.clock import Clock, isoformat
from eventflow.enqueue import TaskMessage

PREFIX = "ef:"
STATS_KEY = PREFIX + "stats"
TIMING_KEY = PREFIX + "timing"
#: Sorted set of unfinished events by the time a run last took them (or they were
#: accepted): what the stalled-event sweep looks at.
WATCH_KEY = PREFIX + "watch"

#: How long a finished event and its history stay readable.
RETENTION_SECONDS = 8 * 86400
#: How long an ``Idempotency-Key`` is remembered.
IDEMPOTENCY_SECONDS = 86400

#: Upper bounds of the send-duration histogram buckets, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FINAL_STATUSES = frozenset({"delivered", "rate_limited", "dead_lettered"})


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


# Store the event, its first history entry and its Celery message at once, unless the
# Idempotency-Key (KEYS[5], may be empty) has already been used: then return the first
# answer instead. ARGV: history entry, message, idempotency value, then field/value pairs.
_ACCEPT = """
if KEYS[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return prior end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'accepted', 1)
redis.call('LPUSH', KEYS[4], ARGV[2])
if KEYS[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[3], 'EX', IDEMPOTENCY_SECONDS)
end
redis.call('ZADD', KEYS[6], redis.call('TIME')[1], string.sub(KEYS[1], 7))
return false
""".replace("IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))

# Take the event for one worker run. Returns {state, lease ms left, losses, record...}:
# state is the event's status, 'missing', or 'busy' when another run holds the lease.
# A run that finds ``claimed`` still set knows the previous run died without finishing.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0, 0} end
if status == 'delivered' or status == 'rate_limited' or status == 'dead_lettered' then
  return {status, 0, 0}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'busy', redis.call('PTTL', KEYS[2]), 0}
end
redis.call('ZADD', KEYS[3], redis.call('TIME')[1], string.sub(KEYS[1], 7))
local losses = 0
if redis.call('HGET', KEYS[1], 'claimed') == '1' then
  losses = redis.call('HINCRBY', KEYS[1], 'losses', 1)
else
  redis.call('HSET', KEYS[1], 'claimed', '1')
end
local result = {status, 0, losses}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(result, v) end
return result
"""

# Reserve one unit of the user's quota for this event, once: a moving-window log of the
# event ids that were granted, on Redis's own clock so that every host agrees.
# ARGV: window ms, limit, event id. Returns {granted, used}.
_RESERVE_QUOTA = """
if redis.call('HGET', KEYS[1], 'quota') == '1' then return {1, -1} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
local used = redis.call('ZCARD', KEYS[2])
if used >= tonumber(ARGV[2]) then return {0, used} end
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'quota', '1')
return {1, used + 1}
"""

# Mark the send as started in the ledger before talking SMTP. If the previous run had
# started a send and never recorded its outcome, this send may be a second one: count it.
# ARGV: now. Returns {attempt number, ambiguous}.
_BEGIN_SEND = """
local ambiguous = 0
if redis.call('HGET', KEYS[1], 'send') == 'started' then
  ambiguous = 1
  redis.call('HINCRBY', KEYS[2], 'ambiguous', 1)
end
redis.call('HSET', KEYS[1], 'send', 'started', 'status', 'sending', 'updated_at', ARGV[1])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {attempt, ambiguous}
"""


# Give a stalled event a new task message: one that is unfinished, that no run holds, and
# that no run has taken for ARGV[2] seconds (its message was lost with a worker killed
# between popping it and recording it as unacknowledged). A duplicate message is harmless:
# the claim and the ledger make a second run do nothing. ARGV: id, seconds, message,
# history entry. Returns what it found: finished, busy, fresh or requeued.
_REQUEUE_STALLED = """
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'delivered' or status == 'rate_limited'
    or status == 'dead_lettered' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'finished'
end
local now = tonumber(redis.call('TIME')[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  return 'busy'
end
local seen = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or 0)
if seen > now - tonumber(ARGV[2]) then return 'fresh' end
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[3])
redis.call('RPUSH', KEYS[5], ARGV[4])
return 'requeued'
"""


@dataclass(frozen=True)
class Claim:
    """What a worker run learnt when it took an event."""

    state: str
    lease_left_ms: int = 0
    losses: int = 0
    record: Mapping[str, str] | None = None


class EventStore:
    """Reads and writes event state in Redis."""

    def __init__(self, client: redis.Redis, clock: Clock) -> None:
        self.redis = client
        self.clock = clock
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._reserve_quota = client.register_script(_RESERVE_QUOTA)
        self._begin_send = client.register_script(_BEGIN_SEND)
        self._requeue_stalled = client.register_script(_REQUEUE_STALLED)

    def now(self) -> str:
        return isoformat(self.clock.now())

    def entry(self, step: str, **details: Any) -> str:
        """A history entry as stored: the step, its time and what else is known."""
        return json.dumps({"step": step, "at": self.now(), **details}, separators=(",", ":"))

    # -- the web side ------------------------------------------------------------------

    def accept_fields(self, event_id: str, event: Mapping[str, Any], producer: str) -> list[str]:
        """The field/value pairs of a newly accepted event."""
        now = self.now()
        return [
            "id", event_id,
            "user_id", event["user_id"],
            "event_type", event["event_type"],
            "payload", json.dumps(event["payload"], separators=(",", ":")),
            "producer", producer,
            "status", "queued",
            "attempts", "0",
            "created_at", now,
            "updated_at", now,
        ]

    def accept(
        self,
        event_id: str,
        event: Mapping[str, Any],
        producer: str,
        message: TaskMessage,
        idempotency: tuple[str, str] | None = None,
        client: Any = None,
    ) -> str | None:
        """Store a new event with its message, atomically.

        ``idempotency`` is ``(redis key, value to remember)``. Returns the remembered
        value when that key was used before (nothing is stored then), else ``None``.
        With ``client`` a pipeline, the call is only queued on it.
        """
        idem_key, idem_value = idempotency or ("", "")
        result = self._accept(
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, message.queue, idem_key,
                  WATCH_KEY],
            args=[
                self.entry("accepted", producer=producer),
                message.payload,
                idem_value,
                *self.accept_fields(event_id, event, producer),
            ],
            client=client,
        )
        return None if result is None or client is not None else _text(result)

    def get(self, event_id: str) -> dict[str, str] | None:
        """The stored record of an event, or ``None``."""
        record = self.redis.hgetall(event_key(event_id))
        return {_text(k): _text(v) for k, v in record.items()} or None

    def history(self, event_id: str) -> list[dict[str, Any]]:
        """Every step the event went through, oldest first."""
        return [json.loads(item) for item in self.redis.lrange(history_key(event_id), 0, -1)]

    def get_with_history(self, event_id: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The record and its history in one round trip; an empty record if unknown."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(event_key(event_id))
        pipe.lrange(history_key(event_id), 0, -1)
        record, history = pipe.execute()
        return (
            {_text(k): _text(v) for k, v in record.items()},
            [json.loads(item) for item in history],
        )

    # -- the worker side ---------------------------------------------------------------

    def claim(self, event_id: str, token: str, lease_ms: int) -> Claim:
        """Take the event for this run, unless it is finished or another run has it."""
        reply = self._claim(keys=[event_key(event_id), lease_key(event_id), WATCH_KEY],
                            args=[token, lease_ms])
        state, lease_left, losses, *flat = reply
        record = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Claim(_text(state), int(lease_left), int(losses), record or None)

    def reserve_quota(self, event_id: str, user_id: str, limit: int, window_seconds: int) -> bool:
        """Use one unit of the user's quota for this event; ``True`` if it was granted.

        An event uses the quota once: a retry or a redelivery of it is granted again.
        """
        granted, _ = self._reserve_quota(
            keys=[event_key(event_id), quota_key(user_id)],
            args=[window_seconds * 1000, limit, event_id],
        )
        return bool(granted)

    def quota_used(self, user_id: str, window_seconds: int) -> int:
        """How many emails the user was granted in the current window."""
        now_ms = int(self.clock.now() * 1000)
        return int(self.redis.zcount(quota_key(user_id), now_ms - window_seconds * 1000, "+inf"))

    def begin_send(self, event_id: str) -> tuple[int, bool]:
        """Record in the ledger that a send starts: ``(attempt number, ambiguous)``."""
        attempt, ambiguous = self._begin_send(
            keys=[event_key(event_id), STATS_KEY], args=[self.now()]
        )
        return int(attempt), bool(ambiguous)

    def mark_delivered(self, event_id: str, attempt: int, reply: str, duration: float) -> None:
        """The server answered 250: the event is delivered, in one step with its ledger."""
        now = self.now()
        pipe = self.redis.pipeline()
        pipe.hset(
            event_key(event_id),
            mapping={"status": "delivered", "send": "done", "delivered_at": now,
                     "updated_at": now, "claimed": "0"},
        )
        pipe.rpush(
            history_key(event_id),
            self.entry("attempt", attempt=attempt, outcome="delivered", smtp_reply=reply,
                       duration_ms=round(duration * 1000, 1)),
            self.entry("delivered"),
        )
        pipe.hincrby(STATS_KEY, "delivered", 1)
        pipe.zrem(WATCH_KEY, event_id)
        self._observe_duration(pipe, duration)
        self._expire(pipe, event_id)
        pipe.delete(lease_key(event_id))
        pipe.execute()

    def mark_failed_attempt(
        self,
        event_id: str,
        attempt: int,
        kind: str,
        error: str,
        details: Mapping[str, Any],
        duration: float,
        retry_in: float | None,
    ) -> None:
        """An attempt failed; with ``retry_in`` the event waits for its next attempt."""
        pipe = self.redis.pipeline()
        fields: dict[Any, Any] = {"send": "", "last_error": error, "updated_at": self.now(), "claimed": "0"}
        if retry_in is not None:
            fields["status"] = "retrying"
            pipe.hincrby(STATS_KEY, "retried", 1)
        pipe.hset(event_key(event_id), mapping=fields)
        pipe.rpush(
            history_key(event_id),
            self.entry("attempt", attempt=attempt, outcome=kind, error=error, **details,
                       duration_ms=round(duration * 1000, 1),
                       **({"retry_in_s": round(retry_in, 3)} if retry_in is not None else {})),
        )
        pipe.hincrby(STATS_KEY, f"failures_{kind}", 1)
        self._observe_duration(pipe, duration)
        if retry_in is not None:
            pipe.delete(lease_key(event_id))
        pipe.execute()

    def mark_rate_limited(self, event_id: str, limit: str) -> None:
        """The user's quota is used up: the event is not sent."""
        pipe = self.redis.pipeline()
        pipe.hset(
            event_key(event_id),
            mapping={"status": "rate_limited", "updated_at": self.now(), "claimed": "0",
                     "last_error": f"rate limit {limit} reached for this user"},
        )
        pipe.rpush(history_key(event_id), self.entry("rate_limit", decision="refused", limit=limit))
        pipe.hincrby(STATS_KEY, "rate_limited", 1)
        pipe.zrem(WATCH_KEY, event_id)
        self._expire(pipe, event_id)
        pipe.delete(lease_key(event_id))
        pipe.execute()

    def note(self, event_id: str, step: str, **details: Any) -> None:
        """Add a history entry that changes nothing else."""
        self.redis.rpush(history_key(event_id), self.entry(step, **details))

    def release(self, event_id: str) -> None:
        """Give the event back without an outcome (the run is handing it on)."""
        pipe = self.redis.pipeline()
        pipe.hset(event_key(event_id), "claimed", "0")
        pipe.delete(lease_key(event_id))
        pipe.execute()

    def stalled(self, older_than: float, limit: int = 500) -> list[str]:
        """Unfinished events that no run has taken for ``older_than`` seconds."""
        now = float(self.redis.time()[0])
        found = self.redis.zrangebyscore(WATCH_KEY, "-inf", now - older_than, start=0, num=limit)
        return [_text(event_id) for event_id in found]

    def requeue_stalled(self, event_id: str, older_than: float, message: TaskMessage) -> str:
        """Give a stalled event a new message if it still needs one; returns what it did."""
        return _text(self._requeue_stalled(
            keys=[event_key(event_id), lease_key(event_id), WATCH_KEY, message.queue,
                  history_key(event_id)],
            args=[event_id, older_than, message.payload,
                  self.entry("requeued", reason="stalled: its task message was lost")],
        ))

    # -- figures -----------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The pipeline counters, as integers."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def timing(self) -> dict[str, float]:
        """The send-duration histogram: ``le:<bound>`` counts, ``count`` and ``sum``."""
        return {_text(k): float(v) for k, v in self.redis.hgetall(TIMING_KEY).items()}

    def incr(self, counter: str, amount: int = 1, client: Any = None) -> None:
        (client or self.redis).hincrby(STATS_KEY, counter, amount)

    def _observe_duration(self, pipe: Any, seconds: float) -> None:
        # Cumulative buckets, as Prometheus wants them, so a read needs no arithmetic.
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(TIMING_KEY, f"le:{bound}", 1)
        pipe.hincrby(TIMING_KEY, "count", 1)
        pipe.hincrbyfloat(TIMING_KEY, "sum", seconds)

    def _expire(self, pipe: Any, event_id: str) -> None:
        pipe.expire(event_key(event_id), RETENTION_SECONDS)
        pipe.expire(history_key(event_id), RETENTION_SECONDS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

