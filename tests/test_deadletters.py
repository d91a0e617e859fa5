"""Dead-letter operations over HTTP: list, show, replay (one, all, dry run), delete.

Real Redis, a real in-process worker and a scripted SMTP server where delivery matters;
the dead letters that only need to exist are written straight through
``record_dead_letter``, the way the worker writes them, for speed.
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from eventflow.deadletters import DeadLetters, LetterFilter, record_dead_letter
from eventflow.store import EventStore, event_key, history_key
from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, PRODUCER_KEY, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

ADMIN = auth(ADMIN_KEY)

#: An event accepted before its event type was retired: it fails today's schema.
RETIRED_EVENT = {
    "user_id": "user-9",
    "event_type": "NEWSLETTER_2019",
    "payload": {"to_email": "old@example.com", "message": "Hello from the past"},
}


class FixedClock:
    """A clock that stays where it is put."""

    def __init__(self, now: float) -> None:
        self.moment = now

    def now(self) -> float:
        return self.moment


def make_dead_letters(
    app: Flask,
    count: int,
    *,
    event: Mapping[str, Any] = EXAMPLE_EVENT,
    error_type: str = "permanent",
    error: str = "550 5.1.1 No such user",
    clock: Any = None,
) -> list[str]:
    """Store ``count`` accepted events and dead-letter them as the worker does."""
    services = app.extensions["eventflow"]
    store = services.store if clock is None else EventStore(services.redis, clock)
    ids = []
    for _ in range(count):
        event_id = str(uuid.uuid4())
        now = store.now()
        # The record the accept script writes, without its Celery message: these tests
        # look at the queue, and the events are dead-lettered at once.
        record = {"id": event_id, "user_id": event["user_id"], "event_type": event["event_type"],
                  "payload": json.dumps(event["payload"]), "producer": "key-producer",
                  "status": "queued", "attempts": "0", "created_at": now, "updated_at": now}
        pipe = services.redis.pipeline()
        pipe.hset(event_key(event_id), mapping=record)
        pipe.rpush(history_key(event_id), store.entry("accepted", producer="key-producer"))
        pipe.execute()
        assert record_dead_letter(store, event_id, error_type, error) is not None
        ids.append(event_id)
    return ids


def post_event(client: FlaskClient, event: Mapping[str, Any] = EXAMPLE_EVENT) -> str:
    response = client.post("/api/v1/events", json=event, headers=auth())
    assert response.status_code == 202, response.json
    return str(response.json["id"])


def event_view(client: FlaskClient, event_id: str) -> dict[str, Any]:
    view: dict[str, Any] = client.get(f"/api/v1/events/{event_id}", headers=ADMIN).json or {}
    return view


def wait_for_status(client: FlaskClient, event_id: str, status: str,
                    timeout: float = 15) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (view := event_view(client, event_id))["status"] == status and view,
        timeout, message=f"event {event_id} to be {status}",
    )


def listed_ids(client: FlaskClient, query: str = "") -> list[str]:
    response = client.get(f"/api/v1/dead-letters{query}", headers=ADMIN)
    assert response.status_code == 200, response.json
    return [item["id"] for item in response.json["items"]]


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every EventFlow key and its value (but the API's per-key request throttle)."""
    keys = sorted(str(key) for key in client.keys("ef:*"))
    return {key: client.dump(key) for key in keys if not key.startswith("ef:throttle:")}


