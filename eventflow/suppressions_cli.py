"""``flask --app wsgi suppressions ...``: the suppression list for operators, through the
same code as ``/api/v1/suppressions``."""

from __future__ import annotations

import json

import click
from email_validator import EmailNotValidError
from flask.cli import AppGroup

from eventflow.cli import table
from eventflow.statuses import SuppressionReason
from eventflow.suppressions import InvalidCursor
from eventflow.suppressions_api import MAX_PAGE, suppressions

suppressions_cli = AppGroup("suppressions",
                            help="List, show, add and delete suppressed addresses.")

REASONS = click.Choice([r.value for r in SuppressionReason])


@suppressions_cli.command("list")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=50, show_default=True)
@click.option("--cursor", help="Where the previous page stopped.")
@click.option("--reason", type=REASONS, help="Only entries with this reason.")
def list_command(limit: int, cursor: str | None, reason: str | None) -> None:
    """A page of suppressed addresses, in address order."""
    try:
        page = suppressions().page(limit, cursor, reason)
    except InvalidCursor as exc:
        raise click.BadParameter(str(exc), param_hint="--cursor") from None
    rows = [(e["address"], e["reason"], e["created_at"], e["expires_at"] or "never",
             e["event_id"] or "") for e in page.items]
    click.echo(table(("ADDRESS", "REASON", "CREATED", "EXPIRES", "EVENT"), rows))
    if page.next_cursor:
        click.echo(f"\nMore: flask suppressions list --cursor {page.next_cursor}")


@suppressions_cli.command("show")
@click.argument("address")
def show_command(address: str) -> None:
    """One entry, as JSON."""
    entry = suppressions().get(address)
    if entry is None:
        raise click.ClickException(f"{address} is not on the suppression list")
    click.echo(json.dumps(entry, indent=2))


@suppressions_cli.command("add")
@click.argument("address")
@click.option("--reason", type=REASONS, default=SuppressionReason.MANUAL.value,
              show_default=True)
def add_command(address: str, reason: str) -> None:
    """Put an address on the list (manual entries and complaints never expire)."""
    try:
        entry = suppressions().add(address, reason)
    except EmailNotValidError as exc:
        raise click.BadParameter(f"not a valid email address: {exc}",
                                 param_hint="ADDRESS") from None
    click.echo(json.dumps(entry, indent=2))


@suppressions_cli.command("delete")
@click.argument("address")
def delete_command(address: str) -> None:
    """Take an address off the list: events to it are sent again."""
    if not suppressions().delete(address):
        raise click.ClickException(f"{address} is not on the suppression list")
    click.echo(f"{address} deleted from the suppression list")
