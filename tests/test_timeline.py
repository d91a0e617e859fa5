"""The event timeline (``GET /api/v1/events/<id>`` ``history``) tells every step, with its time.

Real Redis, a real worker and a scripted SMTP server; the app allows many retries (so a
server that is down for a moment does not end the story early) and one email per user
per day (so the rate-limit decision shows).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.test_deadletters import event_view, post_event, wait_for_status
from tests.waiting import wait_for

ADMIN = auth(ADMIN_KEY)


@pytest.fixture
def app(make_app: Any) -> Flask:
    """The app with room for many retries and a limit of one email per user per day."""
    return make_app(EVENTFLOW_MAX_RETRIES="10", EVENTFLOW_RATE_LIMIT="1/day")


def assert_timed_in_order(history: list[dict[str, Any]]) -> None:
    """Every step has an ISO 8601 UTC time, and time does not go backwards."""
    times = [datetime.fromisoformat(entry["at"]) for entry in history]
    assert all(entry["at"].endswith("Z") for entry in history)
    assert times == sorted(times)


def test_the_timeline_of_a_replayed_event_shows_every_attempt_failure_and_replay(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a server that is down when the event arrives
    smtp_server.stop()
    event_id = post_event(client)
    wait_for(lambda: any(entry["step"] == "attempt" for entry in
                         event_view(client, event_id)["history"]),
             message="a first attempt to be refused")
    # And that, once back, answers 451 once and then refuses the message with 550
    smtp_server.reply_next("451 4.3.0 Try again later")
    smtp_server.reply_always("550 5.7.1 Message refused")
    smtp_server.start()
    wait_for_status(client, event_id, "dead_lettered")
    # When the server is told to accept and an admin replays the dead letter
    smtp_server.reply_always(None)
    assert client.post(f"/api/v1/dead-letters/{event_id}/replay", headers=ADMIN).status_code == 202
    event = wait_for_status(client, event_id, "delivered")

    history = event["history"]
    assert_timed_in_order(history)
    # Then the timeline starts with the acceptance, by the producer's key
    assert history[0]["step"] == "accepted"
    assert history[0]["producer"].startswith("key-")
    attempts = [entry for entry in history if entry["step"] == "attempt"]
    # And numbers every attempt, counting on across the replay
    assert [entry["attempt"] for entry in attempts] == list(range(1, len(attempts) + 1))
    assert event["attempts"] == len(attempts)
    *refused, busy, rejected, delivered = attempts
    # And shows each network error and SMTP reply with its classification
    assert refused and all(entry["network_error"] == "refused" and entry["outcome"] == "transient"
                           and "retry_in_s" in entry for entry in refused)
    assert (busy["smtp_code"], busy["outcome"]) == (451, "transient")
    assert busy["smtp_reply"] == "451 4.3.0 Try again later"
    assert (rejected["smtp_code"], rejected["outcome"]) == (550, "permanent")
    assert "retry_in_s" not in rejected
    assert delivered["outcome"] == "delivered"
    assert delivered["smtp_reply"].startswith("250")
    # And the dead letter, the replay (who and which task) and the delivery, in order
    steps = [entry["step"] for entry in history]
    tail = steps[steps.index("dead_lettered"):]
    assert tail == ["dead_lettered", "replayed", "attempt", "delivered"]
    dead, replayed = history[steps.index("dead_lettered")], history[steps.index("replayed")]
    assert (dead["error_type"], dead["error"]) == ("permanent", "550 5.7.1 Message refused")
    assert replayed["by"].startswith("key-") and replayed["task_id"]
    delivered_at = datetime.fromisoformat(event["delivered_at"])
    assert abs((datetime.fromisoformat(history[-1]["at"]) - delivered_at).total_seconds()) < 0.05
    assert len(smtp_server.messages_for(event_id)) == 1


def test_a_replay_counts_against_todays_rate_limit_and_the_timeline_shows_the_decision(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given an event of user-5 dead-lettered by a 550 (its quota unit is given back)
    event = {**EXAMPLE_EVENT, "user_id": "user-5"}
    # (a policy refusal: a mailbox one, 5.1.1, would suppress the address)
    smtp_server.reply_next("550 5.7.1 Relaying denied", stage="RCPT")
    first = post_event(client, event)
    wait_for_status(client, first, "dead_lettered")
    # And a second event of user-5 delivered, which uses the one email of the day
    second = post_event(client, event)
    wait_for_status(client, second, "delivered")
    # When the first is replayed
    assert client.post(f"/api/v1/dead-letters/{first}/replay", headers=ADMIN).status_code == 202
    # Then it is not sent: the user's limit is reached today
    replayed = wait_for_status(client, first, "rate_limited")
    assert smtp_server.messages_for(first) == []
    # And its timeline ends with the replay and the rate-limit decision
    history = replayed["history"]
    assert_timed_in_order(history)
    assert [entry["step"] for entry in history] == [
        "accepted", "attempt", "dead_lettered", "replayed", "rate_limit"]
    assert (history[-1]["decision"], history[-1]["limit"]) == ("refused", "1/day")
