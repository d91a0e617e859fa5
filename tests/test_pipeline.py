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
    assert message.message.get_body(("plain",)).get_content().strip() == "Hello"
    assert message.message["Subject"] == "You have a new notification"
    steps = [entry["step"] for entry in event["history"]]
    assert steps == ["accepted", "attempt", "delivered"]


def test_a_busy_server_gets_the_same_message_again_until_it_accepts_it(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a server that answers 451 twice, then accepts
    smtp_server.reply_next("451 4.3.0 Try again later", "451 4.3.0 Try again later")
    # When an event is posted
    event_id = post_event(client)
    # Then it is delivered on the third attempt, once
    event = final_event(client, event_id)
    assert event["status"] == "delivered"
    assert event["attempts"] == 3
    assert len(smtp_server.messages_for(event_id)) == 1
    # And every attempt carried the same Message-ID
    ids = [a.message_id for a in smtp_server.attempts]
    assert ids == [f"<{event_id}@eventflow.test>"] * 3
    outcomes = [e["outcome"] for e in event["history"] if e["step"] == "attempt"]
    assert outcomes == ["transient", "transient", "delivered"]
    assert event["history"][1]["smtp_code"] == 451


def test_an_event_that_keeps_failing_transiently_is_dead_lettered_after_all_retries(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a server that always answers 451 (and EVENTFLOW_MAX_RETRIES=5)
    smtp_server.reply_always("451 4.3.0 Try again later")
    event_id = post_event(client)
    # Then the event is dead-lettered after 1 + 5 attempts, and nothing was accepted
    event = final_event(client, event_id)
    assert event["status"] == "dead_lettered"
    assert event["attempts"] == 6
    assert len(smtp_server.attempts) == 6
    assert smtp_server.messages_for(event_id) == []
    assert event["last_error"] == "451 4.3.0 Try again later"
    assert client.get("/stats").json["dead_letters"] == 1


def test_a_refused_recipient_is_dead_lettered_at_once_with_the_reply(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any, redis_client: Any
) -> None:
    # Given a server that refuses the recipient with 550
    smtp_server.reply_always("550 5.1.1 No such user", stage="RCPT")
    event_id = post_event(client)
    # Then the event is dead-lettered after one attempt, with the reply
    event = final_event(client, event_id)
    assert event["status"] == "dead_lettered"
    assert event["attempts"] == 1
    assert len(smtp_server.attempts) == 1
    assert event["last_error"] == "550 5.1.1 No such user"
    steps = [entry["step"] for entry in event["history"]]
    assert steps == ["accepted", "attempt", "dead_lettered"]
    # And the dead letter keeps the original event and the reason
    import json

    letter = json.loads(redis_client.get(f"ef:dl:{event_id}"))
    assert letter["error_type"] == "permanent"
    assert letter["event"]["payload"]["to_email"] == "test@example.com"
    assert letter["attempts"] == 1


def test_a_connection_refused_is_retried_until_the_server_is_back(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given the SMTP server is down
    smtp_server.stop()
    event_id = post_event(client)
    wait_for(lambda: client.get(f"/api/v1/events/{event_id}", headers=auth()).json["status"]
             == "retrying", message="a first failed attempt")
    # When it comes back on the same port
    smtp_server.start()
    # Then the event is delivered once
    event = final_event(client, event_id)
    assert event["status"] == "delivered"
    assert len(smtp_server.messages_for(event_id)) == 1
    first = next(e for e in event["history"] if e["step"] == "attempt")
    assert first["outcome"] == "transient"
    assert first["network_error"] == "refused"
