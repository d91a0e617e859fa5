"""The message the web process writes is a normal Celery task message."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from flask import Flask

from eventflow.enqueue import DELIVER_TASK, build_task_message
from tests.waiting import wait_for


def stored_message(redis_client: redis.Redis) -> dict[str, Any]:
    (raw,) = redis_client.lrange("celery", 0, -1)
    redis_client.delete("celery")
    return json.loads(raw)  # type: ignore[no-any-return]


def test_a_built_message_matches_what_apply_async_writes(
    app: Flask, redis_client: redis.Redis
) -> None:
    # Given the same call, sent once by apply_async and once built by EventFlow
    celery_app = app.extensions["celery"]
    celery_app.tasks[DELIVER_TASK].apply_async(("event-1",), task_id="event-1")
    sent = stored_message(redis_client)
    built = json.loads(build_task_message(celery_app, "event-1", ("event-1",)).payload)
    # Then both carry the same body, headers and routing (but for per-message values)
    assert base64.b64decode(built["body"]) == base64.b64decode(sent["body"])
    volatile = {"origin"}
    assert {k: v for k, v in built["headers"].items() if k not in volatile} == {
        k: v for k, v in sent["headers"].items() if k not in volatile
    }
    for field in ("content-type", "content-encoding"):
        assert built[field] == sent[field]
    for prop in ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert built["properties"][prop] == sent["properties"][prop]


def test_a_stock_worker_runs_a_message_written_by_the_web_process(
    app: Flask, redis_client: redis.Redis, worker: Any
) -> None:
    # Given a worker and a message built by EventFlow for an unknown event
    celery_app = app.extensions["celery"]
    message = build_task_message(celery_app, "task-7", ("no-such-event",))
    # When it is pushed as the web process pushes it
    redis_client.lpush(message.queue, message.payload)
    # Then the worker consumes it and acknowledges it
    wait_for(lambda: redis_client.llen("celery") == 0
             and redis_client.hlen("unacked") == 0, message="the message to be consumed")
    assert redis_client.llen("celery") == 0


def test_a_message_filled_from_the_template_is_the_one_celery_builds(app: Flask) -> None:
    # Given an event id, and the message Celery itself builds for its delivery
    from eventflow.enqueue import _build

    celery_app = app.extensions["celery"]
    event_id = "0b7d0c56-52f4-4d3c-9c59-3f3b6a0f8c11"
    by_celery = json.loads(_build(celery_app, event_id, (event_id,), DELIVER_TASK, None).payload)
    # When the web process builds it (from its per-process template), twice
    first = json.loads(build_task_message(celery_app, event_id, (event_id,)).payload)
    second = json.loads(build_task_message(celery_app, event_id, (event_id,)).payload)
    # Then it is the same message but for its own delivery tag
    tags = {m["properties"].pop("delivery_tag") for m in (by_celery, first, second)}
    assert len(tags) == 3
    assert first == by_celery == second
    assert json.loads(base64.b64decode(first["body"]))[0] == [event_id]
    assert first["headers"]["argsrepr"] == repr((event_id,))
