"""Plain ``POST /api/v1/events`` answered below Flask (eventflow/fastpath.py): the same
answers, records and metrics as the view, and every other request left to the view."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLE_EVENT, PRODUCER_KEY, auth
from tests.smtp_server import free_port

#: A content type that means the same JSON but that the fast path leaves to the view.
VIEW_JSON = "application/json; charset=utf-8"


def views_reached(app: Flask) -> list[str]:
    """The paths of the requests that reached Flask's dispatch, recorded as they come."""
    seen: list[str] = []

    @app.before_request
    def _seen() -> None:
        from flask import request

        seen.append(request.path)

    return seen


def post(client: FlaskClient, event: Any, content_type: str = "application/json",
         **headers: str) -> Any:
    return client.post("/api/v1/events", data=json.dumps(event),
                       headers={**auth(), "Content-Type": content_type, **headers})


def stored(redis_client: redis.Redis, event_id: str) -> dict[str, str]:
    record = redis_client.hgetall(f"ef:ev:{event_id}")
    return {k: v for k, v in record.items() if k not in ("id", "created_at", "updated_at")}


def test_a_plain_event_is_answered_without_flask_exactly_as_the_view_answers_it(
    app: Flask, client: FlaskClient, redis_client: redis.Redis,
) -> None:
    seen = views_reached(app)
    # Given the same event sent once as the fast path takes it, once as only the view does
    fast = post(client, EXAMPLE_EVENT)
    assert seen == []
    view = post(client, EXAMPLE_EVENT, VIEW_JSON)
    assert seen == ["/api/v1/events"]
    # Then both answers are the same but for the id
    for response in (fast, view):
        assert response.status_code == 202
        assert response.headers["Location"] == f"/api/v1/events/{response.json['id']}"
    assert sorted(fast.headers.keys()) == sorted(view.headers.keys())
    assert fast.headers["Content-Type"] == view.headers["Content-Type"] == "application/json"
    assert fast.headers["RateLimit-Limit"] == view.headers["RateLimit-Limit"]
    assert {**fast.json, "id": ""} == {**view.json, "id": ""}
    assert fast.json["quota"]["remaining"] == view.json["quota"]["remaining"] == 20
    assert int(fast.headers["RateLimit-Remaining"]) == int(view.headers["RateLimit-Remaining"]) + 1
    # And both events are stored alike, each with its message
    assert stored(redis_client, fast.json["id"]) == stored(redis_client, view.json["id"])
    assert redis_client.llen("celery") == 2
    assert redis_client.hget("ef:stats", "accepted") == "2"


def test_the_fast_path_counts_its_answers_in_the_same_http_metrics(
    app: Flask, client: FlaskClient,
) -> None:
    for content_type in ("application/json", VIEW_JSON):
        assert post(client, EXAMPLE_EVENT, content_type).status_code == 202
    text = client.get("/metrics").get_data(as_text=True)
    count = re.search(
        r'^flask_http_request_duration_seconds_count\{method="POST",status="202",'
        r'url_rule="/api/v1/events"\} (\S+)$', text, re.MULTILINE)
    assert count and float(count.group(1)) == 2.0
    total = re.search(r'^flask_http_request_total\{method="POST",status="202"\} (\S+)$', text,
                      re.MULTILINE)
    assert total and float(total.group(1)) == 2.0


@pytest.mark.parametrize(
    ("event", "headers", "status"),
    [
        # Valid, but not plainly: an encoded word in the subject is for the schema to check
        ({**EXAMPLE_EVENT, "payload": {"to_email": "a@b.com", "message": "Hi",
                                       "subject": "=?UTF-8?Q?Caf=C3=A9?="}}, {}, 202),
        ({**EXAMPLE_EVENT, "payload": {"to_email": "a@b.com", "message": "x"}, "extra": 1}, {},
         422),
        (EXAMPLE_EVENT, {"Idempotency-Key": "k-1"}, 202),
        (EXAMPLE_EVENT, {"Authorization": "Bearer not-a-key"}, 401),
        ("not an object", {}, 422),
    ],
)
def test_every_other_request_goes_to_the_view_with_its_body_intact(
    app: Flask, client: FlaskClient, event: Any, headers: dict[str, str], status: int,
) -> None:
    seen = views_reached(app)
    response = post(client, event, **headers)
    assert response.status_code == status, response.get_data(as_text=True)
    assert seen == ["/api/v1/events"]
    if status == 202:  # the view read the body the fast path had read first
        assert response.json["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "detail"),
    [(b'{"user_id": "u1", ', "not valid JSON"), (b"[" * 60_000, "nested too deeply")],
)
def test_a_body_that_is_not_json_reaches_the_view_as_sent(
    app: Flask, client: FlaskClient, body: bytes, detail: str,
) -> None:
    seen = views_reached(app)
    response = client.post("/api/v1/events", data=body,
                           headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert detail in response.json["detail"]
    assert seen == ["/api/v1/events"]


def test_redis_down_is_answered_503_by_the_apps_handler_and_counted(
    make_app: Callable[..., Flask],
) -> None:
    # Given an app whose Redis does not answer
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    client = app.test_client()
    # Then a plain event gets the view's own 503 problem, and nothing is tried twice
    response = post(client, EXAMPLE_EVENT)
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.json["title"] and "nothing was stored" in response.json["detail"]
    assert response.headers["Retry-After"] == "5"
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'^flask_http_request_total\{method="POST",status="503"\} 1\.0$', text,
                     re.MULTILINE)


