"""What a public endpoint needs: keys, scopes, request limits, no header injection, Flower
behind a password."""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from eventflow.auth import find_key
from eventflow.settings import ApiKey, ConfigError, Settings, parse_keys
from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, OTHER_PRODUCER_KEY, PRODUCER_KEY, auth
from tests.processes import Process, procfile_command
from tests.smtp_server import ScriptedSMTPServer, free_port
from tests.waiting import wait_for

BILLING_SECRET = "billing-secret-key-0123456789abcdef"
BILLING_DIGEST = hashlib.sha256(BILLING_SECRET.encode()).hexdigest()

#: Ports of this file's own servers (EventFlow's tests keep to 16600-16699 here).
FLOWER_PORTS = range(16620, 16640)


def event(**payload: Any) -> dict[str, Any]:
    return {**EXAMPLE_EVENT, "payload": {**EXAMPLE_EVENT["payload"], **payload}}


# -- keys ----------------------------------------------------------------------------------


def test_keys_are_read_as_name_sha256_digest_or_as_the_secret_itself() -> None:
    # Given one hashed entry and one plain secret
    keys = parse_keys("EVENTFLOW_API_KEYS", f"billing:sha256:{BILLING_DIGEST}, {PRODUCER_KEY}",
                      admin=False)
    # Then the hashed one keeps its name and digest, the plain one gets a derived name
    assert keys[0] == ApiKey("billing", bytes.fromhex(BILLING_DIGEST), False)
    assert keys[1].digest == hashlib.sha256(PRODUCER_KEY.encode()).digest()
    assert keys[1].name.startswith("key-") and PRODUCER_KEY not in keys[1].name
    # And the digest never shows in a repr (it would end up in logs)
    assert BILLING_DIGEST not in repr(keys) and bytes.fromhex(BILLING_DIGEST).hex() not in repr(keys)


@pytest.mark.parametrize("raw, problem", [
    ("billing:sha256:abc", "entry 1 should be name:sha256:<64 hex digits>"),
    (f":sha256:{BILLING_DIGEST}", "entry 1 should be name:sha256:<64 hex digits>"),
    (f"ok:sha256:{BILLING_DIGEST},short", "entry 2 is shorter than 16 characters"),
    (f"x:sha256:{'g' * 64}", "entry 1 should be name:sha256:<64 hex digits>"),
])
def test_a_malformed_key_entry_stops_the_process_naming_the_variable_and_entry(
    raw: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"EVENTFLOW_ADMIN_KEYS": raw})
    assert str(caught.value) == f"EVENTFLOW_ADMIN_KEYS: {problem}"
    assert "short" not in str(caught.value).replace("shorter", "")  # the secret is not echoed


def test_find_key_makes_every_comparison_in_constant_time_even_after_a_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given three keys, the first one matching
    keys = parse_keys("K", f"{PRODUCER_KEY},{OTHER_PRODUCER_KEY},{ADMIN_KEY}", admin=False)
    compared = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    # When the first key is looked up
    found = find_key(keys, PRODUCER_KEY)
    # Then it is found, and yet every key was compared (no early exit to time)
    assert found is keys[0]
    assert compared == [key.digest for key in keys]
    assert find_key(keys, "nope-not-a-key-at-all") is None


def test_a_hashed_key_works_and_its_name_is_recorded_on_the_events_it_creates(
    make_app: Callable[..., Flask], redis_client: redis.Redis
) -> None:
    # Given a key configured only as its SHA-256 digest
    client = make_app(EVENTFLOW_API_KEYS=f"billing:sha256:{BILLING_DIGEST}").test_client()
    # When it sends an event
    created = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth(BILLING_SECRET))
    assert created.status_code == 202
    # Then the event names its producer, and the history too
    view = client.get(f"/api/v1/events/{created.json['id']}", headers=auth(BILLING_SECRET)).json
    assert view["producer"] == "billing"
    assert view["history"][0]["producer"] == "billing"
    # And the secret is stored nowhere in Redis
    for key in redis_client.keys("*"):
        assert BILLING_SECRET not in key
        if redis_client.type(key) == "hash":
            assert BILLING_SECRET not in str(redis_client.hgetall(key))


