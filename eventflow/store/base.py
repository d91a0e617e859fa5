"""What the web's and the worker's sides of the store share: the client, the clock, the
history entries, the reads, and the write that waits for replicas."""

from __future__ import annotations

import json
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from eventflow.clock import Clock, isoformat
from eventflow.scripts import ThreadScript
from eventflow.sentinels import SentinelView
from eventflow.store.keys import (
    REPLICA_WAIT_MS,
    RETENTION_SECONDS,
    STATS_KEY,
    _text,
    event_key,
    history_key,
)

#: The fields of an event as ``GET /api/v1/events/<id>`` shows it (and its webhooks).
EVENT_FIELDS = ("id", "status", "user_id", "event_type", "producer", "attempts", "last_error",
                "created_at", "updated_at", "delivered_at")


def event_view(record: dict[str, str]) -> dict[str, Any]:
    """The event as the API shows it, without its history."""
    view: dict[str, Any] = {name: record.get(name) or None for name in EVENT_FIELDS}
    view["attempts"] = int(record.get("attempts") or 0)
    return view


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


class StoreBase:
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
        pool = client.connection_pool
        #: With a ``sentinel://`` URL: who the Sentinels name as master.
        self._sentinels = (SentinelView(pool) if isinstance(pool, SentinelConnectionPool)
                           else None)
        self.load_scripts()

    def load_scripts(self) -> None:
        """Make the scripts of each side (each side's class adds its own)."""

    def now(self) -> str:
        return isoformat(self.clock.now())

    def entry(self, step: str, **details: Any) -> str:
        """A history entry as stored: the step, its time and what else is known."""
        return json.dumps({"step": step, "at": self.now(), **details}, separators=(",", ":"))

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

    def counters(self) -> dict[str, int]:
        """The pipeline counters, as integers."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}


    def note(self, event_id: str, step: str, **details: Any) -> None:
        """Add a history entry that changes nothing else."""
        self.redis.rpush(history_key(event_id), self.entry(step, **details))

    def _replicated(self, script: ThreadScript, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script``; with ``min_replicas``, return only once that many replicas hold
        what it wrote (``WAIT`` on the same connection, in the same round trip) and, with
        Sentinels, once the newest configuration among them names as master the server
        that ran it (:meth:`_not_master`); or raise :class:`NotReplicated` (after
        ``REPLICA_WAIT_MS`` at most)."""
        if self.min_replicas <= 0:
            return script(keys=keys, args=args)
        try:
            reply, acknowledged, address = script.replicated(
                keys, args, self.min_replicas, REPLICA_WAIT_MS)
        except redis.exceptions.ResponseError as error:
            # A master configured with min-replicas-to-write refuses writes on its own
            # (NOREPLICAS), a former master now a replica refuses them too (READONLY).
            if not_replicated(error):
                raise NotReplicated(str(error)) from error
            raise
        if acknowledged < self.min_replicas:
            problem = (f"{acknowledged} of {self.min_replicas} replicas confirmed the write "
                       f"within {REPLICA_WAIT_MS} ms")
        else:
            problem = self._not_master(address)
        if problem:
            # The thread's connection is made again, after asking the Sentinels where the
            # master is: one held to a former master (whose replicas have moved to the new
            # one) would take every later write there, until the Sentinels demote it.
            script.connection().disconnect()
            raise NotReplicated(problem)
        return reply

    def _not_master(self, address: tuple[str, int]) -> str:
        """Why the server at ``address`` may not be the master, or "" when the newest
        configuration among the Sentinels that answer (a majority at least) names it;
        "" without Sentinels.

        A master frozen past the Sentinels' patience (a long fork or fsync, a paused VM)
        comes back believing it is still the master, and a replica not yet moved to the
        new master confirms its writes: until the Sentinels demote it, each write it takes
        is acknowledged, then lost. Asked after the write, the Sentinel that led the
        failover names the new master, under a higher config epoch than the others
        until they learn of it (within about two seconds)."""
        if self._sentinels is None:
            return ""
        named = self._sentinels.masters()
        sentinels = self._sentinels.sentinels
        majority = len(sentinels) // 2 + 1
        if len(named) < majority:
            return (f"only {len(named)} of {len(sentinels)} Sentinels answered; "
                    f"{majority} must name the master that took the write")
        newest = max(epoch for epoch, _, _ in named)
        others = sorted({f"{host}:{port}" for epoch, host, port in named
                         if epoch == newest and (host, port) != address})
        if others:
            return (f"the write went to {address[0]}:{address[1]}, but the Sentinels name "
                    f"{', '.join(others)} as master (config epoch {newest}: a failover)")
        return ""
