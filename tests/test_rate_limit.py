"""The per-user quota holds exactly, however many worker processes race for it."""

from __future__ import annotations

from pathlib import Path

from flask.testing import FlaskClient

from tests.conftest import EXAMPLE_EVENT, auth
from tests.processes import worker_processes
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

FINAL = ("delivered", "rate_limited", "dead_lettered")


def event_for(user_id: str, n: int) -> dict[str, object]:
    payload = {"to_email": f"{user_id}-{n}@example.com", "message": f"Message {n}"}
    return {**EXAMPLE_EVENT, "user_id": user_id, "payload": payload}


def test_two_worker_processes_send_exactly_the_quota_and_no_more(
    make_app, environment: dict[str, str], smtp_server: ScriptedSMTPServer, tmp_path: Path
) -> None:
    # Given a limit of 3 emails a day, and the server slow enough for the workers to race
    env = {**environment, "EVENTFLOW_RATE_LIMIT": "3/day"}
    client: FlaskClient = make_app(EVENTFLOW_RATE_LIMIT="3/day").test_client()
    smtp_server.stall(0.05)
    # When 5 events for one user and 2 for another are queued before the workers start
    ids = [client.post("/api/v1/events", json=event_for("racer", n), headers=auth()).json["id"]
           for n in range(5)]
    other = [client.post("/api/v1/events", json=event_for("bystander", n), headers=auth())
             .json["id"] for n in range(2)]
    with worker_processes(env, tmp_path, count=2, concurrency=2):

        def statuses() -> list[str] | None:
            found = [client.get(f"/api/v1/events/{i}", headers=auth()).json["status"]
                     for i in ids + other]
            return found if all(s in FINAL for s in found) else None

        final = wait_for(statuses, timeout=40, message="every event to finish")
    # Then exactly 3 of the racer's were delivered and 2 rate limited
    racer = final[:5]
    assert sorted(racer) == ["delivered"] * 3 + ["rate_limited"] * 2
    assert sum(len(smtp_server.messages_for(i)) for i in ids) == 3
    # And the other user was unaffected
    assert final[5:] == ["delivered", "delivered"]
    limited = next(i for i, s in zip(ids, racer) if s == "rate_limited")
    history = client.get(f"/api/v1/events/{limited}", headers=auth()).json["history"]
    assert history[-1]["step"] == "rate_limit"
    assert history[-1]["decision"] == "refused"
    assert client.get("/stats").json["events"]["rate_limited"] == 2