def metrics(client: FlaskClient) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_a_refused_email_is_listed_fetched_replayed_and_then_delivered_once(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any, app: Flask
) -> None:
    # Given an event dead-lettered because the server refused it with 550 (on policy
    # grounds: a mailbox refusal, 5.1.1, would also suppress the address)
    smtp_server.reply_always("550 5.7.1 Relaying denied", stage="RCPT")
    event_id = post_event(client)
    wait_for_status(client, event_id, "dead_lettered")
    # Then it is listed with the event as accepted and the reason
    page = client.get("/api/v1/dead-letters", headers=ADMIN).json
    (item,) = page["items"]
    assert page["next_cursor"] is None
    assert item["id"] == event_id
    assert item["event"] == EXAMPLE_EVENT
    assert (item["error_type"], item["error"], item["attempts"]) == (
        "permanent", "550 5.7.1 Relaying denied", 1)
    assert item["failed_at"].endswith("Z")
    # And it can be fetched with its history and audit trail
    letter = client.get(f"/api/v1/dead-letters/{event_id}", headers=ADMIN).json
    assert [entry["step"] for entry in letter["history"]] == ["accepted", "attempt"]
    assert [entry["action"] for entry in letter["audit"]] == ["dead_lettered"]
    assert metrics(client)["eventflow_dead_letters"] == 1

    # When the server is told to accept and the dead letter is replayed
    smtp_server.reply_always(None, stage="RCPT")
    response = client.post(f"/api/v1/dead-letters/{event_id}/replay", headers=ADMIN)
    # Then it is queued again under the same id
    assert response.status_code == 202, response.json
    assert response.json["id"] == event_id
    assert response.json["status"] == "queued"
    assert response.headers["Location"] == f"/api/v1/events/{event_id}"
    # And delivered, once
    event = wait_for_status(client, event_id, "delivered")
    assert len(smtp_server.messages_for(event_id)) == 1
    assert event["attempts"] == 2
    # And it is gone from the list, the gauge and the single view
    assert listed_ids(client) == []
    missing = client.get(f"/api/v1/dead-letters/{event_id}", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.mimetype == "application/problem+json"
    assert "replay (queued)" in missing.json["detail"]
    figures = metrics(client)
    assert figures["eventflow_dead_letters"] == 0
    assert figures["eventflow_replays_total{outcome=queued}"] == 1
    # And the timeline tells the whole story
    steps = [entry["step"] for entry in event["history"]]
    assert steps == ["accepted", "attempt", "dead_lettered", "replayed", "attempt", "delivered"]


def test_a_replayed_event_that_fails_again_keeps_its_earlier_replays_in_its_audit_trail(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given an event dead-lettered by a 554
    smtp_server.reply_always("554 5.7.1 Message rejected")
    event_id = post_event(client)
    wait_for_status(client, event_id, "dead_lettered")
    # When it is replayed while the server still refuses it
    assert client.post(f"/api/v1/dead-letters/{event_id}/replay", headers=ADMIN).status_code == 202
    wait_for(lambda: listed_ids(client) == [event_id], message="a new dead letter")
    # Then it is a dead letter again, with the attempts counted on
    letter = client.get(f"/api/v1/dead-letters/{event_id}", headers=ADMIN).json
    assert letter["attempts"] == 2
    # And its audit trail keeps the first failure and the replay, by the admin key's name
    audit = letter["audit"]
    assert [(entry["action"], entry.get("outcome")) for entry in audit] == [
        ("dead_lettered", None), ("replay", "queued"), ("dead_lettered", None)]
    assert audit[1]["by"].startswith("key-")
    assert smtp_server.messages_for(event_id) == []


def test_a_replay_of_a_letter_whose_retries_ran_out_gets_a_fresh_retry_budget(
    make_app: Any, smtp_server: ScriptedSMTPServer, redis_url: str
) -> None:
    # Given an event dead-lettered after its one retry (EVENTFLOW_MAX_RETRIES=1)
    app = make_app(EVENTFLOW_MAX_RETRIES="1")
    client = app.test_client()
    smtp_server.reply_always("451 4.3.0 Try again later")
    with start_worker(app.extensions["celery"], pool="threads", concurrency=2,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        event_id = post_event(client)
        assert wait_for_status(client, event_id, "dead_lettered")["attempts"] == 2
        # When it is replayed and the server answers 451 once more, then accepts
        smtp_server.reply_always(None)
        smtp_server.reply_next("451 4.3.0 Try again later")
        assert client.post(f"/api/v1/dead-letters/{event_id}/replay",
                           headers=ADMIN).status_code == 202
        # Then the 451 is retried, not dead-lettered at once, and the email goes out once
        event = wait_for_status(client, event_id, "delivered")
    assert event["attempts"] == 4
    assert len(smtp_server.messages_for(event_id)) == 1


def test_pages_return_every_dead_letter_exactly_once_while_new_ones_arrive(
    app: Flask, client: FlaskClient
) -> None:
    # Given 250 dead letters that all failed in the same millisecond (the hardest order)
    first = set(make_dead_letters(app, 250, clock=FixedClock(time.time() - 60)))
    # When they are read 40 at a time while 10 new ones fail between two pages
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        query = "?limit=40" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/api/v1/dead-letters{query}", headers=ADMIN).json
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        make_dead_letters(app, 10)
    # Then each of the 250 came exactly once, and the newer ones did not push any out
    assert cursor is None
    assert len(seen) == len(set(seen)) == 250
    assert set(seen) == first
    # And a first page now starts with the newest
    newest = listed_ids(client, "?limit=5")
    assert not set(newest) & first


def test_filters_select_dead_letters_and_bad_parameters_are_refused_with_422(
    app: Flask, client: FlaskClient
) -> None:
    # Given dead letters of different kinds, failed at different times
    old = make_dead_letters(app, 2, clock=FixedClock(1_700_000_000))  # 2023-11-14T22:13:20Z
    exhausted = make_dead_letters(app, 1, error_type="retries_exhausted", error="451 busy")
    signup = make_dead_letters(app, 1, event={**EXAMPLE_EVENT, "event_type": "USER_SIGNUP",
                                              "user_id": "user-7"})
    # Then each filter selects its own
    assert listed_ids(client, "?error_type=retries_exhausted") == exhausted
    assert listed_ids(client, "?event_type=USER_SIGNUP") == signup
    assert listed_ids(client, "?user_id=user-7") == signup
    assert set(listed_ids(client, "?until=2023-11-15T00:00:00Z")) == set(old)
    assert set(listed_ids(client, "?since=2023-11-15")) == set(exhausted + signup)
    assert listed_ids(client, "?since=2023-11-14T22:13:20Z&until=2023-11-14T22:13:21Z")
    # And bad parameters are 422 problem documents naming the parameter
    for query, name in [("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"),
                        ("cursor=bm9wZQ", "cursor"), ("error_type=oops", "error_type"),
                        ("since=yesterday", "since"), ("colour=red", "colour"),
                        ("since=2024-01-02&until=2024-01-01", "until")]:
        response = client.get(f"/api/v1/dead-letters?{query}", headers=ADMIN)
        assert response.status_code == 422, query
        assert response.mimetype == "application/problem+json"
        assert name in response.json["errors"], (query, response.json)
    bulk = client.post("/api/v1/dead-letters/replay?error_type=oops", headers=ADMIN)
    assert bulk.status_code == 422


def test_a_producer_key_is_refused_on_every_dead_letter_endpoint(
    app: Flask, client: FlaskClient
) -> None:
    # Given a dead letter
    (event_id,) = make_dead_letters(app, 1)
    calls = [("get", "/api/v1/dead-letters"), ("get", f"/api/v1/dead-letters/{event_id}"),
             ("delete", f"/api/v1/dead-letters/{event_id}"),
             ("post", f"/api/v1/dead-letters/{event_id}/replay"),
             ("post", "/api/v1/dead-letters/replay")]
    for method, url in calls:
        # Then a producer key gets 403 and no key 401, as problem documents
        refused = getattr(client, method)(url, headers=auth(PRODUCER_KEY))
        assert refused.status_code == 403, url
        assert refused.mimetype == "application/problem+json"
        assert getattr(client, method)(url).status_code == 401
    # And the dead letter is untouched
    assert listed_ids(client) == [event_id]


def test_unknown_ids_are_404_on_show_delete_and_replay(client: FlaskClient) -> None:
    for method, url in [("get", "/api/v1/dead-letters/nope"),
                        ("delete", "/api/v1/dead-letters/nope"),
                        ("post", "/api/v1/dead-letters/nope/replay")]:
        response = getattr(client, method)(url, headers=ADMIN)
        assert response.status_code == 404, url
        assert response.json["type"].endswith("/not-found")


def test_a_dry_run_reports_what_would_be_replayed_and_changes_nothing(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given three dead letters, one of which fails today's schema
    ids = make_dead_letters(app, 2)
    (retired,) = make_dead_letters(app, 1, event=RETIRED_EVENT)
    before = snapshot(redis_client)
    # When a dry run of a bulk replay is asked
    response = client.post("/api/v1/dead-letters/replay?dry_run=true", headers=ADMIN)
    # Then it reports what would be replayed and what would be refused
    assert response.status_code == 202
    report = response.json
    assert report["dry_run"] is True
    assert report["replayed"] == 2
    assert set(report["ids"]) == set(ids)
    assert [(r["id"], r["reason"]) for r in report["rejected"]] == [(retired, "invalid")]
    assert "event_type" in report["rejected"][0]["errors"]
    # And nothing changed in Redis: no message, no status, no audit, no counter
    assert snapshot(redis_client) == before
    assert redis_client.llen("celery") == 0


def test_a_dead_letter_that_fails_todays_schema_is_reported_and_not_sent(
    app: Flask, client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a valid dead letter and one whose event type has been retired since
    (valid,) = make_dead_letters(app, 1)
    (retired,) = make_dead_letters(app, 1, event=RETIRED_EVENT)
    # When both are replayed
    response = client.post("/api/v1/dead-letters/replay", headers=ADMIN)
    # Then the valid one is replayed and the retired one reported with its errors
    assert response.status_code == 202
    report = response.json
    assert (report["replayed"], report["ids"], report["dry_run"]) == (1, [valid], False)
    (rejected,) = report["rejected"]
    assert rejected["id"] == retired
    assert rejected["errors"]["event_type"]
    # And only the valid one is delivered
    wait_for_status(client, valid, "delivered")
    assert len(smtp_server.messages_for(valid)) == 1
    assert smtp_server.messages_for(retired) == []
    # And the retired one stays a dead letter, with the refusal in its audit trail
    assert listed_ids(client) == [retired]
    assert event_view(client, retired)["status"] == "dead_lettered"
    letter = client.get(f"/api/v1/dead-letters/{retired}", headers=ADMIN).json
    assert letter["audit"][-1]["outcome"] == "invalid"
    # And replaying it alone is refused with the same errors
    single = client.post(f"/api/v1/dead-letters/{retired}/replay", headers=ADMIN)
    assert single.status_code == 422
    assert single.json["errors"]["event_type"]
    figures = metrics(client)
    assert figures["eventflow_replays_total{outcome=queued}"] == 1
    assert figures["eventflow_replays_total{outcome=invalid}"] == 2
    assert smtp_server.messages_for(retired) == []


def test_a_bulk_replay_is_paced_at_the_replay_rate(
    make_app: Any, redis_client: redis.Redis, smtp_server: ScriptedSMTPServer
) -> None:
    # Given 10 dead letters, a replay rate of 5/s and a 4 s visibility timeout, so that
    # messages may be scheduled at most 1 s ahead
    app = make_app(EVENTFLOW_REPLAY_RATE="5", EVENTFLOW_VISIBILITY_TIMEOUT="4",
                   EVENTFLOW_SMTP_TIMEOUT="0.5")
    client = app.test_client()
    ids = make_dead_letters(app, 10)
    # When all are replayed
    report = client.post("/api/v1/dead-letters/replay", headers=ADMIN)
    # Then the messages that fit in the schedule are queued, 200 ms apart
    assert report.status_code == 202
    body = report.json
    replayed = body["replayed"]
    assert replayed in (6, 7)  # 0 to 1000 ms ahead, and 1200 ms if the loop took 200 ms
    messages = [json.loads(raw) for raw in redis_client.lrange("celery", 0, -1)]
    etas = sorted(m["headers"]["eta"] for m in messages if m["headers"]["eta"])
    assert len(messages) == replayed and len(etas) == replayed - 1
    times = [datetime.fromisoformat(eta).timestamp() for eta in etas]
    assert all(0.19 <= b - a <= 0.21 for a, b in itertools.pairwise(times))
    # And the rest wait in the dead-letter queue, with the time to ask again
    assert body["deferred"] == 10 - replayed
    assert 0 < body["retry_after"] <= 1.5
    assert int(report.headers["Retry-After"]) >= 1
    assert len(listed_ids(client)) == 10 - replayed
    with start_worker(app.extensions["celery"], pool="threads", concurrency=2,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        for event_id in body["ids"]:
            wait_for_status(client, event_id, "delivered")
        # When the rest are replayed, with a worker waiting
        rest = client.post("/api/v1/dead-letters/replay", headers=ADMIN).json
        assert (rest["replayed"], rest["deferred"]) == (10 - replayed, 0)
        # Then the worker sends them no faster than the replay rate
        sent = [wait_for_status(client, event_id, "delivered") for event_id in rest["ids"]]
    delivered = sorted(datetime.fromisoformat(event["delivered_at"]).timestamp()
                       for event in sent)
    assert delivered[-1] - delivered[0] >= (len(sent) - 1) * 0.2 - 0.05
    # And each of the 10 went out once
    assert sorted(m.event_id for m in smtp_server.received) == sorted(ids)


def test_deleting_a_dead_letter_removes_it_and_keeps_who_did_it(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given two dead letters
    gone, kept = make_dead_letters(app, 2)
    # When one is deleted
    response = client.delete(f"/api/v1/dead-letters/{gone}", headers=ADMIN)
    # Then it answers 204 and the letter is gone from the list and the gauge
    assert response.status_code == 204
    assert listed_ids(client) == [kept]
    assert metrics(client)["eventflow_dead_letters"] == 1
    assert client.delete(f"/api/v1/dead-letters/{gone}", headers=ADMIN).status_code == 404
    # And the event stays readable, for the usual retention, with the deletion in it
    event = event_view(client, gone)
    assert event["status"] == "dead_lettered"
    assert event["history"][-1]["step"] == "dead_letter_deleted"
    assert redis_client.ttl(f"ef:ev:{gone}") > 0
    audit = [json.loads(e) for e in redis_client.lrange(f"ef:audit:{gone}", 0, -1)]
    assert [e["action"] for e in audit] == ["dead_lettered", "deleted"]



# -- long queues: exact cursors, bounded bulk operations --------------------------------


def make_dead_letters_at(app: Flask, moments_ms: list[int], **kwargs: Any) -> list[str]:
    """One dead letter failed at each of these times (milliseconds since the epoch)."""
    clock = FixedClock(0)
    ids = []
    for moment_ms in moments_ms:
        clock.moment = (moment_ms + 0.4) / 1000  # inside that millisecond, however rounded
        ids += make_dead_letters(app, 1, clock=clock, **kwargs)
    return ids


def spread_moments(count: int, *, seed: int, step_ms: int = 3) -> list[int]:
    """``count`` distinct times of failure in the last hours, in a shuffled order."""
    base = int(time.time() * 1000) - 4 * 3600 * 1000
    moments = [base + step_ms * k for k in range(count)]
    random.Random(seed).shuffle(moments)
    return moments


def read_pages(client: FlaskClient, query: str, sizes: list[int],
               between: Any = None) -> list[dict[str, Any]]:
    """Every page of a listing, ``sizes`` in turn; ``between(items so far)`` between pages."""
    items: list[dict[str, Any]] = []
    cursor = None
    for number, size in enumerate(itertools.cycle(sizes)):
        assert number < 3000, "the listing does not end"
        url = f"/api/v1/dead-letters?limit={size}{query}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(url, headers=ADMIN)
        assert response.status_code == 200, response.json
        page = response.json["items"]
        assert len(page) <= size
        items += page
        cursor = response.json["next_cursor"]
        if cursor is None:
            return items
        if between is not None:
            between(items)
    raise AssertionError("unreachable")


def queue_order(redis_client: redis.Redis) -> list[str]:
    """The ids waiting, newest first, ties by id: the order the listing promises."""
    return list(redis_client.zrevrange("ef:dlq", 0, -1))


def test_a_thousand_letters_failed_at_distinct_times_are_listed_once_in_pages_of_any_size(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given 1,000 dead letters that failed at distinct milliseconds, and 40 that share one
    moments = spread_moments(1000, seed=1)
    ids = make_dead_letters_at(app, moments)
    ids += make_dead_letters_at(app, [moments[0] + 1] * 40)
    order = queue_order(redis_client)
    assert sorted(order) == sorted(ids)
    # When the largest page is asked for
    first = listed_ids(client, "?limit=500")
    # Then it holds the newest 500, each once
    assert first == order[:500]
    # And pages of odd sizes, one letter to 500, give each letter once, newest first
    for sizes in ([7, 499, 1, 13, 211, 500, 3], [1, 2], [333]):
        items = read_pages(client, "", sizes)
        assert [item["id"] for item in items] == order
        failed = [item["failed_at"] for item in items]
        assert failed == sorted(failed, reverse=True)


@pytest.mark.timeout(60)
def test_filters_that_match_few_of_many_letters_page_through_exactly_those(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given 1,000 dead letters, among which 7 whose retries ran out and 5 of one user,
    # failed at scattered times
    moments = spread_moments(1012, seed=2)
    exhausted = make_dead_letters_at(app, moments[:7], error_type="retries_exhausted",
                                     error="451 4.3.0 busy")
    rare = make_dead_letters_at(app, moments[7:12],
                                event={**EXAMPLE_EVENT, "user_id": "user-rare"})
    make_dead_letters_at(app, moments[12:])
    order = queue_order(redis_client)
    # When each filter is read two or three letters a page
    by_error = read_pages(client, "&error_type=retries_exhausted", [2, 3])
    by_user = read_pages(client, "&user_id=user-rare", [2])
    # Then each gives exactly its letters, once, newest first
    assert [item["id"] for item in by_error] == [i for i in order if i in set(exhausted)]
    assert [item["id"] for item in by_user] == [i for i in order if i in set(rare)]
    # And a time window, paged, gives exactly the letters that failed inside it
    low, high = sorted(moments)[300], sorted(moments)[420]
    window = f"&since={iso_ms(low)}&until={iso_ms(high)}"
    inside = read_pages(client, window, [11, 4])
    expected = [i for i in order
                if low <= int(redis_client.zscore("ef:dlq", i) or 0) < high]
    assert len(expected) == 120
    assert [item["id"] for item in inside] == expected
    # And a filter and a window together narrow further
    both = read_pages(client, window + "&error_type=retries_exhausted", [1])
    assert {item["id"] for item in both} == set(expected) & set(exhausted)


def iso_ms(moment_ms: int) -> str:
    seconds, millis = divmod(moment_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def test_letters_arriving_and_leaving_between_pages_neither_repeat_nor_hide_others(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given 1,000 dead letters failed at distinct times, and 100 in one millisecond
    moments = spread_moments(1000, seed=3)
    make_dead_letters_at(app, moments + [sorted(moments)[500] + 1] * 100)
    original = queue_order(redis_client)
    gone: set[str] = set()
    late: list[str] = []

    def meanwhile(items: list[dict[str, Any]]) -> None:
        # Between two pages: the letter the cursor stands on is deleted, two letters not
        # read yet are deleted and one replayed, three newer letters fail, and one
        # fails (as from a slow worker's clock) at a time the listing has not reached.
        seen = {item["id"] for item in items}
        unread = [i for i in queue_order(redis_client) if i not in seen and i not in late]
        cursor_letter = items[-1]["id"]
        for event_id in (cursor_letter, *unread[5:7]):
            assert client.delete(f"/api/v1/dead-letters/{event_id}",
                                 headers=ADMIN).status_code == 204
        assert client.post(f"/api/v1/dead-letters/{unread[9]}/replay",
                           headers=ADMIN).status_code == 202
        gone.update(unread[5:7] + [unread[9]])
        make_dead_letters(app, 3)
        older = int(redis_client.zscore("ef:dlq", unread[20]) or 0)
        late.extend(make_dead_letters_at(app, [older + 1]))

    # When the queue is read 37 and 263 letters a page, with all that between pages
    items = read_pages(client, "", [37, 263], between=meanwhile)
    listed = [item["id"] for item in items]
    # Then no letter came twice, none that stayed was missed, none that left came back
    assert len(listed) == len(set(listed))
    assert set(listed) == (set(original) - gone) | set(late)
    # And the order held: newest first
    failed = [item["failed_at"] for item in items]
    assert failed == sorted(failed, reverse=True)


@pytest.mark.timeout(60)
def test_a_dry_run_and_a_bulk_replay_over_many_letters_take_each_letter_once(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # Given 1,200 dead letters failed at distinct times, and a replay rate that fits them all
    app = make_app(EVENTFLOW_REPLAY_RATE="1000")
    client = app.test_client()
    ids = make_dead_letters_at(app, spread_moments(1200, seed=4))
    # When a dry run is asked
    dry = client.post("/api/v1/dead-letters/replay?dry_run=true", headers=ADMIN)
    # Then it ends, reporting each letter once, and changes nothing
    assert dry.status_code == 202
    assert dry.json["replayed"] == 1200
    assert sorted(dry.json["ids"]) == sorted(ids)
    assert redis_client.zcard("ef:dlq") == 1200
    assert redis_client.llen("celery") == 0
    # When 500 of them are replayed, then the rest
    some = client.post("/api/v1/dead-letters/replay", json={"limit": 500}, headers=ADMIN).json
    rest = client.post("/api/v1/dead-letters/replay", headers=ADMIN).json
    # Then each letter is queued once: one message each, and the queue is empty
    assert (some["replayed"], rest["replayed"], rest["deferred"]) == (500, 700, 0)
    assert sorted(some["ids"] + rest["ids"]) == sorted(ids)
    messages = [json.loads(raw) for raw in redis_client.lrange("celery", 0, -1)]
    assert sorted(m["headers"]["argsrepr"].strip("(),'") for m in messages) == sorted(ids)
    assert redis_client.zcard("ef:dlq") == 0


# -- a reply lost after Redis ran a script -------------------------------------------


def sent_twice(service: DeadLetters, name: str) -> None:
    """Make ``service`` send each call of one of its scripts twice, as redis-py does
    when the connection drops after the command went out: the first reply is lost."""
    script = getattr(service, name)

    def run_twice(**kwargs: Any) -> Any:
        script(**kwargs)
        return script(**kwargs)

    setattr(service, name, run_twice)


def dead_letter_service(app: Flask) -> DeadLetters:
    services = app.extensions["eventflow"]
    return DeadLetters(services.store, app.extensions["celery"], services.settings)


def test_a_replay_run_twice_after_a_lost_reply_queues_the_event_once(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given a dead letter, and a client whose replay call reaches Redis twice
    (event_id,) = make_dead_letters(app, 1)
    service = dead_letter_service(app)
    sent_twice(service, "_replay")
    # When it is replayed
    outcome = service.replay(event_id, by="key-admin")
    # Then the answer is the first run's: queued
    assert outcome.state == "queued"
    # And the event was queued once, counted once, and told once
    assert redis_client.llen("celery") == 1
    assert redis_client.hget("ef:stats", "replays:queued") == "1"
    event = event_view(client, event_id)
    assert event["status"] == "queued"
    assert [e["step"] for e in event["history"]].count("replayed") == 1
    assert [e["action"] for e in service.audit(event_id)] == ["dead_lettered", "replay"]
    assert listed_ids(client) == []


def test_a_delete_or_a_refused_replay_run_twice_is_recorded_once(
    app: Flask, client: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given a dead letter to delete and one that fails today's schema
    (gone,) = make_dead_letters(app, 1)
    (retired,) = make_dead_letters(app, 1, event=RETIRED_EVENT)
    service = dead_letter_service(app)
    sent_twice(service, "_delete")
    # When the first is deleted, the call reaching Redis twice
    deleted = service.delete(gone, by="key-admin")
    # Then the delete answers as the first run did, and is in the audit trail once
    assert deleted is True
    assert [e["action"] for e in service.audit(gone)] == ["dead_lettered", "deleted"]
    assert [e["step"] for e in event_view(client, gone)["history"]].count(
        "dead_letter_deleted") == 1
    # When the second is replayed, the refusal reaching Redis twice
    sent_twice(service, "_refuse")
    refused = service.replay(retired, by="key-admin")
    # And the refusal is counted and told once; the letter stays
    assert refused.state == "invalid"
    assert redis_client.hget("ef:stats", "replays:invalid") == "1"
    assert [e.get("outcome") for e in service.audit(retired)] == [None, "invalid"]
    assert listed_ids(client) == [retired]


class ResendingRedis:
    """A Redis client whose pipelines are sent twice, the first reply lost, as redis-py's
    retry sends a whole pipeline again when the connection drops after it went out."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def twice(*exec_args: Any, **exec_kwargs: Any) -> Any:
            stack, scripts = list(pipe.command_stack), set(pipe.scripts)
            execute(*exec_args, **exec_kwargs)
            pipe.command_stack, pipe.scripts = stack, scripts
            return execute(*exec_args, **exec_kwargs)

        pipe.execute = twice
        return pipe


def test_a_bulk_replay_sent_twice_after_a_lost_reply_queues_each_letter_once(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # Given 150 dead letters, and a client whose pipelines reach Redis twice
    app = make_app(EVENTFLOW_REPLAY_RATE="1000")
    ids = make_dead_letters(app, 150)
    service = dead_letter_service(app)
    service.redis = ResendingRedis(service.redis)  # type: ignore[assignment]
    # When they are all replayed
    report = service.replay_matching(LetterFilter(), by="key-admin")
    # Then each is reported queued, and queued and counted once
    assert sorted(report.replayed) == sorted(ids)
    assert report.skipped == []
    assert redis_client.llen("celery") == 150
    assert redis_client.hget("ef:stats", "replays:queued") == "150"
    assert redis_client.zcard("ef:dlq") == 0
