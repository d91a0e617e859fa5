"""What an operator reads in a worker's log: one line per expected outcome, a traceback
only for a fault."""

from __future__ import annotations

import re
from pathlib import Path

import redis
from flask import Flask

from eventflow.enqueue import build_task_message
from tests.conftest import auth
from tests.faults import event_to, final_record
from tests.processes import worker_processes
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for


def lines_about(log: str, event_id: str) -> list[str]:
    return [line for line in log.splitlines() if event_id in line]


def test_expected_outcomes_are_one_warning_line_each_and_a_fault_keeps_its_traceback(
    environment: dict[str, str], make_app: object, smtp_server: ScriptedSMTPServer,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a worker as the Procfile runs it (log level WARNING), one retry, one email
    # a day per user
    overrides = {"WORKER_LOG_LEVEL": "WARNING", "EVENTFLOW_MAX_RETRIES": "1",
                 "EVENTFLOW_RATE_LIMIT": "1/day"}
    app: Flask = make_app(**overrides)  # type: ignore[operator]
    client = app.test_client()

    def post(event: dict[str, object]) -> str:
        return str(client.post("/api/v1/events", json=event, headers=auth()).json["id"])

    with worker_processes({**environment, **overrides}, tmp_path) as (worker,):
        # When the server refuses one address for good
        smtp_server.reply_next("550 5.1.1 No such user", stage="RCPT")
        refused = post(event_to("gone@example.com"))
        assert final_record(redis_client, refused)["status"] == "dead_lettered"
        # and answers 421 to both attempts of another
        smtp_server.reply_next("421 4.3.2 Busy", "421 4.3.2 Busy", stage="RCPT")
        exhausted = post(event_to("busy@example.com"))
        assert final_record(redis_client, exhausted)["status"] == "dead_lettered"
        # and a user sends a second email the same day
        first = post(event_to("twice@example.com"))
        assert final_record(redis_client, first)["status"] == "delivered"
        limited = post(event_to("twice@example.com"))
        assert final_record(redis_client, limited)["status"] == "rate_limited"
        # and a task message that the task cannot run (no event id: a fault)
        broken = build_task_message(app.extensions["celery"], "broken-task", ())
        redis_client.lpush(broken.queue, broken.payload)
        wait_for(lambda: "broken-task" in worker.output(), 15, message="the broken task")
        log = worker.output()

    # Then each expected outcome is one WARNING line with the event id and the reason
    expected = {refused: "550 5.1.1 No such user", exhausted: "421 4.3.2 Busy",
                limited: "rate limit 1/day"}
    for event_id, reason in expected.items():
        about = lines_about(log, event_id)
        assert len(about) == 1, about
        assert "WARNING" in about[0] and reason in about[0], about
    # And only the fault has a traceback, with its ERROR line
    assert log.count("Traceback (most recent call last)") == 1, log[-3000:]
    assert re.search(r"ERROR.*broken-task.*raised unexpected: TypeError", log), log[-3000:]