def test_401_says_who_you_are_is_unknown_and_403_says_you_may_not(client, app: Flask) -> None:
    # No key, another scheme, an unknown key: 401 with a Bearer challenge
    for headers in ({}, {"Authorization": f"Basic {PRODUCER_KEY}"}, auth("unknown-key-0123456789")):
        answer = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="eventflow"'
        assert answer.mimetype == "application/problem+json"
    # A producer key on the admin endpoints: 403
    for method, path in (("get", "/api/v1/dead-letters"), ("post", "/api/v1/dead-letters/replay"),
                         ("delete", "/api/v1/dead-letters/x")):
        answer = getattr(client, method)(path, headers=auth(PRODUCER_KEY))
        assert answer.status_code == 403, path
        assert answer.json["type"].endswith("/forbidden")
    # And an admin key may
    assert client.get("/api/v1/dead-letters", headers=auth(ADMIN_KEY)).status_code == 200
    # Nothing was stored by any refused request
    assert client.get("/stats").json["events"]["accepted"] == 0


def test_with_no_key_configured_every_request_is_refused_with_how_to_configure_one(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(EVENTFLOW_API_KEYS="", EVENTFLOW_ADMIN_KEYS="").test_client()
    answer = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    assert answer.status_code == 401
    assert "EVENTFLOW_API_KEYS" in answer.json["detail"]


def test_a_producer_sees_only_its_own_events_and_an_admin_sees_all(client) -> None:
    event_id = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
    assert client.get(f"/api/v1/events/{event_id}", headers=auth(OTHER_PRODUCER_KEY)).status_code == 404
    assert client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY)).status_code == 200


# -- request rate limit -------------------------------------------------------------------


def test_a_key_over_the_request_rate_limit_gets_429_with_retry_after_and_nothing_is_stored(
    make_app: Callable[..., Flask],
) -> None:
    # Given a limit of 3 requests a minute per key
    client = make_app(EVENTFLOW_API_RATE_LIMIT="3/minute").test_client()
    # When one key sends 4 events
    answers = [client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()) for _ in range(4)]
    # Then the first 3 are accepted, counting down RateLimit-Remaining
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert {a.headers["RateLimit-Limit"] for a in answers} == {"3"}
    # And the 4th is a problem document with Retry-After (one request's worth: 20 s)
    refused = answers[3]
    assert refused.mimetype == "application/problem+json"
    assert refused.json["status"] == 429
    assert 15 <= int(refused.headers["Retry-After"]) <= 20
    assert 55 <= int(refused.headers["RateLimit-Reset"]) <= 60
    assert client.get("/stats").json["events"]["accepted"] == 3
    # And another key has its own allowance
    other = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth(OTHER_PRODUCER_KEY))
    assert other.status_code == 202 and other.headers["RateLimit-Remaining"] == "2"
    # And reads count too
    assert client.get(f"/api/v1/events/{answers[0].json['id']}", headers=auth()).status_code == 429


def test_the_allowance_comes_back_steadily_rather_than_all_at_a_window_boundary(
    make_app: Callable[..., Flask],
) -> None:
    # Given 4 requests a second (one every 250 ms), all used at once
    client = make_app(EVENTFLOW_API_RATE_LIMIT="4/second").test_client()
    codes = [client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).status_code
             for _ in range(5)]
    assert codes == [202] * 4 + [429]
    # When 300 ms pass, one request is allowed again, and only one
    time.sleep(0.3)
    codes = [client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).status_code
             for _ in range(2)]
    assert codes == [202, 429]