def test_a_request_over_the_api_rate_limit_gets_the_views_429(
    make_app: Callable[..., Flask], redis_client: redis.Redis,
) -> None:
    app = make_app(EVENTFLOW_API_RATE_LIMIT="2/minute")
    client = app.test_client()
    assert [post(client, EXAMPLE_EVENT).status_code for _ in range(2)] == [202, 202]
    refused = post(client, EXAMPLE_EVENT)
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert redis_client.hget("ef:stats", "accepted") == "2"
    assert PRODUCER_KEY not in refused.get_data(as_text=True)


# -- the fast path and the view are one behaviour ---------------------------------------

EXAMPLES = int(os.environ.get("EVENTFLOW_FUZZ_EXAMPLES", "50"))

_text = st.text(st.characters(codec="utf-8"), max_size=12)

#: Plainly valid events, each field from a few kinds of valid values.
_valid_events = st.fixed_dictionaries({
    "user_id": st.sampled_from(["user-123", "u-1", "x" * 255, "ünïcode"]),
    "event_type": st.sampled_from(["USER_NOTIFICATION", "PASSWORD_RESET"]),
    "payload": st.fixed_dictionaries(
        {"to_email": st.sampled_from(["test@example.com", "Test@Example.COM",
                                      "a.b+tag@example.org", "ü@example.com"]),
         "message": st.sampled_from(["Hello", "x" * 20000, "Zeile\nzwei", "ä"])},
        optional={"subject": st.sampled_from(["Hi", "Your report"])}),
})

#: One change that may make an event invalid (or not plain): where, and to what.
_MUTATIONS: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    (("user_id",), st.sampled_from(["", "u" * 256, "a\nb", "a\rb", None, 7]) | _text),
    (("event_type",), st.sampled_from(["NOPE", "user_notification", "", None]) | _text),
    (("payload",), st.sampled_from([None, [], "text", {}])),
    (("payload", "to_email"), st.sampled_from(
        ["no-at-sign", "x@localhost", "a@b.test", "", "a@example.com\r\nBcc: b@example.com",
         "a" * 250 + "@example.com", None, 1]) | _text),
    (("payload", "message"), st.sampled_from(["", "x" * 20001, None, 1, ["Hello"]]) | _text),
    (("payload", "subject"), st.sampled_from(["", "Two\nlines", "s" * 999, None]) | _text),
    (("payload", "data"), st.sampled_from([{"a": 1}, {}, "x", {"big": "x" * 17000}])),
    (("payload", "locale"), st.sampled_from(["fr-CA", "", "not a locale"])),
    (("payload", "cc"), st.just("b@example.com")),
    (("unknown",), st.booleans()),
]


def _mutated(event: dict[str, Any]) -> st.SearchStrategy[Any]:
    def apply(index: int, value: Any) -> Any:
        path, _ = _MUTATIONS[index]
        changed = json.loads(json.dumps(event))
        target = changed
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return changed

    return st.sampled_from(range(len(_MUTATIONS))).flatmap(
        lambda index: _MUTATIONS[index][1].map(lambda value: apply(index, value)))


_events = _valid_events.flatmap(lambda event: st.sampled_from([True, False, False]).flatmap(
    lambda plain: st.just(event) if plain else _mutated(event)))
_bodies = _events.map(lambda event: json.dumps(event).encode()) | st.sampled_from(
    [b"", b"{", b"\xff\xfe", b"null", b"[]", b"[" * 5000 + b"]" * 5000])
_authorizations = st.sampled_from([
    *[f"Bearer {PRODUCER_KEY}"] * 10, f"bearer {PRODUCER_KEY}", f"Bearer  {PRODUCER_KEY}",
    "Bearer unknown-key-0123456789abcdef", f"Basic {PRODUCER_KEY}", None])


def _record_count(redis_client: redis.Redis) -> int:
    return sum(1 for _ in redis_client.scan_iter("ef:ev:*"))


@settings(max_examples=EXAMPLES * 4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=_bodies, authorization=_authorizations)
def test_any_body_and_key_get_the_same_answer_and_record_from_the_fast_path_and_the_view(
    app: Flask, client: FlaskClient, redis_client: redis.Redis, body: bytes,
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    # Given the same body and key sent once as the fast path takes it (plain JSON type),
    # once with a content type that only the view takes
    answers = []
    for content_type in ("application/json", VIEW_JSON):
        before = _record_count(redis_client)
        response = client.post("/api/v1/events", data=body,
                               headers={**headers, "Content-Type": content_type})
        answers.append((response, _record_count(redis_client) - before))
    (fast, fast_new), (view, view_new) = answers
    # Then the status, the body's shape, the header names and the records made are alike
    assert fast.status_code == view.status_code, (fast.json, view.json)
    assert fast_new == view_new == (1 if fast.status_code == 202 else 0)
    assert sorted(fast.headers.keys()) == sorted(view.headers.keys())
    assert fast.headers["Content-Type"] == view.headers["Content-Type"]
    if fast.status_code == 202:
        assert {**fast.json, "id": ""} == {**view.json, "id": ""}
        assert fast.headers["Location"] == f"/api/v1/events/{fast.json['id']}"
        assert stored(redis_client, fast.json["id"]) == stored(redis_client, view.json["id"])
    else:
        assert fast.json == view.json
