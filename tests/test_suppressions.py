"""The suppression list and bounces, end to end: a real worker, a real SMTP server that
refuses a mailbox, a real Redis; then the admin API, the CLI and a DSN posted back."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

FINAL = ("delivered", "rate_limited", "dead_lettered", "suppressed", "bounced")


def event_to(address: str, user_id: str = "user-sup") -> dict[str, Any]:
    return {"user_id": user_id, "event_type": "USER_NOTIFICATION",
            "payload": {"to_email": address, "message": "Hello"}}


def post_event(client: FlaskClient, event: dict[str, Any]) -> str:
    response = client.post("/api/v1/events", json=event, headers=auth())
    assert response.status_code == 202, response.json
    return str(response.json["id"])


def final_event(client: FlaskClient, event_id: str, timeout: float = 20) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body = client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY)).json
        return body if body["status"] in FINAL else None

    return wait_for(finished, timeout, message=f"event {event_id} to finish")  # type: ignore[no-any-return]


def quota_used(redis_client: redis.Redis, user_id: str) -> int:
    return int(redis_client.zcard(f"ef:quota:{user_id}"))


def test_a_mailbox_refused_for_good_is_suppressed_and_not_mailed_again(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any,
    redis_client: redis.Redis,
) -> None:
    # Given a server that refuses the recipient: 550 5.1.1 user unknown
    smtp_server.reply_next("550 5.1.1 User unknown", stage="RCPT")
    first = post_event(client, event_to("Gone@Example.com"))
    # Then the event is dead-lettered at once, and the address is on the list
    assert final_event(client, first)["status"] == "dead_lettered"
    entry = client.get("/api/v1/suppressions/gone@example.com", headers=auth(ADMIN_KEY))
    assert entry.status_code == 200, entry.json
    assert entry.json["reason"] == "hard_bounce"
    assert entry.json["event_id"] == first
    assert entry.json["smtp_reply"] == "550 5.1.1 User unknown"
    assert entry.json["expires_at"]
    # (a dead letter gives its quota unit back: nothing was sent)
    used = quota_used(redis_client, "user-sup")
    rcpts = smtp_server.rcpt_seen.count("Gone@example.com")

    # When a second event goes to the same address (in another case)
    second = post_event(client, event_to("gone@EXAMPLE.com"))
    event = final_event(client, second)
    # Then it ends suppressed: no SMTP attempt, no quota unit, a step naming the entry
    assert event["status"] == "suppressed"
    assert event["attempts"] == 0
    assert smtp_server.rcpt_seen.count("gone@example.com") == 0
    assert smtp_server.rcpt_seen.count("Gone@example.com") == rcpts
    assert quota_used(redis_client, "user-sup") == used
    assert redis_client.hget(f"ef:ev:{second}", "quota") in (None, "0")
    step = event["history"][-1]
    assert step["step"] == "suppressed"
    assert step["suppression"]["address"] == "gone@example.com"
    assert step["suppression"]["reason"] == "hard_bounce"
    assert step["suppression"]["event_id"] == first
    # And /stats and /metrics count it
    assert client.get("/stats").json["events"]["suppressed"] == 1
    assert "eventflow_suppressed_total 1.0" in client.get("/metrics").text


def test_a_policy_refusal_does_not_suppress_the_address(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a server that refuses the message on policy grounds: 550 5.7.1
    smtp_server.reply_next("550 5.7.1 Message rejected as spam", stage="RCPT")
    first = post_event(client, event_to("policy@example.com"))
    assert final_event(client, first)["status"] == "dead_lettered"
    # Then the address is not on the list, and the next event to it is delivered
    assert client.get("/api/v1/suppressions/policy@example.com",
                      headers=auth(ADMIN_KEY)).status_code == 404
    second = post_event(client, event_to("policy@example.com"))
    assert final_event(client, second)["status"] == "delivered"
    assert len(smtp_server.messages_for(second)) == 1


def admin_get(client: FlaskClient, url: str) -> Any:
    return client.get(url, headers=auth(ADMIN_KEY))


def test_an_operator_adds_lists_pages_and_deletes_suppressions(client: FlaskClient) -> None:
    # Given five addresses added by hand, one as a complaint
    for i in range(4):
        added = client.post("/api/v1/suppressions", headers=auth(ADMIN_KEY),
                            json={"address": f"User{i}@Example.com", "reason": "manual"})
        assert added.status_code == 201, added.json
        assert added.json["address"] == f"user{i}@example.com"
        assert added.json["expires_at"] is None
    complaint = client.post("/api/v1/suppressions", headers=auth(ADMIN_KEY),
                            json={"address": "angry@example.com", "reason": "complaint"})
    assert complaint.status_code == 201
    # When they are listed two at a time
    seen, cursor = [], None
    for _ in range(10):
        url = "/api/v1/suppressions?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = admin_get(client, url).json
        seen += [item["address"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    # Then each comes once, in address order
    assert seen == sorted(["angry@example.com"] + [f"user{i}@example.com" for i in range(4)])
    # And the reason filter keeps only the complaint
    only = admin_get(client, "/api/v1/suppressions?reason=complaint").json
    assert [item["address"] for item in only["items"]] == ["angry@example.com"]
    # And a deleted address is gone
    assert client.delete("/api/v1/suppressions/USER0@example.com",
                         headers=auth(ADMIN_KEY)).status_code == 204
    assert admin_get(client, "/api/v1/suppressions/user0@example.com").status_code == 404
    assert client.delete("/api/v1/suppressions/user0@example.com",
                         headers=auth(ADMIN_KEY)).status_code == 404


@pytest.mark.parametrize("body", [
    {"address": "not an address"}, {"address": "a@example.com", "reason": "because"},
    {"reason": "manual"}, {"address": "a@example.com", "extra": 1},
])
def test_a_bad_suppression_is_refused_and_creates_nothing(
    client: FlaskClient, body: dict[str, Any]
) -> None:
    response = client.post("/api/v1/suppressions", headers=auth(ADMIN_KEY), json=body)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    assert response.json["errors"]
    assert admin_get(client, "/api/v1/suppressions").json["items"] == []


def test_producer_keys_get_403_on_suppressions(client: FlaskClient) -> None:
    assert client.get("/api/v1/suppressions", headers=auth()).status_code == 403
    assert client.post("/api/v1/suppressions", headers=auth(),
                       json={"address": "a@example.com"}).status_code == 403


def test_a_bad_cursor_is_a_422(client: FlaskClient) -> None:
    response = admin_get(client, "/api/v1/suppressions?cursor=%25%25")
    assert response.status_code == 422
    assert "cursor" in response.json["errors"]


def test_a_hard_bounce_expires_and_a_manual_entry_does_not(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # Given a TTL of one minute (the shortest), a hard bounce and a manual entry
    app = make_app(EVENTFLOW_SUPPRESSION_TTL="1m")
    service = app.extensions["eventflow"].suppressions
    bounce = service.add("bounced@example.com", "hard_bounce", event_id="e1",
                         smtp_reply="550 5.1.1 User unknown")
    service.add("kept@example.com", "manual")
    # Then the bounce's entry expires with Redis's TTL, the manual one has none
    assert 55 <= redis_client.ttl("ef:sup:bounced@example.com") <= 60
    assert redis_client.ttl("ef:sup:kept@example.com") == -1
    assert bounce["expires_at"] > bounce["created_at"]
    # And a later bounce does not turn the manual entry into one that expires
    service.add("kept@example.com", "hard_bounce", keep_permanent=True)
    assert service.get("kept@example.com")["reason"] == "manual"
    # And an expired entry leaves the listing (and the index) once met
    redis_client.delete("ef:sup:bounced@example.com")  # what its expiry does
    assert [e["address"] for e in service.page(10).items] == ["kept@example.com"]
    assert redis_client.zrange("ef:sups", 0, -1) == ["kept@example.com"]


def test_the_cli_lists_shows_adds_and_deletes(app: Flask) -> None:
    runner = app.test_cli_runner()
    added = runner.invoke(args=["suppressions", "add", "Ops@Example.com", "--reason",
                                "complaint"])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(args=["suppressions", "list"])
    assert "ops@example.com" in listed.output and "complaint" in listed.output
    shown = runner.invoke(args=["suppressions", "show", "ops@example.com"])
    assert '"reason": "complaint"' in shown.output
    bad = runner.invoke(args=["suppressions", "add", "nope"])
    assert bad.exit_code == 2
    deleted = runner.invoke(args=["suppressions", "delete", "OPS@example.com"])
    assert deleted.exit_code == 0
    assert runner.invoke(args=["suppressions", "show", "ops@example.com"]).exit_code == 1


def test_a_manually_suppressed_address_takes_no_quota_and_no_smtp_attempt(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any,
    redis_client: redis.Redis,
) -> None:
    # Given an address suppressed by hand
    client.post("/api/v1/suppressions", headers=auth(ADMIN_KEY),
                json={"address": "hand@example.com"})
    # When three events go to it
    ids = [post_event(client, event_to("hand@example.com", user_id="u-hand")) for _ in range(3)]
    # Then each ends suppressed, none reached the server, no quota unit was taken
    for event_id in ids:
        assert final_event(client, event_id)["status"] == "suppressed"
    assert "hand@example.com" not in smtp_server.rcpt_seen
    assert quota_used(redis_client, "u-hand") == 0
    # And once deleted from the list, the next event is delivered
    client.delete("/api/v1/suppressions/hand@example.com", headers=auth(ADMIN_KEY))
    after = post_event(client, event_to("hand@example.com", user_id="u-hand"))
    assert final_event(client, after)["status"] == "delivered"
    assert quota_used(redis_client, "u-hand") == 1
