"""The Celery broker's side of a full Redis: the worker keeps running and keeps its messages.

With ``maxmemory`` reached under ``noeviction`` (as shipped), Redis refuses every command
that could grow its memory (``-OOM``) and still serves reads, deletions and expiries.
kombu's Redis transport writes in three places that Celery treats as fatal or lossy:

- starting the consumer, and then on a timer, it takes a mutex (``SET NX``) to restore
  the messages of dead workers: refused, the worker process exits with "Unrecoverable
  error: OutOfMemoryError" and stays down;
- on each message it receives, it records it as unacknowledged (``ZADD``, ``HSET``);
- on a reject with requeue, and at shutdown, it puts messages back (``LPUSH``).

:class:`FullRedisQoS` lets each of them wait for memory instead: the mutex is tried again
at the next interval; a message that could not be recorded as unacknowledged is still
delivered to the task (the event's own record in ``ef:watch`` brings it back if the worker
dies with it: :class:`tasks.delivery.StalledEventSweep`); a message that could not be put
back stays unacknowledged in Redis, and kombu hands it out again after the visibility
timeout, once memory is free. Every write kombu makes is refused whole (a ``MULTI`` block
with a refused command is not run at all), so nothing is half-written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import OutOfMemoryError

log = logging.getLogger(__name__)

#: At most one warning per this many seconds for each kind of refused write.
WARN_EVERY = 30.0


class FullRedisQoS(kombu_redis.QoS):
    """kombu's Redis QoS, waiting out a full Redis instead of failing the consumer."""

    _last_warning: dict[str, float] = {}  # noqa: RUF012 (shared on purpose: one log rate)

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            super().append(message, delivery_tag)
        except OutOfMemoryError:
            # Popped already (BRPOP frees, it is not refused): run it rather than drop it.
            _warn("received", "Redis is full: a message taken from the queue could not be "
                  "recorded as unacknowledged; it is run anyway")
            virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().restore_visible(*args, **kwargs)
        except OutOfMemoryError:
            _warn("restore", "Redis is full: unacknowledged messages will be restored once "
                  "memory is free")

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        try:
            super().restore_by_tag(tag, client, leftmost)
        except OutOfMemoryError:
            _warn("requeue", "Redis is full: a message could not be put back in the queue; "
                  "it stays unacknowledged and comes back after the visibility timeout")


def _warn(kind: str, text: str) -> None:
    now = time.monotonic()
    if now - FullRedisQoS._last_warning.get(kind, -WARN_EVERY) >= WARN_EVERY:
        FullRedisQoS._last_warning[kind] = now
        log.warning(text)


def tolerate_full_redis() -> None:
    """Use :class:`FullRedisQoS` in kombu's Redis channels (and its Sentinel ones).

    kombu picks its transport by the URL's scheme (``redis``, ``rediss``, ``sentinel``),
    each with its own TLS and Sentinel handling; a transport class of our own, named in
    ``broker_transport``, would replace that choice. The QoS class is the one thing to
    change, and kombu reads it from the channel class.
    """
    kombu_redis.Channel.QoS = FullRedisQoS
