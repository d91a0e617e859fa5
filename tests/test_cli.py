"""``flask dlq``: operators list, show, replay, delete and purge dead letters from a shell."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from tests.conftest import ADMIN_KEY, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.test_deadletters import (
    RETIRED_EVENT,
    FixedClock,
    event_view,
    listed_ids,
    make_dead_letters,
    wait_for_status,
)

ADMIN = auth(ADMIN_KEY)


def dlq(runner: FlaskCliRunner, *args: str, exit_code: int = 0) -> str:
    result = runner.invoke(args=["dlq", *args])
    assert result.exit_code == exit_code, result.output
    return result.output


def test_the_cli_lists_dead_letters_newest_first_in_aligned_columns(app: Flask) -> None:
    # Given an older refused event and a newer one whose retries ran out
    (older,) = make_dead_letters(app, 1, clock=FixedClock(time.time() - 60))
    (newer,) = make_dead_letters(app, 1, error_type="retries_exhausted",
                                 error="451 4.3.0 Try again later")
    # When an operator lists them
    lines = dlq(app.test_cli_runner(), "list").splitlines()
    # Then a header and one line each, newest first, in aligned columns
    header, first, second = lines
    assert header.split() == ["ID", "FAILED", "AT", "ERROR", "TYPE", "ATTEMPTS", "EVENT", "TYPE",
                              "USER", "ERROR"]
    assert first.startswith(newer) and second.startswith(older)
    assert "retries_exhausted" in first and "451 4.3.0 Try again later" in first
    for column in ("FAILED AT", "ERROR TYPE", "USER"):
        start = header.index(column)
        assert first[start - 2:start] == "  " and first[start] != " "
        assert second[start - 2:start] == "  " and second[start] != " "
    # And filters narrow the list as they do over HTTP
    filtered = dlq(app.test_cli_runner(), "list", "--error-type", "permanent")
    assert older in filtered and newer not in filtered
    bad = app.test_cli_runner().invoke(args=["dlq", "list", "--since", "last week"])
    assert bad.exit_code == 2 and "since" in bad.output


def test_the_cli_shows_a_dead_letter_with_its_event_history_and_audit(app: Flask) -> None:
    (event_id,) = make_dead_letters(app, 1)
    output = dlq(app.test_cli_runner(), "show", event_id)
    lines = output.splitlines()
    assert lines[0].split() == ["id:", event_id]
    assert "error:      550 5.1.1 No such user" in lines
    assert '"to_email": "test@example.com"' in output
    assert "History:" in output and "accepted" in output
    assert "Audit:" in output and "dead_lettered" in output
    missing = app.test_cli_runner().invoke(args=["dlq", "show", "nope"])
    assert missing.exit_code == 1 and "no dead letter nope" in missing.output


def test_the_cli_replays_one_dead_letter_then_all_matching_ones_which_are_delivered(
    app: Flask, client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given three refused events and one of a retired event type
    one, *others = make_dead_letters(app, 3)
    (retired,) = make_dead_letters(app, 1, event=RETIRED_EVENT)
    runner = app.test_cli_runner()
    # When an operator replays one by its id
    assert f"{one} queued again" in dlq(runner, "replay", one)
    # Then it is delivered, and the audit names the operator
    assert wait_for_status(client, one, "delivered")["history"][-3]["by"].startswith("cli")
    # When a dry run of the rest is asked, nothing changes
    dry = dlq(runner, "replay", "--all", "--dry-run", exit_code=1)
    assert "Would replay 2 dead letter(s)." in dry
    assert all(event_id in dry for event_id in others)
    assert retired in dry and "fail today's event schema" in dry
    assert sorted(listed_ids(client)) == sorted([*others, retired])
    # When all matching are replayed
    output = dlq(runner, "replay", "--all", "--event-type", "USER_NOTIFICATION")
    # Then they are delivered once each and leave the list, the retired one untouched
    assert "Replayed 2 dead letter(s)." in output
    for event_id in others:
        wait_for_status(client, event_id, "delivered")
        assert len(smtp_server.messages_for(event_id)) == 1
    assert listed_ids(client) == [retired]
    assert event_view(client, retired)["status"] == "dead_lettered"
    # And a replay without an id or --all is a usage error
    assert app.test_cli_runner().invoke(args=["dlq", "replay"]).exit_code == 2


def test_the_cli_deletes_one_dead_letter_and_purges_old_ones(
    app: Flask, client: FlaskClient
) -> None:
    # Given dead letters from 40 days ago and one from today
    old = make_dead_letters(app, 2, clock=FixedClock(time.time() - 40 * 86400))
    recent, doomed = make_dead_letters(app, 2)
    runner = app.test_cli_runner()
    # When one is deleted
    assert f"Deleted dead letter {doomed}." in dlq(runner, "delete", doomed)
    assert "no dead letter" in dlq(runner, "delete", doomed, exit_code=1)
    # And a dry run of a purge of those older than 30 days is asked, nothing goes
    assert "Would purge 2 dead letter(s)" in dlq(runner, "purge", "--older-than", "30d",
                                                 "--dry-run")
    assert len(listed_ids(client)) == 3
    # When they are purged
    assert "Purged 2 dead letter(s)" in dlq(runner, "purge", "--older-than", "30d")
    # Then only the recent one is left
    assert listed_ids(client) == [recent]
    assert client.get("/stats").json["dead_letters"] == 1
    assert event_view(client, old[0])["history"][-1]["step"] == "dead_letter_purged"
    bad = runner.invoke(args=["dlq", "purge", "--older-than", "a month"])
    assert bad.exit_code == 2 and "--older-than" in bad.output
