"""Templated events end to end: HTTP in, a real worker, a real SMTP server out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.test_pipeline import final_event, post_event

LAYOUT = """<!DOCTYPE html><html><head><style>
  .greeting { color: #0b6e4f; font-weight: bold; }
  a.button { background-color: #0b6e4f; color: #ffffff; }
</style></head><body>{% block content %}{% endblock %}</body></html>"""

TEMPLATES = {
    "_layouts/mail.html": LAYOUT,
    "PASSWORD_RESET/subject.txt": "Reset your password, {{ name }}\n",
    "PASSWORD_RESET/body.txt": "Hello {{ name }},\nreset it here: {{ url }}\n",
    "PASSWORD_RESET/body.html": '{% extends "_layouts/mail.html" %}{% block content %}'
                                '<p class="greeting">Hello {{ name }}</p>'
                                '<a class="button" href="{{ url }}">Reset</a>{% endblock %}',
    "PASSWORD_RESET/fr/subject.txt": "Réinitialisez votre mot de passe, {{ name }}\n",
    "PASSWORD_RESET/fr/body.txt": "Bonjour {{ name }},\nc'est ici : {{ url }}\n",
    "PASSWORD_RESET/fr/body.html": '{% extends "_layouts/mail.html" %}{% block content %}'
                                   '<p class="greeting">Bonjour {{ name }}</p>'
                                   '<a class="button" href="{{ url }}">Réinitialiser</a>'
                                   '{% endblock %}',
}


def reset_event(locale: str | None = None, **data: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"to_email": "ann@example.com", "data": data}
    if locale:
        payload["locale"] = locale
    return {"user_id": "user-ann", "event_type": "PASSWORD_RESET", "payload": payload}


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    """The operator's templates: PASSWORD_RESET in English and French, a shared layout."""
    root = tmp_path / "templates"
    for name, text in TEMPLATES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def app(make_app: Callable[..., Flask], templates_dir: Path) -> Flask:
    """The app, with EVENTFLOW_TEMPLATES_DIR pointing at the operator's templates."""
    return make_app(EVENTFLOW_TEMPLATES_DIR=str(templates_dir))


def test_a_templated_event_arrives_as_text_and_html_with_inlined_css_in_its_locale(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given a French-Canadian user (fr-CA falls back to the fr files)
    event = reset_event("fr-CA", name="Zoé <3", url="https://app.test/reset?t=a&b")
    # When the event is posted with its data and delivered
    event_id = post_event(client, event)
    delivered = final_event(client, event_id)
    assert delivered["status"] == "delivered", delivered
    # Then one message arrived: multipart/alternative, text first, then HTML
    (received,) = smtp_server.messages_for(event_id)
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain", "text/html"]
    assert message["Subject"] == "Réinitialisez votre mot de passe, Zoé <3"
    text = message.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n") == "Bonjour Zoé <3,\nc'est ici : https://app.test/reset?t=a&b\n"
    html = message.get_body(("html",)).get_content()
    # The HTML is escaped, its CSS inlined on the elements, the <style> gone
    assert '<p class="greeting" style="color: #0b6e4f;font-weight: bold;">Bonjour Zoé &lt;3</p>' in html
    assert 'href="https://app.test/reset?t=a&amp;b"' in html and "<style" not in html
    assert "Réinitialiser" in html
    # And the history says which template, locale and version made it
    (attempt,) = [step for step in delivered["history"] if step["step"] == "attempt"]
    assert attempt["template"] == "PASSWORD_RESET" and attempt["locale"] == "fr"
    assert len(attempt["template_version"]) == 12


def test_the_seed_example_still_says_the_same_under_the_shipped_templates(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given the contract's example event (no data, an event type with no operator template)
    event_id = post_event(client, EXAMPLE_EVENT)
    assert final_event(client, event_id)["status"] == "delivered"
    (received,) = smtp_server.messages_for(event_id)
    # Then its subject and text are today's, and the shipped HTML carries the message
    assert received.message["Subject"] == "You have a new notification"
    assert received.message.get_body(("plain",)).get_content() == "Hello\r\n"
    assert ">Hello</div>" in received.message.get_body(("html",)).get_content()


def test_an_event_missing_a_variable_is_refused_at_the_door_naming_it(
    client: FlaskClient, redis_client: Any
) -> None:
    # When an event lacks a variable its template uses
    response = client.post("/api/v1/events", json=reset_event(name="Ann"), headers=auth())
    # Then 422, naming the variable and where the template uses it
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    assert response.json["errors"] == {"payload": {"data": [
        "Missing variable 'url' (PASSWORD_RESET/body.txt, line 2)."]}}
    # And in a batch, that event alone is refused
    batch = client.post("/api/v1/events/batch", headers=auth(), json={"events": [
        reset_event(name="Ann"), reset_event(name="Ann", url="https://app.test/r")]})
    assert batch.status_code == 207
    first, second = batch.json["results"]
    assert first == {"status": 422, "errors": {"payload": {"data": [
        "Missing variable 'url' (PASSWORD_RESET/body.txt, line 2)."]}}}
    assert second["status"] == "queued"
    # And nothing was stored for the refused ones: one event only
    assert len(redis_client.keys("ef:ev:*")) == 1


def test_a_plain_event_whose_template_needs_data_is_refused_not_taken_by_the_fast_path(
    client: FlaskClient, redis_client: Any
) -> None:
    # Given a plain event (to_email and message only) for a template that needs data
    event = {"user_id": "u", "event_type": "PASSWORD_RESET",
             "payload": {"to_email": "ann@example.com", "message": "Hi"}}
    response = client.post("/api/v1/events", json=event, headers=auth())
    assert response.status_code == 422
    assert "Missing variable 'name'" in response.json["errors"]["payload"]["data"][0]
    assert redis_client.keys("ef:ev:*") == []


def test_a_template_broken_after_acceptance_is_dead_lettered_and_a_replay_delivers_it_once_fixed(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, templates_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Given an event accepted while its template rendered
    event_id = post_event(client, reset_event(name="Ann", url="https://app.test/r"))
    # When the operator changes the template before it is sent, to use a variable the
    # event does not carry, and a worker takes it
    body = templates_dir / "PASSWORD_RESET" / "body.txt"
    good = body.read_text()
    body.write_text("Hello {{ name }}, your code is {{ code }}\n")
    request.getfixturevalue("worker")
    # Then it is dead-lettered as template_error, with the reason, and nothing was sent
    dead = final_event(client, event_id)
    assert dead["status"] == "dead_lettered"
    assert smtp_server.messages_for(event_id) == []
    letter = client.get(f"/api/v1/dead-letters/{event_id}", headers=auth(ADMIN_KEY)).json
    assert letter["error_type"] == "template_error"
    assert letter["error"] == "Missing variable 'code' (PASSWORD_RESET/body.txt, line 1)."
    (attempt,) = [step for step in dead["history"] if step["step"] == "attempt"]
    assert (attempt["outcome"], attempt["error_type"]) == ("permanent", "template_error")
    # When the template is fixed and the dead letter replayed
    body.write_text(good)
    replay = client.post(f"/api/v1/dead-letters/{event_id}/replay", headers=auth(ADMIN_KEY))
    assert replay.status_code == 202, replay.json
    # Then it is delivered, once, with today's template
    delivered = final_event(client, event_id)
    assert delivered["status"] == "delivered"
    (received,) = smtp_server.messages_for(event_id)
    assert "reset it here: https://app.test/r" in received.message.get_body(
        ("plain",)).get_content()