def test_the_accepted_answer_reports_the_users_email_quota_left(
    make_app: Callable[..., Flask], smtp_server: ScriptedSMTPServer,
) -> None:
    # Given a quota of 2 emails a day, and a worker
    app = make_app(EVENTFLOW_RATE_LIMIT="2/day")
    client = app.test_client()
    first = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    # Then the answer reports the whole quota left (it is used at send time)
    assert first.json["quota"] == {"limit": 2, "remaining": 2, "window": "day"}
    from celery.contrib.testing.worker import start_worker

    with start_worker(app.extensions["celery"], pool="threads", concurrency=1,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        wait_for(lambda: smtp_server.messages_for(first.json["id"]), timeout=15,
                 message="the first email")
    # When the next event of that user is accepted, one is left; another user has both
    second = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    assert second.json["quota"] == {"limit": 2, "remaining": 1, "window": "day"}
    other = client.post("/api/v1/events", json={**EXAMPLE_EVENT, "user_id": "someone-else"},
                        headers=auth())
    assert other.json["quota"]["remaining"] == 2


# -- header injection ---------------------------------------------------------------------

INJECTIONS = [
    "Hello\r\nBcc: victim@example.org",
    "Hello\nBcc: victim@example.org",
    "Hello\rBcc: victim@example.org",
    "=?UTF-8?Q?Hello=0ABcc:_victim@example.org?=",
    "=?UTF-8?B?SGVsbG8KQmNjOiB2aWN0aW1AZXhhbXBsZS5vcmc=?=",
    "=?utf-8?q?=0D=0A?=Bcc: victim@example.org",
    "Hello\u2028Bcc: victim@example.org",
    "Hello\x85Bcc: victim@example.org",
    "Hello\x00",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_a_header_break_in_subject_user_or_address_is_refused_with_422(client, value: str) -> None:
    for body in (event(subject=value), {**EXAMPLE_EVENT, "user_id": value},
                 event(to_email=f"test@example.com{value}"),
                 event(to_email=f"{value}@example.com")):
        answer = client.post("/api/v1/events", json=body, headers=auth())
        assert answer.status_code == 422, body
        assert answer.json["errors"]
    assert client.get("/stats").json["events"]["accepted"] == 0


def test_at_the_smtp_server_no_extra_header_or_recipient_ever_appears(
    client, worker: Any, smtp_server: ScriptedSMTPServer
) -> None:
    # Given accepted events whose fields look like headers but hold no line break
    subjects = ["Bcc: victim@example.org", "=?UTF-8?Q?Bcc:_victim@example.org?=",
                "To: a@example.org, b@example.org", "Subject\tTab " + "x: y " * 35,
                "Ünïcödé — «subject»", "x" * 200]
    ids = []
    for subject in subjects:
        answer = client.post("/api/v1/events", json=event(subject=subject), headers=auth())
        assert answer.status_code == 202
        ids.append(answer.json["id"])
    # And refused ones
    for value in INJECTIONS:
        assert client.post("/api/v1/events", json=event(subject=value),
                           headers=auth()).status_code == 422
    # When the worker delivers them
    wait_for(lambda: len(smtp_server.received) >= len(ids), timeout=20, message="every email")
    time.sleep(0.2)
    # Then the server saw exactly one message per accepted event, to the one recipient,
    # with exactly our headers, each once
    assert sorted(m.event_id for m in smtp_server.received) == sorted(ids)
    # (the shipped templates send multipart/alternative: each part has its own two)
    expected = {"from", "to", "subject", "date", "message-id", "x-eventflow-event-id",
                "content-type", "mime-version"}
    for received in smtp_server.received:
        assert received.rcpt_tos == ["test@example.com"]
        names = [name.lower() for name in received.message]
        assert sorted(names) == sorted(expected)
        for part in received.message.iter_parts():
            assert sorted(name.lower() for name in part) == [
                "content-transfer-encoding", "content-type"]
        assert b"\nBcc:" not in received.raw and b"\nbcc:" not in received.raw.lower()
    assert all(a.rcpt_tos == ["test@example.com"] for a in smtp_server.attempts)


# -- Flower --------------------------------------------------------------------------------


def flower_port() -> int:
    for port in FLOWER_PORTS:
        if port != free_port() and _port_is_free(port):
            return port
    raise AssertionError("no free port in 16620-16639 for Flower")


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_status(url: str, credentials: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        import base64

        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_flower_refuses_to_start_without_authentication_and_asks_for_a_password_with_it(
    environment: dict[str, str], tmp_path: Path
) -> None:
    command = procfile_command("flower")
    port = flower_port()
    env = {**environment, "PORT": str(port)}
    # Given no FLOWER_BASIC_AUTH: Flower exits with a clear message, listening on nothing
    refused = Process(command, {**env, "FLOWER_BASIC_AUTH": ""}, tmp_path / "flower-refused.log")
    try:
        assert refused.popen.wait(timeout=30) != 0
        assert "refuses to start without authentication" in refused.output()
        assert "FLOWER_BASIC_AUTH=user:password" in refused.output()
    finally:
        refused.stop()
    # Given FLOWER_BASIC_AUTH: 401 without credentials, 401 with wrong ones, 200 with them
    flower = Process(command, {**env, "FLOWER_BASIC_AUTH": "ops:flower-pass-123"},
                     tmp_path / "flower.log")
    try:
        url = f"http://127.0.0.1:{port}/workers"

        def answering() -> int | None:
            try:
                return http_status(url)
            except OSError:
                assert flower.popen.poll() is None, flower.output()[-2000:]
                return None

        assert wait_for(answering, timeout=30, interval=0.2, message="Flower to listen") == 401
        assert http_status(url, ("ops", "wrong")) == 401
        assert http_status(url, ("ops", "flower-pass-123")) == 200
        assert "flower-pass-123" not in flower.output()
    finally:
        flower.stop()
