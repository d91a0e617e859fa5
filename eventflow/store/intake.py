"""The web's side of the store: accepting events, one at a time or in batches, each in
one atomic step with its history entry, its Celery message, its idempotency record and
the request's count against the API rate limit."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eventflow.enqueue import TaskMessage
from eventflow.scripts import ThreadScript, lua_source
from eventflow.statuses import Step
from eventflow.store.base import StoreBase
from eventflow.store.keys import (
    IDEMPOTENCY_SECONDS,
    STATS_KEY,
    WATCH_KEY,
    _text,
    event_key,
    history_key,
    quota_key,
)

#: The accept script, after the throttle's GCRA function (``eventflow/gcra.lua``).
ACCEPT = (lua_source("eventflow", "gcra.lua") + lua_source("eventflow.store", "accept.lua")).replace(
    "IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))
#: ``json.dumps(value, separators=(",", ":"))`` without making an encoder at every call,
#: which cost more than the encoding of a payload.
compact_json = json.JSONEncoder(separators=(",", ":")).encode

ACCEPT_BATCH = lua_source("eventflow.store", "accept_batch.lua").replace(
    "IDEMPOTENCY_SECONDS", str(IDEMPOTENCY_SECONDS))


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



class Intake(StoreBase):
    """Accepting events (the web process)."""

    def load_scripts(self) -> None:
        super().load_scripts()
        # The scripts of every event's path run on a connection of the thread's own.
        self._accept = ThreadScript(self.redis, ACCEPT)
        self._accept_batch = ThreadScript(self.redis, ACCEPT_BATCH)

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
                compact_json({"step": Step.ACCEPTED, "at": now, "producer": producer}),
                message.payload,
                limits.limit, limits.window_ms, limits.quota_window_ms, limits.quota_limit,
                prefix, suffix,
                event_id, event["user_id"], event["event_type"],
                compact_json(event["payload"]), producer, now,
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
        args = [producer, now, self.entry(Step.ACCEPTED, producer=producer), answer]
        for event_id, event, message in events:
            keys += (event_key(event_id), history_key(event_id))
            args += (event_id, event["user_id"], event["event_type"],
                     compact_json(event["payload"]), message.payload)
        _count, prior = self._replicated(self._accept_batch, keys=keys, args=args)
        return _text(prior) or None
