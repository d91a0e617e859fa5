"""What the server behind the Procfile's ``web`` line promises, tried on the real process.

Each test starts the Procfile's own ``web`` command (granian, two workers unless said) on
a port of its own, and talks HTTP to it as a client or a PaaS router would.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask, request

from eventflow.metrics import forget_dead_processes
from tests.conftest import EXAMPLE_EVENT, PRODUCER_KEY
from tests.processes import Process, procfile_command
from tests.smtp_server import free_port
from tests.waiting import wait_for

HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {PRODUCER_KEY}"}


class Web:
    """The Procfile's web process on loopback."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, \
                response.read()
        finally:
            connection.close()

    def answers(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"web exited:\n{self.process.output()[-3000:]}")
        try:
            return self.request("GET", "/health")[0] == 200
        except OSError:
            return False

    def workers(self) -> list[int]:
        return self.process.children()


@contextmanager
def web_process(environment: dict[str, str], tmp_path: Path, **env: str) -> Iterator[Web]:
    port = free_port()
    command = procfile_command("web").replace("0.0.0.0", "127.0.0.1")
    process = Process(command, {**environment, "PORT": str(port), **env},
                      tmp_path / f"web-{port}.log")
    web = Web(process, port)
    try:
        wait_for(web.answers, timeout=30, interval=0.1, message="the web process to answer")
        yield web
    finally:
        process.stop()


