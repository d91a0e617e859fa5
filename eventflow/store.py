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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from eventflow.clock import Clock, isoformat
from eventflow.enqueue import TaskMessage
from eventflow.scripts import ThreadScript

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


#: The GCRA of the API rate limit (``eventflow/throttle.py`` explains it), as a Lua
#: function shared by the throttle's own script and the accept script below:
#: ``gcra(key, limit, window ms)`` counts one request unless it is refused and returns
#: allowed (1/0), remaining, reset ms, retry-after ms and Redis's time in ms.
GCRA_LUA = """
local function gcra(key, limit, window)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = window / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allowed, retry = 1, 0
  if new_tat - now > window + 0.001 then
    allowed, retry, new_tat = 0, new_tat - now - window, tat
  else
    redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
  end
  local remaining = math.floor((window - (new_tat - now)) / interval + 0.000001)
  return allowed, remaining, math.ceil(new_tat - now), math.ceil(retry), now
end
"""

# Count the request against the producer's API rate limit (KEYS[7], '' for none: then
# nothing is counted nor read); if allowed, read the
# user's quota (KEYS[8]) and store the event, its first history entry and its Celery
# message at once, unless the Idempotency-Key (KEYS[5], may be empty) has already been
# used: then return the first answer instead. A refused request stores nothing.
# ARGV: history entry, message, API limit, API window ms, quota window ms, quota limit,
# the answer to remember around the quota left (prefix, suffix), then the event's id,
# user id, event type, payload (JSON), producer and time (the fields of accept_fields).
# Returns {allowed, remaining, reset ms, retry-after ms, quota used, first answer or ''}.
#
# Run twice (the client sends it again when the connection broke after it went out):
# the event's id is chosen once per call, so a record that exists is this call's own,
# stored by the first run and perhaps already delivered since. The second run changes
# nothing and counts nothing; it answers as the first did, the rate-limit figures read
# without counting the request again.
_ACCEPT = GCRA_LUA + """
local function gcra_peek(key, limit, window)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local remaining = math.floor((window - (tat - now)) / (window / limit) + 0.000001)
  return 1, remaining, math.ceil(tat - now), 0, now
end
local again = redis.call('EXISTS', KEYS[1]) == 1
local allowed, remaining, reset, retry, now, used = 1, 0, 0, 0, 0, 0
if KEYS[7] ~= '' then
  local count = gcra
  if again then count = gcra_peek end
  allowed, remaining, reset, retry, now = count(KEYS[7], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if allowed == 0 then return {0, remaining, reset, retry, 0, ''} end
  used = redis.call('ZCOUNT', KEYS[8], now - tonumber(ARGV[5]), '+inf')
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000
end
local verdict = {1, remaining, reset, retry, used, ''}
if again then
  -- Written again, unchanged: a WAIT after this call then also covers the first run.
  redis.call('HSET', KEYS[1], 'id', ARGV[9])
  return verdict
end
if KEYS[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then
    -- Written again, unchanged: a WAIT after this call then also covers the first write.
    redis.call('SET', KEYS[5], prior, 'KEEPTTL')
    verdict[6] = prior
    return verdict
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[9], 'user_id', ARGV[10], 'event_type', ARGV[11],
           'payload', ARGV[12], 'producer', ARGV[13], 'status', 'queued', 'attempts', '0',
           'created_at', ARGV[14], 'updated_at', ARGV[14])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'accepted', 1)
redis.call('LPUSH', KEYS[4], ARGV[2])
if KEYS[5] ~= '' then
  local left = math.max(tonumber(ARGV[6]) - used, 0)
  redis.call('SET', KEYS[5], ARGV[7] .. string.format('%d', left) .. ARGV[8],
             'EX', IDEMPOTENCY_SECONDS)
end
redis.call('ZADD', KEYS[6], math.floor(now / 1000), string.sub(KEYS[1], 7))
return verdict
""".replace("IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))

# Store a batch of events at once, each with its first history entry and its Celery
# message, and the answer to the batch's Idempotency-Key with them, unless that key was
# used before: then store nothing and return the first answer. KEYS: stats, queue, watch,
# the Idempotency-Key ('' for none), then the record and history keys of each event.
# ARGV: producer, time, history entry, the answer to remember ('' for none), then 5
# values per event: id, user id, event type, payload (JSON) and message.
# Returns {how many were stored, first answer or ''}.
#
# Run twice (a reply lost, the call sent again): the ids are chosen once per call, so
# an existing first record, or a remembered answer equal to this call's own, is this
# call's first run; the second run changes nothing and answers as the first did.
_ACCEPT_BATCH = """
local producer, now, entry, answer = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local total = (#ARGV - 4) / 5
-- An answer given before is written again, unchanged: a WAIT after this call (with
-- EVENTFLOW_REDIS_MIN_REPLICAS) then also covers the first run's writes.
if KEYS[4] ~= '' then
  local prior = redis.call('GET', KEYS[4])
  if prior then redis.call('SET', KEYS[4], prior, 'KEEPTTL') end
  if prior == answer then return {total, ''} end
  if prior then return {0, prior} end
end
if total > 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'id', ARGV[5])
  return {total, ''}
end
local watched = tonumber(redis.call('TIME')[1])
local count = 0
local messages, watch = {}, {}
for i = 5, #ARGV, 5 do
  local id = ARGV[i]
  local k = 5 + 2 * count
  redis.call('HSET', KEYS[k], 'id', id, 'user_id', ARGV[i + 1],
             'event_type', ARGV[i + 2], 'payload', ARGV[i + 3], 'producer', producer,
             'status', 'queued', 'attempts', '0', 'created_at', now, 'updated_at', now)
  redis.call('RPUSH', KEYS[k + 1], entry)
  count = count + 1
  messages[count] = ARGV[i + 4]
  watch[2 * count - 1] = watched
  watch[2 * count] = id
end
if count > 0 then
  -- One call each for all the messages (in the order of as many LPUSHes) and watch entries.
  redis.call('LPUSH', KEYS[2], unpack(messages))
  redis.call('ZADD', KEYS[3], unpack(watch))
  redis.call('HINCRBY', KEYS[1], 'accepted', count)
end
if KEYS[4] ~= '' then
  redis.call('SET', KEYS[4], answer, 'EX', IDEMPOTENCY_SECONDS)
end
return {count, ''}
""".replace("IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))

# Take the event for one worker run. Returns {state, lease ms left, losses, record...}:
# state is the event's status, 'missing', or 'busy' when another run holds the lease.
# A run that finds ``claimed`` still set knows the previous run died without finishing.
_CLAIM_LUA = """
local function claim_event(event, lease, watch, token, lease_ms)
  local status = redis.call('HGET', event, 'status')
  if not status then return {'missing', 0, 0} end
  if status == 'delivered' or status == 'rate_limited' or status == 'dead_lettered' then
    return {status, 0, 0}
  end
  if not redis.call('SET', lease, token, 'NX', 'PX', lease_ms) then
    return {'busy', redis.call('PTTL', lease), 0}
  end
  -- The run that holds the event, kept in the record (the lease expires, and the next
  -- run deletes it when done): what fences every write of a run (_FENCE_LUA).
  redis.call('HSET', event, 'run', token)
  redis.call('ZADD', watch, redis.call('TIME')[1], string.sub(event, 7))
  local losses = 0
  if redis.call('HGET', event, 'claimed') == '1' then
    losses = redis.call('HINCRBY', event, 'losses', 1)
  else
    redis.call('HSET', event, 'claimed', '1')
  end
  local result = {status, 0, losses}
  for _, v in ipairs(redis.call('HGETALL', event)) do table.insert(result, v) end
  return result
end
"""

# Reserve one unit of the user's quota for this event, once: a moving-window log of the
# event ids that were granted, on Redis's own clock so that every host agrees.
# Arguments: window ms, limit, event id. Returns {granted, used}.
_RESERVE_QUOTA_LUA = """
local function reserve_quota(event, quota, window, limit, event_id)
  if redis.call('HGET', event, 'quota') == '1' then return {1, -1} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', quota, '-inf', now - tonumber(window))
  local used = redis.call('ZCARD', quota)
  if used >= tonumber(limit) then return {0, used} end
  redis.call('ZADD', quota, now, event_id)
  redis.call('PEXPIRE', quota, window)
  redis.call('HSET', event, 'quota', '1')
  return {1, used + 1}
end
"""

# Mark the send as started in the ledger before talking SMTP. If the previous run had
# started a send and never recorded its outcome, this send may be a second one: count it.
# Argument: now. Returns {attempt number, ambiguous}.
_BEGIN_SEND_LUA = """
local function begin_send(event, stats, now)
  local ambiguous = 0
  if redis.call('HGET', event, 'send') == 'started' then
    ambiguous = 1
    redis.call('HINCRBY', stats, 'ambiguous', 1)
  end
  redis.call('HSET', event, 'send', 'started', 'status', 'sending', 'updated_at', now)
  local attempt = redis.call('HINCRBY', event, 'attempts', 1)
  return {attempt, ambiguous}
end
"""

# A worker run's whole start in one round trip: claim the event; note a lost previous run
# (and stop there when the event has lost too many); reserve its quota (and stop there
# when refused); begin the send in the ledger, noting an ambiguous one. The same steps,
# in the same order, as the functions above. The quota key is the record's
# user's, known only here (a single Redis, not a cluster: any key may be named).
# KEYS: event, lease, watch, stats, history. ARGV: token, lease ms, quota window ms,
# quota limit, event id, now, most worker losses.
# Returns {state, lease ms left, losses, step reached ('lost', 'failed', 'refused' or 'send'),
# attempt, ambiguous, record as claimed...}; only the first three when it was not taken.
#
# Run twice (a reply lost, the call sent again): the token is the call's own, and the
# record's ``take`` field keeps it with the first run's answer, so the second run finds
# its own claim (not a lease held by "another" run), counts nothing again and returns
# that answer, with the record as it is now. A run that did not take the event changed
# nothing, and a second run finds the same.
_TAKE = _CLAIM_LUA + _RESERVE_QUOTA_LUA + _BEGIN_SEND_LUA + """
local taken = redis.call('HGET', KEYS[1], 'take')
if taken and string.sub(taken, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  local reply = cjson.decode(string.sub(taken, #ARGV[1] + 2))
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(reply, v) end
  return reply
end
local claim = claim_event(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
if #claim <= 3 then return claim end
local losses = claim[3]
local record = {}
for i = 4, #claim, 2 do record[claim[i]] = claim[i + 1] end
local function note(step, name, value)
  redis.call('RPUSH', KEYS[5], '{"step":"' .. step .. '","at":"' .. ARGV[6] .. '","'
             .. name .. '":' .. string.format('%d', value) .. '}')
end
local reply = {claim[1], claim[2], losses, 'send', 0, 0}
if losses > 0 then
  note('worker_lost', 'losses', losses)
  if losses >= tonumber(ARGV[7]) then reply[4] = 'lost' end
end
-- Failed for good, its dead letter not written yet: no send, the run writes it.
if reply[4] == 'send' and record['failed_as'] then reply[4] = 'failed' end
if reply[4] == 'send' then
  local quota = reserve_quota(KEYS[1], 'ef:quota:' .. (record['user_id'] or ''), ARGV[3],
                              ARGV[4], ARGV[5])
  if quota[1] == 0 then reply[4] = 'refused' end
end
if reply[4] == 'send' then
  local started = begin_send(KEYS[1], KEYS[4], ARGV[6])
  reply[5], reply[6] = started[1], started[2]
  if started[2] == 1 then note('ambiguous_resend', 'attempt', started[1]) end
end
redis.call('HSET', KEYS[1], 'take', ARGV[1] .. ' ' .. cjson.encode(reply))
for i = 4, #claim do table.insert(reply, claim[i]) end
return reply
"""


# Fencing: a run writes only while the record names it as the run holding the event
# (set by the claim). A run whose lease ran out while it was cut off, and whose event a
# newer run took, changes nothing when its write arrives late but the history, where its
# ``superseded`` entry tells what it saw. An empty token (a caller outside a run) and a
# record no run has claimed since this field exists are not fenced.
_FENCE_LUA = """
local function fenced(event, history, token, superseded)
  local holder = redis.call('HGET', event, 'run')
  if token == '' or not holder or holder == token then return true end
  redis.call('RPUSH', history, superseded)
  return false
end
"""


# The server answered 250: the record, its history, the counters, the send-duration
# histogram and the lease, in one step. KEYS: event, history, stats, watch, timing, lease.
# ARGV: now, the attempt's and the delivered history entries, event id, retention
# seconds, duration seconds, then the histogram buckets the duration falls in.
# Returns 1, or 0 when the event was delivered already.
#
# Run twice (a reply lost, the call sent again), or by a second run whose send was also
# answered 250: the event is delivered once and counted once. The first run's entries
# end its history, and a second run finds them there and changes nothing; another run's
# 250 is added to the history as its attempt, and nothing else.
_DELIVERED = _FENCE_LUA + """
if not fenced(KEYS[1], KEYS[2], ARGV[7], ARGV[8]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'delivered' then
  local last = redis.call('LINDEX', KEYS[2], -1)
  if last ~= ARGV[3] and last ~= ARGV[2] then redis.call('RPUSH', KEYS[2], ARGV[2]) end
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'delivered', 'send', 'done', 'delivered_at', ARGV[1],
           'updated_at', ARGV[1], 'claimed', '0')
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'delivered', 1)
redis.call('ZREM', KEYS[4], ARGV[4])
for i = 9, #ARGV do redis.call('HINCRBY', KEYS[5], ARGV[i], 1) end
redis.call('HINCRBY', KEYS[5], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[5], 'sum', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[6])
return 1
"""


# One failed attempt: its history entry, the ledger reset, the counters and the
# send-duration histogram; when it will be retried, the status ``retrying`` and the lease
# given back. KEYS: event, history, stats, timing, lease. ARGV: now, history entry, error,
# failure kind, retried ('1' or '0'), duration seconds, the error type to dead-letter it
# as ('' for none: kept in the record so that a later run dead-letters it without sending
# again if the dead letter itself could not be written), then the histogram buckets the
# duration falls in. Returns 1, or 0 when it was recorded already.
#
# Run twice (a reply lost, the call sent again): the entry, unique to the attempt (its
# number, time and duration), ends the history after the first run, which the second
# finds there: it changes nothing.
_FAILED_ATTEMPT = _FENCE_LUA + """
if not fenced(KEYS[1], KEYS[2], ARGV[8], ARGV[9]) then return 0 end
if redis.call('LINDEX', KEYS[2], -1) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'send', '', 'last_error', ARGV[3], 'updated_at', ARGV[1],
           'claimed', '0')
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'failures_' .. ARGV[4], 1)
for i = 10, #ARGV do redis.call('HINCRBY', KEYS[4], ARGV[i], 1) end
redis.call('HINCRBY', KEYS[4], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[4], 'sum', ARGV[6])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'status', 'retrying')
  redis.call('HINCRBY', KEYS[3], 'retried', 1)
  redis.call('DEL', KEYS[5])
elseif ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'failed_as', ARGV[7])
end
return 1
"""


# The user's quota is used up: the event ends ``rate_limited``, with its history entry and
# counter, out of the watch set, kept for the retention time. KEYS: event, history, stats,
# watch, lease. ARGV: now, last error, history entry, event id, retention seconds.
# Returns 1, or 0 when it was rate-limited already (a second run: it changes nothing).
_RATE_LIMITED = _FENCE_LUA + """
if not fenced(KEYS[1], KEYS[2], ARGV[6], ARGV[7]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'rate_limited' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'rate_limited', 'updated_at', ARGV[1], 'claimed', '0',
           'last_error', ARGV[2])
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'rate_limited', 1)
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[5])
return 1
"""


# Extend the lease KEYS[1] to ARGV[2] ms if the run ARGV[1] still holds it. Returns 1 if so.
_EXTEND_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
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
class ThrottleArgs:
    """The API rate limit a request is counted against, and the quota read with it."""

    key: str
    limit: int
    window_ms: int
    quota_window_ms: int
    quota_limit: int


@dataclass(frozen=True)
class Accepted:
    """What the accept script decided: the rate-limit verdict, the user's quota used, and
    the first answer when the ``Idempotency-Key`` was used before."""

    allowed: bool
    remaining: int
    reset_ms: int
    retry_ms: int
    quota_used: int
    prior: str | None


@dataclass(frozen=True)
class Claim:
    """What a worker run learnt when it took an event."""

    state: str
    lease_left_ms: int = 0
    losses: int = 0
    record: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Taken:
    """What a worker run's start did: its claim, and the step it reached when it took the
    event: ``lost`` (too many worker losses), ``failed`` (failed for good by an earlier
    run whose dead letter was not written), ``refused`` (quota used up) or ``send``
    (begun: ``attempt`` and whether it is ``ambiguous``)."""

    claim: Claim
    step: str
    attempt: int
    ambiguous: bool


class NotReplicated(redis.exceptions.ConnectionError):
    """Fewer replicas than ``EVENTFLOW_REDIS_MIN_REPLICAS`` confirmed a write in time: a
    failover could lose it, so it is treated as Redis being unreachable (the web answers
    503, a worker keeps what it knows and records it again)."""


def not_replicated(error: Exception) -> bool:
    """Whether Redis refused a write because it cannot replicate it now: a master with
    ``min-replicas-to-write`` and too few replicas in reach (``NOREPLICAS``), a former
    master that came back as a replica (``READONLY``), a replica cut off from its master
    (``MASTERDOWN``). A later try, or the new master, will take it."""
    return isinstance(error, redis.exceptions.ResponseError) and any(
        code in str(error) for code in ("NOREPLICAS", "READONLY", "MASTERDOWN"))


class EventStore:
    """Reads and writes event state in Redis.

    With ``min_replicas`` above 0, a write that a caller is about to promise (an accepted
    event, a delivered one) returns only once that many replicas hold it (``WAIT``).
    """

    def __init__(self, client: redis.Redis, clock: Clock,
                 retention_seconds: int = RETENTION_SECONDS, min_replicas: int = 0) -> None:
        self.redis = client
        self.clock = clock
        self.retention_seconds = retention_seconds
        self.min_replicas = min_replicas
        # The scripts of every event's path run on a connection of the thread's own.
        self._accept = ThreadScript(client, _ACCEPT)
        self._accept_batch = ThreadScript(client, _ACCEPT_BATCH)
        self._take = ThreadScript(client, _TAKE)
        self._delivered = ThreadScript(client, _DELIVERED)
        # Sent with their source (EVAL), not by digest: a write sent just before its host
        # was cut off can reach Redis long after the run gave up on it, and must then
        # run (and be fenced) even where the script was never loaded. Not a hot path.
        self._failed_attempt = _Source(client, _FAILED_ATTEMPT)
        self._rate_limited = _Source(client, _RATE_LIMITED)
        self._requeue_stalled = client.register_script(_REQUEUE_STALLED)
        self._extend_lease = client.register_script(_EXTEND_LEASE)

    def now(self) -> str:
        return isoformat(self.clock.now())

    def entry(self, step: str, **details: Any) -> str:
        """A history entry as stored: the step, its time and what else is known."""
        return json.dumps({"step": step, "at": self.now(), **details}, separators=(",", ":"))

    # -- the web side ------------------------------------------------------------------

    def accept(
        self,
        event_id: str,
        event: Mapping[str, Any],
        producer: str,
        message: TaskMessage,
        idempotency: tuple[str, str, str] | None = None,
        *,
        throttle: ThrottleArgs | None = None,
    ) -> Accepted:
        """Count the request against the API rate limit and, if allowed, store a new
        event with its message, atomically, in one round trip.

        ``idempotency`` is ``(redis key, answer before the quota left, answer after it)``:
        the value remembered for the key. When that key was used before, nothing is
        stored and :attr:`Accepted.prior` is the remembered value.
        """
        idem_key, prefix, suffix = idempotency or ("", "", "")
        limits = throttle or ThrottleArgs("", 1, 1, 1, 0)
        now = self.now()
        allowed, remaining, reset_ms, retry_ms, used, prior = self._replicated(
            self._accept,
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, message.queue, idem_key,
                  WATCH_KEY, limits.key, quota_key(event["user_id"]) if throttle else ""],
            args=[
                json.dumps({"step": "accepted", "at": now, "producer": producer},
                           separators=(",", ":")),
                message.payload,
                limits.limit, limits.window_ms, limits.quota_window_ms, limits.quota_limit,
                prefix, suffix,
                event_id, event["user_id"], event["event_type"],
                json.dumps(event["payload"], separators=(",", ":")), producer, now,
            ],
        )
        return Accepted(bool(allowed), int(remaining), int(reset_ms), int(retry_ms), int(used),
                        _text(prior) or None)

    def accept_batch(
        self, events: Sequence[tuple[str, Mapping[str, Any], TaskMessage]], producer: str,
        remember: tuple[str, str] | None = None,
    ) -> str | None:
        """Store events ``(id, event, message)`` with their messages, all or none.

        ``remember`` is ``(redis key, answer)`` of the batch's ``Idempotency-Key``, written
        in the same step as the events. When that key was used before, nothing is stored
        and the remembered answer is returned; otherwise ``None``.
        """
        idem_key, answer = remember or ("", "")
        if not events and not idem_key:
            return None
        now = self.now()
        keys = [STATS_KEY, events[0][2].queue if events else "", WATCH_KEY, idem_key]
        args = [producer, now, self.entry("accepted", producer=producer), answer]
        for event_id, event, message in events:
            keys += (event_key(event_id), history_key(event_id))
            args += (event_id, event["user_id"], event["event_type"],
                     json.dumps(event["payload"], separators=(",", ":")), message.payload)
        _count, prior = self._replicated(self._accept_batch, keys=keys, args=args)
        return _text(prior) or None

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

    def take(
        self, event_id: str, token: str, lease_ms: int, quota_limit: int, quota_seconds: int,
        max_losses: int,
    ) -> Taken:
        """Claim, check the losses, reserve the quota and begin the send, in one round trip.

        The event is claimed (unless finished, or held by another run), its quota
        reserved once and its send begun in the ledger, with the ``worker_lost`` and
        ``ambiguous_resend`` history entries, stopping where a run must stop: see
        :attr:`Taken.step`.
        """
        reply = self._take(
            keys=[event_key(event_id), lease_key(event_id), WATCH_KEY, STATS_KEY,
                  history_key(event_id)],
            args=[token, lease_ms, quota_seconds * 1000, quota_limit, event_id, self.now(),
                  max_losses],
        )
        state, lease_left, losses = reply[:3]
        claim_only = len(reply) <= 3
        if claim_only:
            return Taken(Claim(_text(state), int(lease_left), int(losses), None), "", 0, False)
        step, attempt, ambiguous, *flat = reply[3:]
        record = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Taken(Claim(_text(state), int(lease_left), int(losses), record),
                     _text(step), int(attempt), bool(ambiguous))

    def extend_lease(self, event_id: str, token: str, lease_ms: int) -> bool:
        """Keep the event held by the run ``token`` for ``lease_ms`` more, if it still is."""
        return bool(self._extend_lease(keys=[lease_key(event_id)], args=[token, lease_ms]))

    def mark_delivered(
        self, event_id: str, attempt: int, reply: str, duration: float,
        details: Mapping[str, Any] | None = None, at: str | None = None, run: str = "",
    ) -> bool:
        """The server answered 250: the event is delivered, in one step with its ledger.

        ``details`` join the attempt's history entry (the template, locale and version).
        ``at`` (default: now) makes a call tried again write the same entries, which the
        script recognises. ``run`` is the run's token: False when a newer run holds the
        event (the write is then only noted in the history as ``superseded``).
        """
        now = at or self.now()
        return self._replicated(
            self._delivered,
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, WATCH_KEY, TIMING_KEY,
                  lease_key(event_id)],
            args=[
                now,
                self.entry("attempt", at=now, attempt=attempt, outcome="delivered",
                           smtp_reply=reply, duration_ms=round(duration * 1000, 1),
                           **(details or {})),
                self.entry("delivered", at=now),
                event_id, self.retention_seconds, repr(float(duration)),
                run, self.superseded(attempt, "delivered", smtp_reply=reply, at=now),
                *_buckets(duration),
            ],
        ) != 0 or self._holds(event_id, run)

    def superseded(self, attempt: int | None, outcome: str, **details: Any) -> str:
        """The history entry of a run's outcome that came after a newer run took over."""
        return self.entry("superseded", **({"attempt": attempt} if attempt else {}),
                          outcome=outcome, **details,
                          reason="a newer run took the event after this run's lease ran out")

    def _holds(self, event_id: str, run: str) -> bool:
        """Whether the run ``run`` (or no run) is the one the record names: a script that
        changed nothing did so because it ran already (True) or was fenced (False)."""
        holder = self.redis.hget(event_key(event_id), "run")
        return not run or holder is None or _text(holder) == run

    def _replicated(self, script: ThreadScript, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script``; with ``min_replicas``, return only once that many replicas hold
        what it wrote (``WAIT`` on the same connection, in the same round trip), or raise
        :class:`NotReplicated` after ``REPLICA_WAIT_MS``."""
        if self.min_replicas <= 0:
            return script(keys=keys, args=args)
        pipe = self.redis.pipeline(transaction=False)
        script.script(keys=keys, args=args, client=pipe)
        pipe.wait(self.min_replicas, REPLICA_WAIT_MS)
        try:
            reply, acknowledged = pipe.execute()
        except redis.exceptions.ResponseError as error:
            # A master configured with min-replicas-to-write refuses writes on its own
            # (NOREPLICAS), a former master now a replica refuses them too (READONLY).
            if not_replicated(error):
                raise NotReplicated(str(error)) from error
            raise
        if int(acknowledged) < self.min_replicas:
            raise NotReplicated(f"{acknowledged} of {self.min_replicas} replicas confirmed "
                                f"the write within {REPLICA_WAIT_MS} ms")
        return reply

    def mark_failed_attempt(
        self,
        event_id: str,
        attempt: int,
        kind: str,
        error: str,
        details: Mapping[str, Any],
        duration: float,
        retry_in: float | None,
        fails_as: str | None = None,
        at: str | None = None,
        run: str = "",
    ) -> bool:
        """An attempt failed; with ``retry_in`` the event waits for its next attempt.

        With ``fails_as`` (an error type) the event is to be dead-lettered: that is
        kept in the record, so that a later run dead-letters it without sending again if
        the dead letter itself could not be written. ``at`` (default: now) makes a call
        tried again write the same entry, which the script recognises. ``run``: as for
        :meth:`mark_delivered`.
        """
        now = at or self.now()
        entry = self.entry(
            "attempt", at=now, attempt=attempt, outcome=kind, error=error, **details,
            duration_ms=round(duration * 1000, 1),
            **({"retry_in_s": round(retry_in, 3)} if retry_in is not None else {}))
        return self._failed_attempt(
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, TIMING_KEY,
                  lease_key(event_id)],
            args=[now, entry, error, kind, "1" if retry_in is not None else "0",
                  repr(float(duration)), fails_as or "", run,
                  self.superseded(attempt, kind, error=error, at=now), *_buckets(duration)],
        ) != 0 or self._holds(event_id, run)

    def mark_rate_limited(self, event_id: str, limit: str, run: str = "") -> bool:
        """The user's quota is used up: the event is not sent. ``run``: as for
        :meth:`mark_delivered`."""
        return self._rate_limited(
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, WATCH_KEY,
                  lease_key(event_id)],
            args=[self.now(), f"rate limit {limit} reached for this user",
                  self.entry("rate_limit", decision="refused", limit=limit), event_id,
                  self.retention_seconds, run, self.superseded(None, "rate_limited")],
        ) != 0 or self._holds(event_id, run)

    def note(self, event_id: str, step: str, **details: Any) -> None:
        """Add a history entry that changes nothing else."""
        self.redis.rpush(history_key(event_id), self.entry(step, **details))

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

    def _observe_duration(self, pipe: Any, seconds: float) -> None:
        for bucket in _buckets(seconds):
            pipe.hincrby(TIMING_KEY, bucket, 1)
        pipe.hincrby(TIMING_KEY, "count", 1)
        pipe.hincrbyfloat(TIMING_KEY, "sum", seconds)

    def _expire(self, pipe: Any, event_id: str) -> None:
        pipe.expire(event_key(event_id), self.retention_seconds)
        pipe.expire(history_key(event_id), self.retention_seconds)


class _Source:
    """A Lua script sent whole on each call (``EVAL``)."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client, self.source = client, source

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self.client.eval(self.source, len(keys), *keys, *args)


def _buckets(seconds: float) -> list[str]:
    """The send-duration histogram's buckets that ``seconds`` falls in: cumulative, as
    Prometheus wants them, so a read needs no arithmetic."""
    return [f"le:{bound}" for bound in DURATION_BUCKETS if seconds <= bound]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

