"""What a producer sees at the HTTP edge: every bad input refused clearly, nothing created."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, OTHER_PRODUCER_KEY, auth
from tests.smtp_server import free_port


def event_with(**payload: Any) -> dict[str, Any]:
    return {**EXAMPLE_EVENT, "payload": {**EXAMPLE_EVENT["payload"], **payload}}


def nothing_was_stored(redis_client: redis.Redis) -> bool:
    """No event, message or counter: only the request throttle's own key may exist."""
    return not [k for k in redis_client.keys("*") if not k.startswith("ef:throttle:")]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.json
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"]
    return body


def test_an_accepted_event_answers_202_with_its_id_and_location(client: FlaskClient) -> None:
    response = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    assert response.status_code == 202
    assert response.json["status"] == "queued"
    assert response.headers["Location"] == f"/api/v1/events/{response.json['id']}"
    event = client.get(response.headers["Location"], headers=auth()).json
    assert event["status"] == "queued"
    assert event["user_id"] == "user-123"
    assert event["history"][0]["step"] == "accepted"


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({k: v for k, v in EXAMPLE_EVENT.items() if k != "user_id"}, "user_id"),
        ({**EXAMPLE_EVENT, "extra": 1}, "extra"),
        (event_with(to_email="not-an-address"), "payload"),
        (event_with(to_email="a@b.com\r\nBcc: victim@example.com"), "payload"),
        (event_with(subject="Hi\r\nBcc: victim@example.com"), "payload"),
        (event_with(subject="=?UTF-8?Q?Hi=0ABcc:_victim@example.com?="), "payload"),
        (event_with(subject="x" * 201), "payload"),
        (event_with(message=""), "payload"),
        ({**EXAMPLE_EVENT, "event_type": "NO_SUCH_TYPE"}, "event_type"),
        ({**EXAMPLE_EVENT, "user_id": "u" * 129}, "user_id"),
        ({**EXAMPLE_EVENT, "user_id": 123}, "user_id"),
    ],
)
def test_a_schema_violation_is_refused_with_422_and_creates_nothing(
    client: FlaskClient, redis_client: redis.Redis, event: dict[str, Any], field: str
) -> None:
    body = assert_problem(client.post("/api/v1/events", json=event, headers=auth()), 422)
    assert field in body["errors"]
    assert nothing_was_stored(redis_client)


def test_a_body_that_is_not_json_is_refused_with_400(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    response = client.post("/api/v1/events", data="{not json", headers=auth(),
                           content_type="application/json")
    assert_problem(response, 400)
    assert nothing_was_stored(redis_client)


def test_a_body_that_is_not_declared_as_json_is_refused_with_415(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    response = client.post("/api/v1/events", data="user_id=1", headers=auth(),
                           content_type="application/x-www-form-urlencoded")
    assert_problem(response, 415)
    assert nothing_was_stored(redis_client)


def test_a_body_over_64_kib_is_refused_with_413(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    response = client.post("/api/v1/events", json=event_with(message="x" * 70_000), headers=auth())
    assert_problem(response, 413)
    assert nothing_was_stored(redis_client)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_a_missing_or_unknown_key_is_refused_with_401(
    client: FlaskClient, redis_client: redis.Redis, headers: dict[str, str]
) -> None:
    response = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=headers)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert nothing_was_stored(redis_client)


def test_with_no_key_configured_every_request_is_refused_with_how_to_configure_keys(
    make_app: Any, redis_client: redis.Redis
) -> None:
    client = make_app(EVENTFLOW_API_KEYS="", EVENTFLOW_ADMIN_KEYS="").test_client()
    body = assert_problem(client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()), 401)
    assert "EVENTFLOW_API_KEYS" in body["detail"]
    assert nothing_was_stored(redis_client)


def test_unknown_urls_and_methods_answer_problem_documents(client: FlaskClient) -> None:
    assert_problem(client.get("/api/v1/nothing-here"), 404)
    response = client.delete("/api/v1/events", headers=auth())
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]
    assert_problem(client.get("/api/v1/events/no-such-id", headers=auth()), 404)


def test_a_producer_sees_only_its_own_events_and_an_admin_sees_all(client: FlaskClient) -> None:
    location = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).headers["Location"]
    assert_problem(client.get(location, headers=auth(OTHER_PRODUCER_KEY)), 404)
    assert client.get(location, headers=auth(ADMIN_KEY)).status_code == 200


def test_a_batch_stores_valid_events_and_reports_invalid_ones_in_order(
    client: FlaskClient, redis_client: redis.Redis,
) -> None:
    events = [EXAMPLE_EVENT, event_with(to_email="nope"), EXAMPLE_EVENT]
    response = client.post("/api/v1/events/batch", json={"events": events}, headers=auth())
    assert response.status_code == 207
    first, second, third = response.json["results"]
    assert first["status"] == "queued" and third["status"] == "queued"
    assert second["status"] == 422 and "payload" in second["errors"]
    assert client.get(f"/api/v1/events/{first['id']}", headers=auth()).status_code == 200
    assert client.get("/stats").json["events"]["accepted"] == 2
    # Each stored event has its message, queued in the batch's order, and is watched
    messages = [json.loads(m) for m in redis_client.lrange("celery", 0, -1)]
    assert [m["headers"]["id"] for m in reversed(messages)] == [first["id"], third["id"]]
    assert set(redis_client.zrange("ef:watch", 0, -1)) == {first["id"], third["id"]}


