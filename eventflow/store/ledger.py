"""The worker's side of the store: the delivery ledger of each run. A run takes the event
(claim, quota, send begun), then records what happened: delivered, a failed attempt, or
the quota refused. Every write of a run is fenced by its token (``fence.lua``), and every
one gives the same outcome when run twice (a reply lost, the call sent again). The
stalled-event sweep requeues what lost its message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from eventflow.enqueue import TaskMessage
from eventflow.scripts import ThreadScript, lua_source
from eventflow.statuses import Step
from eventflow.store.base import StoreBase
from eventflow.store.keys import (
    STATS_KEY,
    TIMING_KEY,
    WATCH_KEY,
    _buckets,
    _text,
    event_key,
    history_key,
    lease_key,
)

TAKE = lua_source("eventflow.store", "claim.lua", "reserve_quota.lua", "begin_send.lua", "take.lua")
DELIVERED = lua_source("eventflow.store", "fence.lua", "delivered.lua")
FAILED_ATTEMPT = lua_source("eventflow.store", "fence.lua", "failed_attempt.lua")
RATE_LIMITED = lua_source("eventflow.store", "fence.lua", "rate_limited.lua")
SUPPRESSED = lua_source("eventflow.store", "fence.lua", "suppressed.lua")
BOUNCED = lua_source("eventflow.store", "bounced.lua")
EXTEND_LEASE = lua_source("eventflow.store", "extend_lease.lua")
REQUEUE_STALLED = lua_source("eventflow.store", "requeue_stalled.lua")



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
    run whose dead letter was not written), ``suppressed`` (the address is on the
    suppression list: checked before the quota), ``refused`` (quota used up) or ``send``
    (begun: ``attempt`` and whether it is ``ambiguous``)."""

    claim: Claim
    step: str
    attempt: int
    ambiguous: bool




class Ledger(StoreBase):
    """A worker run's ledger."""

    def load_scripts(self) -> None:
        super().load_scripts()
        self._take = ThreadScript(self.redis, TAKE)
        self._delivered = ThreadScript(self.redis, DELIVERED)
        # Sent with their source (EVAL), not by digest: a write sent just before its host
        # was cut off can reach Redis long after the run gave up on it, and must then
        # run (and be fenced) even where the script was never loaded. Not a hot path.
        self._failed_attempt = _Source(self.redis, FAILED_ATTEMPT)
        self._rate_limited = _Source(self.redis, RATE_LIMITED)
        self._suppressed = _Source(self.redis, SUPPRESSED)
        self._bounced = ThreadScript(self.redis, BOUNCED)
        self._requeue_stalled = self.redis.register_script(REQUEUE_STALLED)
        self._extend_lease = self.redis.register_script(EXTEND_LEASE)

    def take(
        self, event_id: str, token: str, lease_ms: int, quota_limit: int, quota_seconds: int,
        max_losses: int,
    ) -> Taken:
        """Claim, check the losses, reserve the quota and begin the send, in one round trip.

        The event is claimed (unless finished, or held by another run), its quota
        reserved once and its send begun in the ledger, with the ``worker_lost`` and
        ``ambiguous_resend`` history entries, stopping where a run must stop: see
        :attr:`Taken.step`. With ``min_replicas``, the run sends only once replicas of the
        master hold its take: a take lost in a failover would let a second run send again.
        """
        reply = self._replicated(
            self._take,
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
                self.entry(Step.ATTEMPT, at=now, attempt=attempt, outcome="delivered",
                           smtp_reply=reply, duration_ms=round(duration * 1000, 1),
                           **(details or {})),
                self.entry(Step.DELIVERED, at=now),
                event_id, self.retention_seconds, repr(float(duration)),
                run, self.superseded(attempt, "delivered", smtp_reply=reply, at=now),
                *_buckets(duration),
            ],
        ) != 0 or self._holds(event_id, run)

    def superseded(self, attempt: int | None, outcome: str, **details: Any) -> str:
        """The history entry of a run's outcome that came after a newer run took over."""
        return self.entry(Step.SUPERSEDED, **({"attempt": attempt} if attempt else {}),
                          outcome=outcome, **details,
                          reason="a newer run took the event after this run's lease ran out")

    def _holds(self, event_id: str, run: str) -> bool:
        """Whether the run ``run`` (or no run) is the one the record names: a script that
        changed nothing did so because it ran already (True) or was fenced (False)."""
        holder = self.redis.hget(event_key(event_id), "run")
        return not run or holder is None or _text(holder) == run

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
        entry = self.entry(Step.ATTEMPT, at=now, attempt=attempt, outcome=kind, error=error, **details,
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
                  self.entry(Step.RATE_LIMIT, decision="refused", limit=limit), event_id,
                  self.retention_seconds, run, self.superseded(None, "rate_limited")],
        ) != 0 or self._holds(event_id, run)

    def mark_suppressed(self, event_id: str, entry: Mapping[str, str], run: str = "") -> bool:
        """The address is on the suppression list (``entry``, as stored): the event is not
        sent. ``run``: as for :meth:`mark_delivered`."""
        named = {k: entry[k] for k in ("address", "reason", "created_at", "event_id")
                 if entry.get(k)}
        return self._suppressed(
            keys=[event_key(event_id), history_key(event_id), STATS_KEY, WATCH_KEY,
                  lease_key(event_id)],
            args=[self.now(),
                  (f"{entry.get('address', 'the address')} is on the suppression list "
                  f"({entry.get('reason', 'unknown reason')})"),
                  self.entry(Step.SUPPRESSED, suppression=named), event_id,
                  self.retention_seconds, run, self.superseded(None, "suppressed")],
        ) != 0 or self._holds(event_id, run)

    def mark_bounced(self, event_id: str, details: Mapping[str, Any]) -> str | None:
        """A delivery status notification came back for the event; ``details``: the
        recipient, its action, status and diagnostic. Returns the event's status after
        (``bounced`` if it was delivered; any other keeps its own, the step added to its
        history), or ``None`` for an unknown event."""
        error = " ".join(str(details[k]) for k in ("status", "diagnostic") if details.get(k))
        status = self._replicated(
            self._bounced,
            keys=[event_key(event_id), history_key(event_id), STATS_KEY],
            args=[self.now(), f"bounced: {error}".strip(), self.entry(Step.BOUNCED, **details),
                  self.retention_seconds],
        )
        return _text(status) if status else None

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
                  self.entry(Step.REQUEUED, reason="stalled: its task message was lost")],
        ))


class _Source:
    """A Lua script sent whole on each call (``EVAL``)."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client, self.source = client, source

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self.client.eval(self.source, len(keys), *keys, *args)
