"""Time, behind a small interface so that tests can hold it still."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Protocol


class Clock(Protocol):
    """Something that tells the time in seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()


def isoformat(timestamp: float) -> str:
    """``2026-11-28T03:20:00.123Z`` for a timestamp in seconds."""
    seconds = int(timestamp)
    micros = round((timestamp - seconds) * 1e6)  # rounded as datetime rounds it
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return f"{_second(seconds)}.{micros // 1000:03d}Z"


@lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Every event stamps its record and history: the same second is formatted once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def parse_isoformat(text: str) -> float:
    """The timestamp of an ISO 8601 date or date-time; naive values are taken as UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
