"""``flask --app wsgi dlq ...``: the dead-letter queue for operators.

It works on the same Redis as the API (the app's :class:`~eventflow.services.Services`)
and through the same code, so a replay from here is paced, re-validated and audited
exactly like one over HTTP; the audit names the operator as ``cli:<login>``.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
from flask.cli import AppGroup
from marshmallow import ValidationError

from eventflow.admin import dead_letters
from eventflow.deadletters import (
    ERROR_TYPES,
    FilterSchema,
    InvalidCursor,
    LetterFilter,
    ReplayReport,
    letter_filter,
)
from eventflow.settings import DURATION_RE, DURATION_UNITS

dlq = AppGroup("dlq", help="List, show, replay, delete and purge dead letters.")

#: Longest error text shown in a table cell.
ERROR_WIDTH = 60

filter_schema = FilterSchema()


def operator() -> str:
    """Who runs this command, for the audit trail."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in some containers
        return "cli"


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w`` in seconds."""
    match = DURATION_RE.match(text)
    if not match:
        raise click.BadParameter(f"expected a number and a unit (s, m, h, d, w), got {text!r}",
                                 param_hint="--older-than")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters of the dead-letter endpoints, as options."""
    options = [
        click.option("--error-type", type=click.Choice(ERROR_TYPES), help="Kind of failure."),
        click.option("--event-type", help="Event type, e.g. USER_NOTIFICATION."),
        click.option("--user-id", help="The event's user_id."),
        click.option("--since", help="Failed at or after this ISO 8601 time."),
        click.option("--until", help="Failed before this ISO 8601 time."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_filter(**raw: str | None) -> LetterFilter:
    """The filter options, validated as the API validates its query string."""
    try:
        loaded = filter_schema.load({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        raise click.UsageError(f"invalid filter: {json.dumps(exc.messages)}") from None
    return letter_filter(loaded)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain columns aligned with spaces, the first line naming them."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def shorten(text: str | None, width: int = ERROR_WIDTH) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def details(entry: dict[str, Any], skip: Sequence[str]) -> str:
    """The other fields of a history or audit entry, as ``key=value`` pairs."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
                    for k, v in entry.items() if k not in skip)


@dlq.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--cursor", help="Continue after the page that printed this cursor.")
def list_command(limit: int, cursor: str | None, **filters: str | None) -> None:
    """List dead letters, newest first."""
    try:
        page = dead_letters().page(build_filter(**filters), limit, cursor)
    except InvalidCursor as exc:
        raise click.BadParameter(str(exc), param_hint="--cursor") from None
    if not page.items:
        click.echo("No dead letters.")
        return
    rows = [
        (item["id"], item["failed_at"], item["error_type"], item["attempts"],
         item["event"]["event_type"], item["event"]["user_id"], shorten(item["error"]))
        for item in page.items
    ]
    click.echo(table(("ID", "FAILED AT", "ERROR TYPE", "ATTEMPTS", "EVENT TYPE", "USER", "ERROR"),
                     rows))
    if page.next_cursor:
        click.echo(f"\nMore: flask dlq list --cursor {page.next_cursor}")


@dlq.command("show", short_help="Show one dead letter in full.")
@click.argument("event_id")
def show_command(event_id: str) -> None:
    """Show one dead letter: the event, the failure, its history and audit trail."""
    service = dead_letters()
    letter = service.get(event_id)
    audit = letter["audit"] if letter else service.audit(event_id)
    if letter is None and not audit:
        raise click.ClickException(f"no dead letter {event_id}")
    if letter is None:
        click.echo(f"{event_id} is not in the dead-letter queue any more.")
    else:
        event = letter["event"]
        fields = [
            ("id", letter["id"]), ("failed at", letter["failed_at"]),
            ("error type", letter["error_type"]), ("error", letter["error"]),
            ("attempts", letter["attempts"]), ("producer", letter.get("producer")),
            ("user id", event["user_id"]), ("event type", event["event_type"]),
            ("payload", json.dumps(event["payload"], ensure_ascii=False)),
        ]
        width = max(len(name) for name, _ in fields) + 1
        for name, value in fields:
            click.echo(f"{name + ':':<{width}} {value}")
        click.echo("\nHistory:")
        click.echo(table(("AT", "STEP", "DETAILS"),
                         [(e["at"], e["step"], details(e, ("at", "step")))
                          for e in letter["history"]]))
    click.echo("\nAudit:")
    click.echo(table(("AT", "ACTION", "BY", "OUTCOME", "DETAILS"),
                     [(e["at"], e["action"], e.get("by", ""), e.get("outcome", ""),
                       details(e, ("at", "action", "by", "outcome"))) for e in audit]))


@dlq.command("replay", short_help="Queue dead letters again, paced.")
@click.argument("event_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every matching dead letter.")
@filter_options
@click.option("--dry-run", is_flag=True, help="Only report what would be replayed.")
def replay_command(event_id: str | None, replay_all: bool, dry_run: bool,
                   **filters: str | None) -> None:
    """Queue one dead letter (ID) or all matching ones (--all) again, paced."""
    if bool(event_id) == replay_all:
        raise click.UsageError("give either one EVENT_ID or --all (with optional filters)")
    if event_id:
        if dry_run or any(v is not None for v in filters.values()):
            raise click.UsageError("--dry-run and filters go with --all")
        replay_one(event_id)
        return
    service = dead_letters()
    flt = service.snapshot(build_filter(**filters))
    total = ReplayReport(dry_run)
    while True:
        report = service.replay_matching(flt, operator(), dry_run=dry_run)
        total.replayed += report.replayed
        total.rejected += report.rejected
        total.skipped += report.skipped
        if not report.deferred:
            break
        # The replay schedule is full: wait for room rather than flood the SMTP server.
        click.echo(f"{len(total.replayed)} queued, {report.deferred} waiting for the replay "
                   f"rate; next batch in {report.retry_after} s")
        time.sleep(report.retry_after or 1)
    print_report(total)
    if total.rejected:
        raise SystemExit(1)


def replay_one(event_id: str) -> None:
    service = dead_letters()
    while True:
        outcome = service.replay(event_id, operator())
        if outcome.state != "deferred":
            break
        time.sleep(outcome.retry_after or 1)
    if outcome.state == "missing":
        raise click.ClickException(f"no dead letter {event_id}")
    if outcome.state == "invalid":
        click.echo(f"{event_id} fails today's event schema and was not replayed:")
        click.echo(f"  {json.dumps(outcome.errors)}")
        raise SystemExit(1)
    when = f", to run at {outcome.scheduled_for}" if outcome.scheduled_for else ""
    click.echo(f"{event_id} queued again (task {outcome.task_id}{when}).")


def print_report(report: ReplayReport) -> None:
    verb = "Would replay" if report.dry_run else "Replayed"
    click.echo(f"{verb} {len(report.replayed)} dead letter(s).")
    if report.replayed and report.dry_run:
        click.echo("\n".join(f"  {event_id}" for event_id in report.replayed))
    if report.rejected:
        click.echo(f"\nNot replayed: {len(report.rejected)} fail today's event schema:")
        click.echo(table(("ID", "ERRORS"),
                         [(r["id"], shorten(json.dumps(r["errors"]), 100))
                          for r in report.rejected]))
    if report.skipped:
        click.echo(f"\nSkipped {len(report.skipped)} that left the queue meanwhile.")


@dlq.command("delete")
@click.argument("event_id")
def delete_command(event_id: str) -> None:
    """Delete one dead letter (its audit trail is kept)."""
    if not dead_letters().delete(event_id, operator()):
        raise click.ClickException(f"no dead letter {event_id}")
    click.echo(f"Deleted dead letter {event_id}.")


@dlq.command("purge")
@click.option("--older-than", required=True, help="Age, e.g. 30d, 12h, 2w.")
@click.option("--dry-run", is_flag=True, help="Only count what would be purged.")
def purge_command(older_than: str, dry_run: bool) -> None:
    """Delete dead letters (and audit trails) older than --older-than."""
    seconds = parse_duration(older_than)
    report = dead_letters().purge(seconds, operator(), dry_run=dry_run)
    verb = "Would purge" if dry_run else "Purged"
    click.echo(f"{verb} {report.letters} dead letter(s) and {report.audit_trails} audit "
               f"trail(s) of replayed or deleted letters, older than {older_than}.")
