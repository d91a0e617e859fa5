"""The per-key request rate limit of the API (``EVENTFLOW_API_RATE_LIMIT``).

This is not the per-user email quota (``EVENTFLOW_RATE_LIMIT``, checked by the workers
at send time): it protects the API and Redis from one producer sending too many requests.

It is a GCRA (generic cell rate algorithm) in one Lua script, on Redis's own clock so that
every web process and host agrees: one key per producer holding a "theoretical arrival
time", a full burst of ``limit`` requests allowed, then one request every
``window / limit``. No boundary where two windows' worth passes at once (as with a fixed
window), and ``Retry-After`` is exact. The same round trip can also read how much of a
user's email quota is left, for the answer to an accepted event.

Why not the ``limits`` library: its ``hit`` answers only yes or no, so the
``RateLimit-Remaining`` header needs a second call (two more Redis round trips per request
in all), and every API request pays for each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis
from flask import Flask, Response, g, request
from redis.exceptions import OutOfMemoryError

from eventflow.problems import Problem
from eventflow.scripts import lua_source
from eventflow.settings import RATE_UNITS, ApiKey, RateLimit, Settings
from eventflow.store import PREFIX, Accepted, ThrottleArgs, quota_key


def throttle_key(key_name: str) -> str:
    return f"{PREFIX}throttle:{key_name}"


#: The throttle's script (``throttle.lua``), after the GCRA function it shares with the
#: accept script (``gcra.lua``).
_GCRA = lua_source("eventflow", "gcra.lua", "throttle.lua")


@dataclass(frozen=True)
class Decision:
    """What the throttle decided for one request, and what the headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after_seconds: int
    quota_used: int | None = None

    def headers(self) -> dict[str, str]:
        """The IETF draft ``RateLimit-*`` headers (and ``Retry-After`` when refused)."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(self.retry_after_seconds, 1))
        return headers


class Throttle:
    """Counts the requests of each API key against ``EVENTFLOW_API_RATE_LIMIT``."""

    def __init__(self, client: redis.Redis, limit: RateLimit, quota: RateLimit) -> None:
        self.limit = limit
        self.quota = quota
        self._script = client.register_script(_GCRA)

    def check(self, key: ApiKey, quota_user: str | None = None) -> Decision:
        """Count one request of ``key``; with ``quota_user``, also read that user's quota."""
        allowed, remaining, reset_ms, retry_ms, used = self._script(
            keys=[throttle_key(key.name), quota_key(quota_user) if quota_user else ""],
            args=[self.limit.count, self.limit.seconds * 1000, self.quota.seconds * 1000],
        )
        return Decision(
            allowed=bool(allowed),
            limit=self.limit.count,
            remaining=max(int(remaining), 0),
            reset_seconds=math.ceil(int(reset_ms) / 1000),
            retry_after_seconds=math.ceil(int(retry_ms) / 1000),
            quota_used=None if int(used) < 0 else int(used),
        )

    def args(self, key: ApiKey) -> ThrottleArgs:
        """What the accept script needs to count a request of ``key`` and read a quota."""
        return ThrottleArgs(throttle_key(key.name), self.limit.count, self.limit.seconds * 1000,
                            self.quota.seconds * 1000, self.quota.count)

    def decision(self, accepted: Accepted) -> Decision:
        """The decision that the accept script made."""
        return Decision(
            allowed=accepted.allowed,
            limit=self.limit.count,
            remaining=max(accepted.remaining, 0),
            reset_seconds=math.ceil(accepted.reset_ms / 1000),
            retry_after_seconds=math.ceil(accepted.retry_ms / 1000),
            quota_used=accepted.quota_used,
        )

    def answer_parts(self, event_id: str) -> tuple[str, str]:
        """The JSON answer to an accepted event, around its "remaining" quota figure."""
        window = next(name for name, secs in RATE_UNITS.items() if secs == self.quota.seconds)
        before = (f'{{"id": "{event_id}", "status": "queued", "quota": '
                  f'{{"limit": {self.quota.count}, "remaining": ')
        return before, f', "window": "{window}"}}}}'


def init_throttle(app: Flask, client: redis.Redis, settings: Settings) -> None:
    """Give ``app`` its throttle and the ``RateLimit-*`` headers on every counted answer."""
    app.extensions["throttle"] = Throttle(client, settings.api_rate_limit, settings.rate_limit)
    app.after_request(add_rate_limit_headers)


def enforce(throttle: Throttle, key: ApiKey, quota_user: str | None = None) -> Decision | None:
    """Count this request; a 429 problem beyond the limit. Kept in ``g`` for the headers.

    ``None`` for a read that a full Redis could not count: it is answered uncounted (a
    producer must still learn what became of its events while new ones are refused).
    """
    try:
        decision = throttle.check(key, quota_user)
    except OutOfMemoryError:
        if request.method in ("GET", "HEAD"):
            return None
        raise
    return apply_decision(throttle, decision)


def apply_decision(throttle: Throttle, decision: Decision) -> Decision:
    """Keep ``decision`` in ``g`` for the headers; a 429 problem if it refused."""
    g.throttle_decision = decision
    if not decision.allowed:
        raise refusal(throttle, decision)
    return decision


def refusal(throttle: Throttle, decision: Decision) -> Problem:
    """The 429 problem of a refused ``decision``."""
    return Problem(
        429,
        f"This key made more than {throttle.limit} requests; retry after "
        f"{decision.headers()['Retry-After']} s (EVENTFLOW_API_RATE_LIMIT).",
        slug="rate-limited", title="Too Many Requests", headers=decision.headers(),
    )


def add_rate_limit_headers(response: Response) -> Response:
    """``after_request``: the ``RateLimit-*`` headers on every answer that was counted."""
    decision: Decision | None = g.get("throttle_decision")
    if decision is not None:
        for name, value in decision.headers().items():
            response.headers.setdefault(name, value)
    return response
