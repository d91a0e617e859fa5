"""Bounces that arrive after the SMTP server took the message: the VERP envelope sender,
and a delivery status notification posted to ``/api/v1/bounces`` (real worker, real SMTP
server, real Redis)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.test_suppressions import event_to, final_event, post_event

BOUNCE_ADDRESS = "bounces@eventflow.test"


@pytest.fixture
def environment(environment: dict[str, str]) -> dict[str, str]:
    """The test environment, with a bounce address."""
    return {**environment, "EVENTFLOW_BOUNCE_ADDRESS": BOUNCE_ADDRESS}


def dsn(event_id: str, recipient: str, status: str, diagnostic: str,
        action: str = "failed") -> bytes:
    """A delivery status notification as Postfix writes one (RFC 3464), returned to the
    VERP address of ``event_id``."""
    return (
        f"Return-Path: <>\r\n"
        f"Delivered-To: bounces+{event_id}@eventflow.test\r\n"
        f"From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        f"To: bounces+{event_id}@eventflow.test\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        f"\r\n"
        f"--B1\r\nContent-Type: text/plain\r\n\r\n"
        f"I'm sorry to have to inform you that your message could not be delivered.\r\n"
        f"\r\n--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.com\r\n"
        f"Arrival-Date: Wed, 2 Dec 2026 18:00:00 +0000\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Remote-MTA: dns; mailbox.example.com\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{event_id}@eventflow.test>\r\n"
        f"X-EventFlow-Event-Id: {event_id}\r\n"
        f"Subject: You have a new notification\r\n"
        f"\r\n--B1--\r\n"
    ).encode()


def post_bounce(client: FlaskClient, body: bytes, content_type: str = "message/rfc822",
                key: str = ADMIN_KEY) -> Any:
    return client.post("/api/v1/bounces", data=body, content_type=content_type,
                       headers=auth(key))


def test_each_message_goes_out_from_the_bounce_address_tagged_with_its_event(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    event_id = post_event(client, event_to("someone@example.com"))
    assert final_event(client, event_id)["status"] == "delivered"
    (message,) = smtp_server.messages_for(event_id)
    assert message.mail_from == f"bounces+{event_id}@eventflow.test"
    assert message.message["From"] == "EventFlow <noreply@eventflow.test>"


def test_a_bounce_posted_later_marks_its_event_bounced_and_suppresses_the_address(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given an event the server took
    event_id = post_event(client, event_to("Left@Example.com"))
    assert final_event(client, event_id)["status"] == "delivered"
    # When the mailbox's server bounces it afterwards and the DSN is posted
    response = post_bounce(client, dsn(event_id, "Left@example.com", "5.1.1",
                                       "550 5.1.1 <Left@example.com>: Recipient address "
                                       "rejected: User unknown"))
    # Then it is accepted, the event is bounced with the recipient's status and diagnostic
    assert response.status_code == 202, response.json
    assert response.json["event_id"] == event_id
    assert response.json["status"] == "bounced"
    event = client.get(f"/api/v1/events/{event_id}", headers=auth()).json
    assert event["status"] == "bounced"
    step = event["history"][-1]
    assert step["step"] == "bounced"
    assert step["status"] == "5.1.1"
    assert step["recipient"] == "Left@example.com"
    assert "User unknown" in step["diagnostic"]
    assert "5.1.1" in event["last_error"]
    # And the address is suppressed: the next event to it is not sent
    entry = client.get("/api/v1/suppressions/left@example.com", headers=auth(ADMIN_KEY)).json
    assert entry["reason"] == "hard_bounce"
    assert entry["event_id"] == event_id
    second = post_event(client, event_to("left@example.com"))
    assert final_event(client, second)["status"] == "suppressed"
    assert smtp_server.messages_for(second) == []
    assert client.get("/stats").json["events"]["bounced"] == 1
    # And the same DSN posted again changes nothing more
    again = post_bounce(client, dsn(event_id, "Left@example.com", "5.1.1", "550 5.1.1 x"))
    assert again.status_code == 202
    assert client.get("/stats").json["events"]["bounced"] == 1


def test_a_transient_bounce_marks_the_event_but_does_not_suppress(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    event_id = post_event(client, event_to("full@example.com"))
    assert final_event(client, event_id)["status"] == "delivered"
    body = dsn(event_id, "full@example.com", "4.2.2", "452 4.2.2 Mailbox full",
               action="delayed")
    response = post_bounce(client, body, content_type="message/rfc822")
    assert response.status_code == 202
    assert response.json["suppressed"] is None
    assert client.get("/api/v1/suppressions/full@example.com",
                      headers=auth(ADMIN_KEY)).status_code == 404


def test_a_report_posted_as_multipart_report_is_read_too(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    event_id = post_event(client, event_to("moved@example.com"))
    assert final_event(client, event_id)["status"] == "delivered"
    whole = dsn(event_id, "moved@example.com", "5.1.6", "550 5.1.6 Mailbox has moved")
    _head, _, body = whole.partition(b"\r\n\r\n")
    response = post_bounce(client, body,
                           content_type='multipart/report; report-type=delivery-status; '
                                        'boundary="B1"')
    assert response.status_code == 202, response.json
    # (no VERP header in the body: the event is found by the returned headers)
    assert response.json["event_id"] == event_id
    assert response.json["status"] == "bounced"


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"Subject: hello\r\n\r\njust a message\r\n", "message/rfc822", 422),
    (b'{"a": 1}', "application/json", 415),
])
def test_what_is_not_a_bounce_is_refused_and_changes_nothing(
    client: FlaskClient, body: bytes, content_type: str, status: int
) -> None:
    response = post_bounce(client, body, content_type)
    assert response.status_code == status
    assert response.content_type == "application/problem+json"
    assert client.get("/stats").json["events"]["bounced"] == 0


def test_producer_keys_may_not_post_bounces(client: FlaskClient) -> None:
    from tests.conftest import PRODUCER_KEY

    response = post_bounce(client, dsn("x", "a@example.com", "5.1.1", "x"), key=PRODUCER_KEY)
    assert response.status_code == 403


def test_a_bounce_in_another_format_than_rfc_3464_is_read_by_flufl_bounce(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a delivered event, and qmail's bounce for it (no delivery-status part)
    event_id = post_event(client, event_to("nobody@example.com"))
    assert final_event(client, event_id)["status"] == "delivered"
    body = (
        f"From: MAILER-DAEMON@mx.example.com\r\n"
        f"To: bounces+{event_id}@eventflow.test\r\n"
        f"Subject: failure notice\r\n\r\n"
        f"Hi. This is the qmail-send program at mx.example.com.\r\n"
        f"I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
        f"This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
        f"<nobody@example.com>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n"
        f"--- Below this line is a copy of the message.\r\n"
    ).encode()
    response = post_bounce(client, body)
    # Then the event is bounced and the address suppressed
    assert response.status_code == 202, response.json
    assert response.json["status"] == "bounced"
    assert response.json["suppressed"] == "nobody@example.com"
