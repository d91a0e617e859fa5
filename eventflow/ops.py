"""``/health`` and ``/stats``: what an operator or a load balancer asks, with no key."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, json
from redis.exceptions import RedisError

from eventflow.deadletters import DLQ_KEY
from eventflow.services import Services
from eventflow.store import STATS_KEY

ops = Blueprint("ops", __name__)

STAT_EVENTS = ("accepted", "delivered", "retried", "rate_limited", "dead_lettered")


def _services() -> Services:
    return current_app.extensions["eventflow"]  # type: ignore[no-any-return]


@ops.get("/health")
def health() -> Response:
    """200 when Redis answers, 503 naming the failed check when it does not."""
    try:
        _services().redis.ping()
    except RedisError as exc:
        body = {"status": "unavailable", "checks": {"redis": f"error: {type(exc).__name__}"}}
        return Response(json.dumps(body), status=503, mimetype="application/json")
    return Response(json.dumps({"status": "ok", "checks": {"redis": "ok"}}),
                    mimetype="application/json")


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
