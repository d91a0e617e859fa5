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
from flask import Flask, Response, g

from eventflow.problems import Problem
from eventflow.settings import RATE_UNITS, ApiKey, RateLimit, Settings
from eventflow.store import PREFIX, quota_key


def throttle_key(key_name: str) -> str:
    return f"{PREFIX}throttle:{key_name}"


# KEYS[1]: the producer's throttle key; KEYS[2]: a user's quota log (may be empty).
# ARGV: limit, window ms, quota window ms. Returns
# {allowed, remaining, reset ms, retry-after ms, quota used (-1 when not asked)}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allowed, retry = 1, 0
if new_tat - now > window + 0.001 then
  allowed, retry, new_tat = 0, new_tat - now - window, tat
else
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
end
local remaining = math.floor((window - (new_tat - now)) / interval + 0.000001)
local used = -1
if KEYS[2] ~= '' then
  used = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[3]), '+inf')
end
return {allowed, remaining, math.ceil(new_tat - now), math.ceil(retry), used}
"""


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

    def quota_view(self, used: int) -> dict[str, object]:
        """The user's email quota as the answer to an accepted event shows it."""
        window = next(name for name, secs in RATE_UNITS.items() if secs == self.quota.seconds)
        return {"limit": self.quota.count, "remaining": max(self.quota.count - used, 0),
                "window": window}


def init_throttle(app: Flask, client: redis.Redis, settings: Settings) -> None:
    """Give ``app`` its throttle and the ``RateLimit-*`` headers on every counted answer."""
    app.extensions["throttle"] = Throttle(client, settings.api_rate_limit, settings.rate_limit)
    app.after_request(add_rate_limit_headers)


def enforce(throttle: Throttle, key: ApiKey, quota_user: str | None = None) -> Decision:
    """Count this request; a 429 problem beyond the limit. Kept in ``g`` for the headers."""
    decision = throttle.check(key, quota_user)
    g.throttle_decision = decision
    if not decision.allowed:
        raise Problem(
            429,
            f"This key made more than {throttle.limit} requests; retry after "
            f"{decision.headers()['Retry-After']} s (EVENTFLOW_API_RATE_LIMIT).",
            slug="rate-limited", title="Too Many Requests", headers=decision.headers(),
        )
    return decision


def add_rate_limit_headers(response: Response) -> Response:
    """``after_request``: the ``RateLimit-*`` headers on every answer that was counted."""
    decision: Decision | None = g.get("throttle_decision")
    if decision is not None:
        for name, value in decision.headers().items():
            response.headers.setdefault(name, value)
    return response
