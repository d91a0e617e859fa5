"""A webhook receiver for development and tests: checks each delivery's Standard Webhooks
signature, prints it, and keeps it. Tests script it to answer with an error first.

``python -m eventflow.devstack.webhooks --port 8026`` (the secret from
``EVENTFLOW_DEV_WEBHOOK_SECRET``) is part of ``make run``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

#: The port of ``make run``'s receiver unless ``EVENTFLOW_DEV_WEBHOOK_PORT`` says otherwise.
DEFAULT_PORT = 8026


@dataclass
class Delivery:
    """A POST that arrived, its signature checked (``verified``) and its body parsed."""

    headers: dict[str, str]
    body: dict[str, Any] | None
    verified: bool
    answered: int

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


class WebhookReceiver:
    """An HTTP server on loopback that takes webhooks signed with ``secret``."""

    def __init__(self, secret: str, port: int = 0, host: str = "127.0.0.1",
                 echo: bool = False) -> None:
        self.host = host
        self.verifier = Webhook(secret)
        self.echo = echo
        self.deliveries: list[Delivery] = []
        #: Seconds to wait before answering (a hanging receiver, in tests).
        self.delay = 0.0
        #: How many POSTs arrived (counted before any delay).
        self.arrivals = 0
        self._answers: deque[int] = deque()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver._receive(self, self.rfile.read(length))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_address[1]}/hooks"

    def answer_next(self, *statuses: int) -> None:
        """Answer the next POSTs with these HTTP statuses (then 204 again)."""
        with self._lock:
            self._answers.extend(statuses)

    def verified(self) -> list[Delivery]:
        """The deliveries whose signature checked out and that were answered 2xx."""
        with self._lock:
            return [d for d in self.deliveries if d.verified and 200 <= d.answered < 300]

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _receive(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        with self._lock:
            self.arrivals += 1
        if self.delay:
            time.sleep(self.delay)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        try:
            body = self.verifier.verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            body, verified = None, False
        with self._lock:
            status = self._answers.popleft() if self._answers else (204 if verified else 401)
            self.deliveries.append(Delivery(headers, body, verified, status))
        if self.echo:
            shown = json.dumps(body) if verified else f"signature NOT valid: {raw[:200]!r}"
            print(f"webhook {headers.get('webhook-id')} -> {status}: {shown}", flush=True)
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM, printing each webhook."""
    parser = argparse.ArgumentParser(prog="python -m eventflow.devstack.webhooks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(
        os.environ.get("EVENTFLOW_DEV_WEBHOOK_PORT", DEFAULT_PORT)))
    args = parser.parse_args(argv)
    secret = os.environ.get("EVENTFLOW_DEV_WEBHOOK_SECRET", "")
    if not secret:
        print("EVENTFLOW_DEV_WEBHOOK_SECRET is not set", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    receiver = WebhookReceiver(secret, args.port, args.host, echo=True).start()
    print(f"webhook receiver on {receiver.url}, signatures checked", flush=True)
    stop.wait()
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
