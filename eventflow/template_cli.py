"""``flask --app wsgi templates ...``: preview an event type's email, check every template.

``check`` is for the operator's CI: it renders each event type's template in each of its
locales with the template's own sample data (``sample.json`` beside it) and exits
non-zero on any error, before a change reaches the workers.
"""

from __future__ import annotations

import json
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from marshmallow import ValidationError

from eventflow.previews import preview
from eventflow.rendering import TemplateFailed, Templates
from eventflow.schemas import DEFAULT_SUBJECTS

templates_cli = AppGroup("templates", help="Preview and check the email templates.")


def current_templates() -> Templates:
    return current_app.extensions["eventflow"].templates  # type: ignore[no-any-return]


def _json_option(text: str | None, option: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


@templates_cli.command("preview")
@click.argument("event_type", type=click.Choice(sorted(DEFAULT_SUBJECTS)))
@click.option("--data", help="The template's variables, as JSON (an event's payload.data).")
@click.option("--locale", help="A BCP 47 tag, such as fr-CA.")
@click.option("--payload", "payload_json",
              help='Other payload fields as JSON, such as {"message": "Hello"}.')
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
def preview_command(event_type: str, data: str | None, locale: str | None,
                    payload_json: str | None, as_json: bool) -> None:
    """Print the subject, text and HTML that EVENT_TYPE's template renders."""
    request: dict[str, Any] = {}
    for name, value in (("data", _json_option(data, "--data")), ("locale", locale),
                        ("payload", _json_option(payload_json, "--payload"))):
        if value is not None:
            request[name] = value
    try:
        rendered = preview(current_templates(), event_type, request)
    except ValidationError as exc:
        click.echo(f"{event_type} does not render: {json.dumps(exc.messages)}", err=True)
        raise SystemExit(1) from None
    if as_json:
        click.echo(json.dumps(rendered.as_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(f"Template: {rendered.template} (locale {rendered.locale or 'default'}, "
               f"version {rendered.version})")
    click.echo(f"Subject: {rendered.subject}\n\n--- text ---\n{rendered.text}")
    click.echo("\n--- html ---\n" + (rendered.html if rendered.html is not None else "(none)"))


@templates_cli.command("check")
def check_command() -> None:
    """Render every template, in every locale, with its sample; exit 1 on any error."""
    templates = current_templates()
    failures = 0
    for name in templates.unknown_directories():
        click.echo(f"FAIL {name}/: not an event type (known: "
                   f"{', '.join(templates.event_types)})")
        failures += 1
    for event_type in templates.event_types:
        for locale in [None, *templates.locales(event_type)]:
            label = event_type + (f" [{locale}]" if locale else "")
            try:
                sample = templates.sample(event_type, locale)
                request: dict[str, Any] = {
                    key: sample[key] for key in ("data", "payload") if key in sample}
                if locale or sample.get("locale"):
                    request["locale"] = locale or sample["locale"]
                rendered = preview(templates, event_type, request)
            except ValidationError as exc:
                click.echo(f"FAIL {label}: {json.dumps(exc.messages, ensure_ascii=False)}")
                failures += 1
                continue
            except (TemplateFailed, ValueError) as exc:
                click.echo(f"FAIL {label}: {exc}")
                failures += 1
                continue
            parts = "text and HTML" if rendered.html is not None else "text only"
            click.echo(f"ok   {label}: {parts}, version {rendered.version}, "
                       f"subject {rendered.subject!r}")
    where = templates.directory or "the shipped templates"
    if failures:
        click.echo(f"{failures} template(s) failed in {where}", err=True)
        raise SystemExit(1)
    click.echo(f"every template renders ({where})")
