"""What a worker does with an outcome it knows while Redis cannot record it.

The real parts: a redis-server of the test's own (so that it can be paused), the
Procfile's worker command, and an SMTP server on loopback that pauses Redis at the
moment it answers 250.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from eventflow.devstack.smtp import _Handler
from tests.conftest import auth
from tests.faults import event_to, final_record, steps
from tests.processes import worker_processes
from tests.redis_server import RedisServer
from tests.smtp_server import ScriptedSMTPServer, free_port
from tests.waiting import wait_for


class PausingSMTPServer(ScriptedSMTPServer):
    """The scripted server, which can pause a Redis (``CLIENT PAUSE``) right after it
    took a message and before it answers 250: the worker then learns of the 250 while
    Redis does not answer."""

    def __init__(self) -> None:
        super().__init__()
        self._pauses: list[tuple[redis.Redis, float]] = []

    def pause_redis_after_next_message(self, client: redis.Redis, seconds: float) -> None:
        self._pauses.append((client, seconds))

    def start(self) -> PausingSMTPServer:
        from aiosmtpd.controller import Controller

        self._controller = Controller(_PausingHandler(self), hostname=self.host,
                                      port=self.port, ready_timeout=10)
        self._controller.start()
        return self


class _PausingHandler(_Handler):
    server: PausingSMTPServer

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250") and self.server._pauses:
            client, seconds = self.server._pauses.pop(0)
            client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
        return reply


@pytest.fixture
def smtp_server() -> Iterator[PausingSMTPServer]:
    """An SMTP server on loopback that can pause Redis as it answers 250."""
    server = PausingSMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may pause."""
    server = RedisServer(free_port(), tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.mark.slow
def test_redis_stalling_as_the_server_says_250_ends_delivered_once_with_a_true_history(
    environment: dict[str, str], make_app: Callable[..., Flask], smtp_server: PausingSMTPServer,
    private_redis: RedisServer, tmp_path: Path,
) -> None:
    # Given a worker (the Procfile's command) on a Redis of our own; its Redis client
    # gives up on a command after 3 s
    env = {**environment, "REDIS_URL": private_redis.url}
    app = make_app(REDIS_URL=private_redis.url)
    client = app.test_client()
    store = private_redis.client()
    try:
        with worker_processes(env, tmp_path, count=1, concurrency=1) as (worker,):
            for address, pause in (("short@example.com", 2.5), ("long@example.com", 9.0)):
                # When Redis stalls (CLIENT PAUSE) at the moment the SMTP server says 250:
                # for less than the client's timeout, then for three times as long
                control = private_redis.client()
                smtp_server.pause_redis_after_next_message(control, pause)
                event_id = client.post("/api/v1/events", json=event_to(address),
                                       headers=auth()).json["id"]
                # Then the worker keeps the 250 and records it once Redis answers again
                final = final_record(store, event_id, timeout=pause + 12)
                control.close()
                assert final["status"] == "delivered", worker.output()[-3000:]
                # with one email, one attempt, and a history that tells what happened
                assert len(smtp_server.messages_for(event_id)) == 1
                assert final["attempts"] == "1"
                assert steps(store, event_id) == ["accepted", "attempt", "delivered"]
            # (the worker logs it just after the write that the record above shows)
            wait_for(lambda: "delivery recorded after" in worker.output(), timeout=10,
                     message="the worker's 'delivery recorded after' log line")
        # And no run took the event again meanwhile: nothing ambiguous, nothing lost
        counters = store.hgetall("ef:stats")
        assert counters.get("ambiguous", "0") == "0"
        assert counters["delivered"] == "2"
        assert len(smtp_server.received) == 2
    finally:
        store.close()
