"""What the fault tests share: an SMTP server that can stall before anything is sent, a
real web process, and short ways to read what became of an event.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

from tests.conftest import PRODUCER_KEY, auth
from tests.processes import Process, procfile_command
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

FINAL = ("delivered", "rate_limited", "dead_lettered")

#: Settings for processes in fault tests: a short visibility timeout so that work lost
#: with a killed worker comes back within seconds (the SMTP timeout must stay below a
#: quarter of it, the longest retry wait below it).
FAST_RECOVERY = {
    "EVENTFLOW_VISIBILITY_TIMEOUT": "4",
    "EVENTFLOW_SMTP_TIMEOUT": "0.9",
    "EVENTFLOW_RETRY_BACKOFF": "0.05",
    "EVENTFLOW_RETRY_BACKOFF_MAX": "0.2",
}


#: The scripted server stalls at RCPT too (before any message is sent): a worker killed
#: during that stall has sent nothing, so a correct pipeline ends with exactly one message.
StallingSMTPServer = ScriptedSMTPServer


def event_to(address: str) -> dict[str, Any]:
    """An event for ``address``, and for a user of its own (no rate limit in the way):
    an address per event tells their SMTP traffic apart."""
    return {"user_id": address, "event_type": "USER_NOTIFICATION",
            "payload": {"to_email": address, "message": f"Hello {address}"}}


def record(client: redis.Redis, event_id: str) -> dict[str, str]:
    return client.hgetall(f"ef:ev:{event_id}")  # type: ignore[return-value]


def final_record(client: redis.Redis, event_id: str, timeout: float = 30) -> dict[str, str]:
    """The event's record once its status is final."""

    def done() -> dict[str, str] | None:
        found = record(client, event_id)
        return found if found.get("status") in FINAL else None

    return wait_for(done, timeout, interval=0.1,  # type: ignore[no-any-return]
                    message=f"event {event_id} to reach a final status")


def steps(client: redis.Redis, event_id: str) -> list[str]:
    import json

    return [json.loads(item)["step"] for item in client.lrange(f"ef:hist:{event_id}", 0, -1)]


class WebProcess:
    """The Procfile's ``web`` process (granian), on loopback and a port of the test's."""

    def __init__(self, env: Mapping[str, str], tmp_path: Path, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        command = procfile_command("web").replace("0.0.0.0", "127.0.0.1")
        self.process = Process(command, {**env, "PORT": str(port), "WEB_CONCURRENCY": "2"},
                               tmp_path / f"web-{port}.log")
        self.session = requests.Session()

    def wait_ready(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.popen.poll() is not None:
                raise AssertionError(f"web exited:\n{self.process.output()[-3000:]}")
            try:
                requests.get(self.base + "/health", timeout=2)
            except (requests.ConnectionError, requests.Timeout):
                # (a loaded machine: the app is still being imported by a web worker)
                return False
            return True

        wait_for(answers, timeout, interval=0.1, message="the web process to answer")

    def post(self, path: str, body: Any, key: str = PRODUCER_KEY, timeout: float = 10,
             **headers: str) -> requests.Response:
        return requests.post(self.base + path, json=body, timeout=timeout,
                             headers={**auth(key), **headers})

    def get(self, path: str, timeout: float = 10) -> requests.Response:
        return requests.get(self.base + path, timeout=timeout, headers=auth())

    def stop(self) -> None:
        self.process.stop()


@contextmanager
def web_process(env: Mapping[str, str], tmp_path: Path, port: int) -> Iterator[WebProcess]:
    web = WebProcess(env, tmp_path, port)
    try:
        web.wait_ready()
        yield web
    finally:
        web.stop()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
