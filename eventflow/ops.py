"""``/health`` and ``/stats``: what an operator or a load balancer asks, with no key."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, json
from redis.exceptions import OutOfMemoryError, RedisError

from eventflow.deadletters import DLQ_KEY
from eventflow.services import Services
from eventflow.store import PREFIX, STATS_KEY

ops = Blueprint("ops", __name__)

STAT_EVENTS = ("accepted", "delivered", "retried", "rate_limited", "dead_lettered",
               "suppressed", "bounced")


def _services() -> Services:
    return current_app.extensions["eventflow"]  # type: ignore[no-any-return]


#: Written by each ``/health``: a write is the one sure way to learn whether Redis takes
#: writes (a full Redis answers PING and reads, and refuses what would grow its memory).
HEALTH_KEY = PREFIX + "health"


@ops.get("/health")
def health() -> Response:
    """200 when Redis answers and takes writes; 503 naming the failed check otherwise
    (unreachable, or full: ``maxmemory`` reached, with the figures)."""
    client = _services().redis
    try:
        client.set(HEALTH_KEY, "1", ex=60)
    except OutOfMemoryError:
        body = {"status": "unavailable", "checks": {"redis": f"full: {_memory_figures(client)}"}}
        return Response(json.dumps(body), status=503, mimetype="application/json")
    except RedisError as exc:
        body = {"status": "unavailable", "checks": {"redis": f"error: {type(exc).__name__}"}}
        return Response(json.dumps(body), status=503, mimetype="application/json")
    return Response(json.dumps({"status": "ok", "checks": {"redis": "ok"}}),
                    mimetype="application/json")


def _memory_figures(client: Any) -> str:
    """What an operator needs to act on a full Redis, in one line."""
    try:
        memory = client.info("memory")
    except RedisError:
        return "used memory is over maxmemory; new events are refused with 503"
    return (f"used_memory {memory.get('used_memory_human')} is over maxmemory "
            f"{memory.get('maxmemory_human')} (maxmemory-policy "
            f"{memory.get('maxmemory_policy')}); new events are refused with 503 until "
            "memory is freed (EVENTFLOW_EVENT_RETENTION, flask dlq purge, or a larger "
            "maxmemory)")


@ops.get("/stats")
def stats() -> Response:
    """The pipeline's counters, the queue depth and the dead letters waiting."""
    svc = _services()
    pipe = svc.redis.pipeline(transaction=False)
    pipe.hgetall(STATS_KEY)
    pipe.llen(current_app.extensions["celery"].conf.task_default_queue)
    pipe.zcard(DLQ_KEY)
    counters, depth, dead_letters = pipe.execute()
    counts = {k.decode(): int(v) for k, v in counters.items()}
    body = {
        "events": {name: counts.get(name, 0) for name in STAT_EVENTS},
        "queue_depth": int(depth),
        "dead_letters": int(dead_letters),
    }
    return Response(json.dumps(body), mimetype="application/json")
