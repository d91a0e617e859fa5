"""Previewing an email: ``POST /api/v1/templates/<type>/preview`` and ``flask templates``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import ADMIN_KEY, auth
from tests.test_template_delivery import TEMPLATES

ADMIN = auth(ADMIN_KEY)


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    """The operator's templates (those of the delivery tests)."""
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


def test_the_preview_renders_subject_text_and_html_in_the_locale_asked(
    client: FlaskClient,
) -> None:
    response = client.post("/api/v1/templates/PASSWORD_RESET/preview", headers=ADMIN,
                           json={"data": {"name": "Zoé", "url": "https://app.test/r"},
                                 "locale": "fr-CA"})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["subject"] == "Réinitialisez votre mot de passe, Zoé"
    assert body["text"] == "Bonjour Zoé,\nc'est ici : https://app.test/r"
    assert 'style="color: #0b6e4f;font-weight: bold;"' in body["html"]
    assert (body["template"], body["locale"]) == ("PASSWORD_RESET", "fr")


def test_a_template_without_html_previews_html_as_null(client: FlaskClient,
                                                       templates_dir: Path) -> None:
    (templates_dir / "USER_SIGNUP").mkdir()
    (templates_dir / "USER_SIGNUP" / "subject.txt").write_text("Welcome, {{ name }}")
    (templates_dir / "USER_SIGNUP" / "body.txt").write_text("Hi {{ name }}")
    response = client.post("/api/v1/templates/USER_SIGNUP/preview", headers=ADMIN,
                           json={"data": {"name": "Ann"}})
    assert response.status_code == 200
    assert (response.json["subject"], response.json["text"], response.json["html"]) == (
        "Welcome, Ann", "Hi Ann", None)


def test_the_preview_names_what_is_missing_with_422(client: FlaskClient) -> None:
    response = client.post("/api/v1/templates/PASSWORD_RESET/preview", headers=ADMIN,
                           json={"data": {"name": "Ann"}})
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    assert response.json["errors"] == {"payload": {"data": [
        "Missing variable 'url' (PASSWORD_RESET/body.txt, line 2)."]}}


def test_the_preview_of_a_sandbox_escape_is_refused_not_evaluated(
    client: FlaskClient, templates_dir: Path
) -> None:
    (templates_dir / "USER_SIGNUP").mkdir()
    (templates_dir / "USER_SIGNUP" / "subject.txt").write_text("Hi")
    (templates_dir / "USER_SIGNUP" / "body.txt").write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    response = client.post("/api/v1/templates/USER_SIGNUP/preview", headers=ADMIN, json={})
    assert response.status_code == 422
    (error,) = response.json["errors"]["payload"]["data"]
    assert "unsafe" in error and "<class" not in response.get_data(as_text=True)


def test_the_preview_is_for_admin_keys_and_known_event_types(client: FlaskClient) -> None:
    path = "/api/v1/templates/PASSWORD_RESET/preview"
    assert client.post(path, json={}).status_code == 401
    assert client.post(path, headers=auth(), json={}).status_code == 403
    unknown = client.post("/api/v1/templates/NOPE/preview", headers=ADMIN, json={})
    assert unknown.status_code == 404
    bad = client.post(path, headers=ADMIN, json={"data": [1], "locale": "not a locale"})
    assert bad.status_code == 422 and set(bad.json["errors"]) == {"data", "locale"}


def test_flask_templates_preview_prints_the_same_email(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=[
        "templates", "preview", "PASSWORD_RESET", "--locale", "fr",
        "--data", json.dumps({"name": "Ann", "url": "https://app.test/r"}), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["subject"] == "Réinitialisez votre mot de passe, Ann"
    missing = app.test_cli_runner().invoke(args=[
        "templates", "preview", "PASSWORD_RESET", "--data", '{"name": "Ann"}'])
    assert missing.exit_code == 1 and "Missing variable 'url'" in missing.output


def test_flask_templates_check_renders_every_locale_with_its_sample_and_fails_on_errors(
    app: Flask, templates_dir: Path
) -> None:
    runner = app.test_cli_runner()
    # Given templates without a sample: PASSWORD_RESET needs name and url
    failed = runner.invoke(args=["templates", "check"])
    assert failed.exit_code == 1
    assert "FAIL PASSWORD_RESET:" in failed.output and "FAIL PASSWORD_RESET [fr]:" in failed.output
    assert "ok   USER_NOTIFICATION:" in failed.output  # the shipped ones render
    # When the template carries its own sample
    (templates_dir / "PASSWORD_RESET" / "sample.json").write_text(json.dumps(
        {"data": {"name": "Ann", "url": "https://app.test/r"}}))
    passed = runner.invoke(args=["templates", "check"])
    # Then every template renders, in each locale
    assert passed.exit_code == 0, passed.output
    assert "ok   PASSWORD_RESET [fr]:" in passed.output
    # And a directory that names no event type is an error (a typo would go unused)
    (templates_dir / "PASWORD_RESET").mkdir()
    typo = runner.invoke(args=["templates", "check"])
    assert typo.exit_code == 1 and "FAIL PASWORD_RESET/" in typo.output
