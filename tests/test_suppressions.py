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