def test_a_batched_event_is_stored_with_its_message_as_the_same_event_sent_alone(
    client: FlaskClient, redis_client: redis.Redis,
) -> None:
    # Given one event sent alone, then the same event in a batch
    alone = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
    (result,) = client.post("/api/v1/events/batch", json={"events": [EXAMPLE_EVENT]},
                            headers=auth()).json["results"]
    batched = result["id"]
    assert uuid.UUID(batched).version == 4 and str(uuid.UUID(batched)) == batched

    # Then both are stored alike: record, history and message, but for ids and times
    def stored(event_id: str) -> Any:
        record = redis_client.hgetall(f"ef:ev:{event_id}")
        for field in ("created_at", "updated_at"):
            record.pop(field)
        history = [json.loads(e) for e in redis_client.lrange(f"ef:hist:{event_id}", 0, -1)]
        for entry in history:
            entry.pop("at")
        (message,) = [m for m in map(json.loads, redis_client.lrange("celery", 0, -1))
                      if m["headers"]["id"] == event_id]
        assert uuid.UUID(message["properties"].pop("delivery_tag")).version == 4
        message["body"] = json.loads(base64.b64decode(message["body"]))
        return json.loads(json.dumps([record, history, message]).replace(event_id, "ID"))

    assert stored(alone) == stored(batched)


def test_a_batch_over_500_events_is_refused_whole(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    response = client.post("/api/v1/events/batch", json={"events": [EXAMPLE_EVENT] * 501},
                           headers=auth())
    assert_problem(response, 422)
    assert nothing_was_stored(redis_client)


def test_the_same_idempotency_key_returns_the_first_response_and_stores_one_event(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    headers = {**auth(), "Idempotency-Key": "order-42"}
    first = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=headers)
    again = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json["id"] == first.json["id"]
    assert client.get("/stats").json["events"]["accepted"] == 1
    assert redis_client.llen("celery") == 1
    changed = client.post("/api/v1/events", json=event_with(message="Other"), headers=headers)
    assert_problem(changed, 422)
    # Another producer's identical key is its own.
    other = client.post("/api/v1/events", json=EXAMPLE_EVENT,
                        headers={**auth(OTHER_PRODUCER_KEY), "Idempotency-Key": "order-42"})
    assert other.json["id"] != first.json["id"]


def test_with_redis_unreachable_post_and_health_answer_503_promptly(make_app: Any) -> None:
    app: Flask = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    client = app.test_client()
    started = time.monotonic()
    assert_problem(client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()), 503)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json["checks"]["redis"] != "ok"
    assert time.monotonic() - started < 5


def test_health_answers_ok_when_redis_answers(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "checks": {"redis": "ok"}}


SPECIAL_USE_RECIPIENTS = ["ops@printer.local", "ops@mail.corp.internal", "ops@localhost",
                          "ops@qa.test", "ops@x.LocalHost"]


@pytest.mark.parametrize("recipient", SPECIAL_USE_RECIPIENTS)
def test_a_recipient_at_a_special_use_domain_is_refused_unless_allowed(
    make_app: Any, redis_client: redis.Redis, recipient: str
) -> None:
    # Given the default settings, an address at a special-use domain is a 422 naming the
    # setting that allows it, and nothing is stored.
    client = make_app().test_client()
    refused = assert_problem(
        client.post("/api/v1/events", json=event_with(to_email=recipient), headers=auth()), 422)
    assert "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS" in json.dumps(refused["errors"]) \
        or "special-use" in json.dumps(refused["errors"])
    assert nothing_was_stored(redis_client)
    # When the operator allows them, the same event is accepted, alone or in a batch.
    client = make_app(EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS="true").test_client()
    accepted = client.post("/api/v1/events", json=event_with(to_email=recipient), headers=auth())
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    batch = client.post("/api/v1/events/batch", headers=auth(),
                        json={"events": [event_with(to_email=recipient)]})
    assert batch.json["results"][0]["status"] == "queued"


def test_other_reserved_domains_stay_refused_when_special_use_domains_are_allowed(
    make_app: Any,
) -> None:
    client = make_app(EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS="true").test_client()
    for recipient in ("ops@hidden.onion", "ops@nowhere.invalid", "not an address@qa.test"):
        response = client.post("/api/v1/events", json=event_with(to_email=recipient),
                               headers=auth())
        assert_problem(response, 422)


def test_the_doctor_says_when_special_use_domains_are_allowed(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="eventflow.doctor")
    make_app()
    assert "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS" not in caplog.text
    make_app(EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS="true")
    assert "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS=true" in caplog.text
    assert ".internal" in caplog.text
