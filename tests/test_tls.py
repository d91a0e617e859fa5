"""Transport and secrets: SMTP over STARTTLS verifies the server, credentials never go out in
clear, ``rediss://`` works, and no password or key shows in any log, error or figure."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from flask import Flask

from eventflow.devstack.smtp import SMTPServer
from eventflow.settings import ConfigError, parse_smtp_url
from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, PRODUCER_KEY, auth
from tests.processes import worker_processes
from tests.tls_servers import Certificates, TlsRedis, tls_smtp_server, tls_smtp_url
from tests.waiting import wait_for

FINAL = ("delivered", "dead_lettered", "rate_limited")


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    """A CA and a server certificate for 127.0.0.1, made for this test."""
    return Certificates.make(tmp_path)


@pytest.fixture
def tls_smtp(certs: Certificates) -> Iterator[SMTPServer]:
    """An SMTP server that requires STARTTLS, with a certificate no system trusts."""
    server = tls_smtp_server(certs).start()
    yield server
    server.stop()


def final_view(client: Any, event_id: str, timeout: float = 20) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        view = client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY)).json
        return view if view["status"] in FINAL else None

    return wait_for(finished, timeout=timeout, message=f"event {event_id} to finish")  # type: ignore[no-any-return]


def deliver_one(app: Flask) -> dict[str, Any]:
    """Send one event through an in-process worker; its final view."""
    client = app.test_client()
    event_id = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
    with start_worker(app.extensions["celery"], pool="threads", concurrency=1,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        return final_view(client, event_id)


# -- SMTP_URL -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "smtp://user:secret-pw@mail.example.com:587",
    "smtp://user:secret-pw@mail.example.com?starttls=false",
    "smtp://user@mail.example.com",
])
def test_credentials_without_tls_are_refused_at_start_up(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_smtp_url(url, {})
    assert str(caught.value).startswith("SMTP_URL: credentials would be sent without TLS")
    assert "secret-pw" not in str(caught.value)


def test_credentials_go_with_tls_or_with_an_explicit_insecure_allowance() -> None:
    starttls = parse_smtp_url("smtp://user:p%40ss@mail.example.com:587?starttls=true", {})
    assert (starttls.starttls, starttls.verify, starttls.username, starttls.password) == (
        True, True, "user", "p@ss")
    assert parse_smtp_url("smtps://user:pw@mail.example.com", {}).port == 465
    relay = parse_smtp_url("smtp://user:pw@relay.local?allow_insecure_auth=true", {})
    assert relay.allow_insecure_auth
    # And the password shows neither in the printable form nor in the repr
    assert "p@ss" not in starttls.describe() and "p@ss" not in repr(starttls)
    assert "p%40ss" not in repr(starttls)
    unverified = parse_smtp_url("smtp://mail.example.com?starttls=true&verify=false", {})
    assert unverified.verify is False


# -- STARTTLS --------------------------------------------------------------------------------


def test_a_certificate_that_does_not_verify_dead_letters_the_event_at_once_with_the_reason(
    make_app: Callable[..., Flask], tls_smtp: SMTPServer, redis_client: redis.Redis
) -> None:
    # Given a STARTTLS server whose certificate no trusted CA signed
    app = make_app(SMTP_URL=tls_smtp_url(tls_smtp))
    # When an event is delivered
    view = deliver_one(app)
    # Then it is dead-lettered at the first attempt, saying why, and nothing was sent
    assert view["status"] == "dead_lettered"
    assert view["attempts"] == 1
    assert view["last_error"].startswith("TLS certificate not trusted")
    letter = json.loads(redis_client.get(f"ef:dl:{view['id']}"))
    assert letter["error_type"] == "permanent"
    assert "certificate" in letter["error"]
    assert tls_smtp.received == []


def test_with_verification_turned_off_the_email_goes_out_over_tls(
    make_app: Callable[..., Flask], tls_smtp: SMTPServer
) -> None:
    app = make_app(SMTP_URL=tls_smtp_url(tls_smtp, "starttls=true&verify=false"))
    view = deliver_one(app)
    assert view["status"] == "delivered"
    assert [(d.rcpt_tos, d.tls) for d in tls_smtp.received] == [(["test@example.com"], True)]


# -- rediss:// and a trusted CA, with every secret looked for afterwards ------------------


def test_over_rediss_and_verified_starttls_with_auth_the_email_goes_out_and_no_secret_leaks(
    make_app: Callable[..., Flask], environment: dict[str, str], certs: Certificates,
    tls_smtp: SMTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Given Redis over TLS with a password, and SMTP with STARTTLS and AUTH, whose CA the
    # worker trusts (SSL_CERT_FILE), and a web app and a real worker process using them
    tls_redis = TlsRedis(certs, tmp_path).start()
    try:
        smtp_url = tls_smtp_url(tls_smtp, credentials=True)
        env = {**environment, "REDIS_URL": tls_redis.url(), "SMTP_URL": smtp_url,
               "SSL_CERT_FILE": str(certs.ca_file)}
        app = make_app(REDIS_URL=tls_redis.url(), SMTP_URL=smtp_url)
        client = app.test_client()
        store = redis.Redis.from_url(tls_redis.url(), decode_responses=True)
        store.flushdb()
        # When an event is accepted (its task message waits in Redis, over TLS)
        accepted = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
        assert accepted.status_code == 202
        event_id = accepted.json["id"]
        queued = [json.loads(m) for m in store.lrange("celery", 0, -1)]
        # And a real worker process delivers it
        with worker_processes(env, tmp_path) as (worker,):
            view = final_view(client, event_id, timeout=30)
            worker_log = worker.output()
        # Then it was delivered, over TLS, after logging in
        assert view["status"] == "delivered"
        assert [(d.rcpt_tos, d.login, d.tls) for d in tls_smtp.received] == [
            (["test@example.com"], tls_smtp.user, True)]
        assert tls_smtp.logins == [(tls_smtp.user, tls_smtp.password)]  # the secret was used
        # And the task carried the event id only (what Flower would show as its arguments)
        assert len(queued) == 1
        args, kwargs, _ = json.loads(base64.b64decode(queued[0]["body"]))
        assert (args, kwargs) == ([event_id], {})
        # And no secret is anywhere: logs of both processes, the figures, the event
        figures = client.get("/stats").get_data(as_text=True) + client.get(
            "/metrics").get_data(as_text=True)
        seen = "\n".join([caplog.text, worker_log, figures, json.dumps(view),
                          json.dumps(queued), str(store.hgetall(f"ef:ev:{event_id}"))])
        assert "ready." in worker_log  # the worker log was really read
        for secret in (tls_redis.password, tls_smtp.password, PRODUCER_KEY, ADMIN_KEY):
            assert secret not in seen, f"a secret leaked: {secret[:4]}..."
        store.close()
    finally:
        tls_redis.stop()
