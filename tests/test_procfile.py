"""The README's example against the Procfile's own `web` and `worker` processes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import EXAMPLE_EVENT, PRODUCER_KEY
from tests.processes import Process, procfile_command, worker_processes
from tests.smtp_server import ScriptedSMTPServer, free_port
from tests.waiting import wait_for


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read().decode()
            return response.status, raw if url.endswith("/metrics") else json.loads(raw)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "null")


def test_the_readme_example_is_delivered_by_the_procfile_processes(
    environment: dict[str, str], smtp_server: ScriptedSMTPServer, tmp_path: Path
) -> None:
    # Given the Procfile's web process (two granian workers) and worker process
    port = free_port()
    env = {**environment, "PORT": str(port), "WEB_CONCURRENCY": "2",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    (tmp_path / "metrics").mkdir()
    web = Process(procfile_command("web"), env, tmp_path / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        web.wait_for_output("Started worker-2", timeout=30)
        wait_for(lambda: _answers(f"{base}/health"), timeout=30, message="the web process")
        with worker_processes(env, tmp_path):
            # When the README's example is posted over HTTP
            status, accepted = http("POST", f"{base}/api/v1/events", EXAMPLE_EVENT, PRODUCER_KEY)
            assert status == 202
            # Then it is delivered, once
            def delivered() -> bool:
                _, event = http("GET", f"{base}/api/v1/events/{accepted['id']}", key=PRODUCER_KEY)
                return bool(event["status"] == "delivered")

            wait_for(delivered, timeout=30, message="delivery")
        assert len(smtp_server.messages_for(accepted["id"])) == 1
        # And /metrics, whichever web worker answers, shows the pipeline and HTTP figures
        for _ in range(4):
            _, metrics = http("GET", f"{base}/metrics")
            assert "eventflow_emails_sent_total 1.0" in metrics
            assert 'flask_http_request_total{method="POST",status="202"} 1.0' in metrics
    finally:
        web.stop()


def _answers(url: str) -> bool:
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False
