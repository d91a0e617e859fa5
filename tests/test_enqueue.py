"""The message the web process writes is a normal Celery task message."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from eventflow.enqueue import DELIVER_TASK, build_task_message, deliver_messages, new_ids
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


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(min_size=16, max_size=16 * 5).filter(lambda raw: len(raw) % 16 == 0))
def test_new_ids_are_what_uuid4_makes_of_the_same_random_bytes(raw: bytes) -> None:
    # Given the bytes the system's randomness gives (uuid.uuid4() reads 16 of them an id)
    # When a batch's ids are made from them at once
    ids = new_ids(len(raw) // 16, lambda size: raw[:size])
    # Then each is the id uuid.uuid4() makes of its 16 bytes, written as str() writes it
    assert ids == [str(uuid.UUID(bytes=raw[i:i + 16], version=4))
                   for i in range(0, len(raw), 16)]


def test_a_batchs_messages_are_the_ones_built_one_at_a_time(app: Flask) -> None:
    # Given event ids as a batch makes them
    celery_app = app.extensions["celery"]
    event_ids = new_ids(3)
    # When their messages are built for the batch, and one at a time
    batched = [json.loads(m.payload) for m in deliver_messages(celery_app, event_ids)]
    single = [json.loads(build_task_message(celery_app, i, (i,)).payload) for i in event_ids]
    # Then they are the same messages, each with a delivery tag of its own, a random UUID
    tags = [m["properties"].pop("delivery_tag") for m in batched]
    for message in single:
        message["properties"].pop("delivery_tag")
    assert batched == single
    assert len(set(tags)) == 3
    assert all(uuid.UUID(tag).version == 4 for tag in tags)
    assert {m.queue for m in deliver_messages(celery_app, event_ids)} == {
        build_task_message(celery_app, event_ids[0], (event_ids[0],)).queue}
