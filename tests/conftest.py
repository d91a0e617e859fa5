"""Fixtures: a real Redis database of our own, a scripted SMTP server, the app, workers.

Redis: ``EVENTFLOW_TEST_REDIS_URL`` or ``redis://127.0.0.1:6379/9``; only that database
is flushed. ``make test`` makes sure a Redis answers there (starting one if not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from flask import Flask
from flask.testing import FlaskClient

from eventflow import create_app
from eventflow.settings import Settings
from tests.smtp_server import ScriptedSMTPServer

TEST_REDIS_URL = os.environ.get("EVENTFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PRODUCER_KEY = "producer-key-0123456789abcdef"
OTHER_PRODUCER_KEY = "other-producer-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcdef012345"

EXAMPLE_EVENT = {
    "user_id": "user-123",
    "event_type": "USER_NOTIFICATION",
    "payload": {"to_email": "test@example.com", "message": "Hello"},
}


def auth(key: str = PRODUCER_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of the test database, emptied before each test."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {TEST_REDIS_URL}: run the suite with `make test`")
    client.flushdb()
    yield TEST_REDIS_URL
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test database."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def smtp_server() -> Iterator[ScriptedSMTPServer]:
    """A real SMTP server on loopback that accepts everything until told otherwise."""
    server = ScriptedSMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def environment(redis_url: str, smtp_server: ScriptedSMTPServer) -> dict[str, str]:
    """The environment of a process under test: fast retries, test keys."""
    return {
        "REDIS_URL": redis_url,
        "SMTP_URL": smtp_server.url,
        "MAIL_FROM": "EventFlow <noreply@eventflow.test>",
        "EVENTFLOW_API_KEYS": f"{PRODUCER_KEY},{OTHER_PRODUCER_KEY}",
        "EVENTFLOW_ADMIN_KEYS": ADMIN_KEY,
        "EVENTFLOW_MAX_RETRIES": "5",
        "EVENTFLOW_RETRY_BACKOFF": "0.05",
        "EVENTFLOW_RETRY_BACKOFF_MAX": "0.2",
        "EVENTFLOW_VISIBILITY_TIMEOUT": "30",
        "EVENTFLOW_SMTP_TIMEOUT": "5",
        # A worker stopped by SIGTERM waits this long even when idle (it may hold retry
        # waits to hand back); the tests of stopping set their own.
        "EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT": "1",
        # The worker's per-task lines ("Task ... received"): some tests find which worker
        # took an event by them. (The Procfile's default, WARNING, leaves them out.)
        "WORKER_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def make_app(environment: dict[str, str]) -> Callable[..., Flask]:
    """Build an app from the test environment with some variables changed."""

    def build(**overrides: str) -> Flask:
        settings = Settings.from_env({**environment, **overrides})
        return create_app(settings, {"TESTING": True})

    return build


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The app, configured for the test Redis database and SMTP server."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def worker(app: Flask) -> Iterator[Any]:
    """A Celery worker in this process, consuming from the test Redis database."""
    celery_app = app.extensions["celery"]
    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=10) as running:
        yield running
