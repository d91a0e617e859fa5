"""The core pipeline, end to end: HTTP in, SMTP out, on real Redis, Celery and SMTP."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from tests.conftest import EXAMPLE_EVENT, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for


def post_event(client: FlaskClient, event: dict[str, Any] = EXAMPLE_EVENT, **kwargs: Any) -> str:
    response = client.post("/api/v1/events", json=event, headers=auth(), **kwargs)
    assert response.status_code == 202, response.json
    return str(response.json["id"])


def final_event(client: FlaskClient, event_id: str, timeout: float = 20) -> dict[str, Any]:
    """Poll the event until it reaches a final status."""

    def finished() -> dict[str, Any] | None:
        body = client.get(f"/api/v1/events/{event_id}", headers=auth()).json
        done = body["status"] in ("delivered", "rate_limited", "dead_lettered")
        return body if done else None

    return wait_for(finished, timeout, message=f"event {event_id} to finish")  # type: ignore[no-any-return]


def test_the_example_event_is_delivered_once_to_its_recipient_only(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a running worker, when the README's example event is posted
    event_id = post_event(client)
    # Then it ends delivered
    event = final_event(client, event_id)
    assert event["status"] == "delivered"
    assert event["attempts"] == 1
    assert event["delivered_at"]
    # And exactly one message reached the server, to that address only, with the body
    (message,) = smtp_server.messages_for(event_id)
    assert message.rcpt_tos == ["test@example.com"]
    assert message.message["To"] == "test@example.com"
    assert message.message["From"] == "EventFlow <noreply@eventflow.test>"
    assert message.message["Message-ID"] == f"<{event_id}@eventflow.test>"
    assert message.message.get_content().strip() == "Hello"
    assert message.message["Subject"] == "You have a new notification"
    steps = [entry["step"] for entry in event["history"]]
    assert steps == ["accepted", "attempt", "delivered"]