def chunked_post(web: Web, body: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length)."""
    connection = web.connection()
    try:
        connection.request("POST", "/api/v1/events", encode_chunked=True,
                           body=(body[i:i + 4096] for i in range(0, len(body), 4096)),
                           headers={**HEADERS, "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, json.loads(response.read())
    finally:
        connection.close()


def event_of_size(size: int) -> bytes:
    """An event whose JSON is ``size`` bytes long (its message padded)."""
    event = {**EXAMPLE_EVENT, "payload": {**EXAMPLE_EVENT["payload"], "message": ""}}
    bare = len(json.dumps(event).encode())
    event["payload"]["message"] = "x" * (size - bare)  # type: ignore[index]
    raw = json.dumps(event).encode()
    assert len(raw) == size
    return raw


def test_a_chunked_body_over_64_kib_is_answered_413_and_a_small_one_is_accepted(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    with web_process(environment, tmp_path) as web:
        # Given a chunked body one byte over 64 KiB, and a much longer one
        for size in (64 * 1024 + 1, 300 * 1024):
            # When it is posted without a Content-Length
            status, headers, problem = chunked_post(web, event_of_size(size))
            # Then the answer is 413 as a problem document, not a 400 for cut JSON
            assert status == 413, problem
            assert headers["content-type"] == "application/problem+json"
            assert problem["status"] == 413
        # And a small chunked event is accepted as any other
        status, _, accepted = chunked_post(web, json.dumps(EXAMPLE_EVENT).encode())
        assert status == 202 and accepted["status"] == "queued"


def test_sigterm_lets_a_request_in_hand_finish_and_the_process_exit(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    with web_process(environment, tmp_path) as web:
        # Given a request whose body is still arriving
        body = json.dumps(EXAMPLE_EVENT).encode()
        client = socket.create_connection(("127.0.0.1", web.port), timeout=10)
        client.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.3)  # the server has taken the connection and the request's head
        # When the platform sends SIGTERM (a restart or a deploy)
        web.process.signal(signal.SIGTERM)
        time.sleep(0.3)
        client.sendall(body[10:])
        # Then the request is answered 202, the event stored
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        client.close()
        assert reply.startswith(b"HTTP/1.1 202"), reply[:300]
        # And the process exits by itself, well before the kill timeout
        web.process.popen.wait(timeout=15)


@pytest.mark.slow
def test_web_concurrency_sets_the_worker_processes_and_a_killed_worker_is_replaced(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    with web_process(environment, tmp_path, WEB_CONCURRENCY="3") as web:
        wait_for(lambda: len(web.workers()) == 3, timeout=20, message="three workers")
        # Given requests counted by the workers
        for _ in range(6):
            assert web.request("GET", "/health")[0] == 200
        # When one worker dies (SIGKILL: no chance to tidy up)
        victim = web.workers()[0]
        os.kill(victim, signal.SIGKILL)
        # Then another takes its place
        wait_for(lambda: len(web.workers()) == 3 and victim not in web.workers(),
                 timeout=20, message="the worker to be replaced")
        wait_for(web.answers, timeout=20, message="the web process to answer")
        # And /metrics, from any worker, still counts what the dead one answered
        for _ in range(4):
            status, _, text = web.request("GET", "/metrics")
            assert status == 200
            total = sum(float(line.split()[-1]) for line in text.decode().splitlines()
                        if line.startswith('flask_http_request_total{method="GET",status="200"}'))
            assert total >= 7


def test_the_access_log_is_off_by_default_and_on_with_granians_variable(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    with web_process(environment, tmp_path) as quiet:
        assert quiet.request("GET", "/stats")[0] == 200
    assert "GET /stats" not in quiet.process.output()
    with web_process(environment, tmp_path, GRANIAN_LOG_ACCESS_ENABLED="true") as loud:
        assert loud.request("GET", "/stats")[0] == 200
        wait_for(lambda: '"GET /stats HTTP/1.1" 200' in loud.process.output(), timeout=10,
                 message="an access log line")


def test_many_concurrent_clients_are_held_by_a_bounded_number_of_threads(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    with web_process(environment, tmp_path, WEB_CONCURRENCY="1", WEB_THREADS="2") as web:
        (worker,) = web.workers()
        # Given 64 clients each in the middle of sending a request
        body = json.dumps(EXAMPLE_EVENT).encode()
        head = (b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode())
        clients = [socket.create_connection(("127.0.0.1", web.port), timeout=20)
                   for _ in range(64)]
        for client in clients:
            client.sendall(head + body[:10])
        time.sleep(0.5)
        # Then the worker holds them without a thread each
        threads = int(next(line.split()[1] for line in
                           Path(f"/proc/{worker}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
        assert threads <= 16, threads
        # And each is answered once its body is complete
        for client in clients:
            client.sendall(body[10:])
        for client in clients:
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
            client.close()
            assert reply.startswith(b"HTTP/1.1 202"), reply[:300]


def test_forwarded_headers_are_believed_only_from_allowed_peers(make_app) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str | None, str]] = []

    def whoami() -> str:
        seen.append((request.remote_addr, request.scheme))
        return "{}"

    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    app: Flask = make_app()
    app.add_url_rule("/whoami", view_func=whoami)
    # Given the router on loopback (FORWARDED_ALLOW_IPS' default)
    app.test_client().get("/whoami", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    # And a client elsewhere sending the same headers
    app.test_client().get("/whoami", headers=forwarded, environ_base={"REMOTE_ADDR": "198.51.100.7"})
    # Then only the router's are believed
    assert seen == [("203.0.113.9", "https"), ("198.51.100.7", "http")]


def test_a_dead_workers_live_gauges_are_forgotten_and_its_counters_kept(tmp_path: Path) -> None:
    # Given a process that counted and set a live gauge in the shared directory, then died
    script = (
        "from prometheus_client import Counter, Gauge\n"
        "Counter('answered', 'x').inc(3)\n"
        "Gauge('busy', 'x', multiprocess_mode='livesum').set(1)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], check=True, timeout=30,
                           env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert child.returncode == 0
    files = sorted(path.name for path in tmp_path.iterdir())
    assert any(name.startswith("gauge_livesum_") for name in files), files
    # When a scrape looks for dead processes
    dead = forget_dead_processes(str(tmp_path))
    # Then its live gauge is gone and its counter stays
    assert len(dead) == 1
    left = sorted(path.name for path in tmp_path.iterdir())
    assert not any(name.startswith("gauge_livesum_") for name in left)
    assert any(name.startswith("counter_") for name in left)


@pytest.mark.parametrize("value", ["10.0.0.0/8,127.0.0.1", "*", "::1"])
def test_forwarded_allow_ips_takes_addresses_networks_or_a_star(value: str) -> None:
    from eventflow.settings import Settings

    assert Settings.from_env({"FORWARDED_ALLOW_IPS": value}).forwarded_allow_ips == value


def test_forwarded_allow_ips_refuses_a_name() -> None:
    from eventflow.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        Settings.from_env({"FORWARDED_ALLOW_IPS": "router.example"})


def test_the_app_a_worker_builds_does_not_load_the_web_server(
    environment: dict[str, str],
) -> None:
    # Given the app module that the Procfile's worker line loads (wsgi:celery_app)
    code = "import sys, wsgi; print('granian' in sys.modules)"
    # When a process imports it, as `celery -A wsgi:celery_app worker` does
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=environment,
                          capture_output=True, text=True, timeout=60, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    # Then granian, about 6 MB of each worker process's memory, is not loaded
    assert done.stdout.splitlines()[-1] == "False", done.stdout + done.stderr
