"""The development SMTP inbox: accepts every message and keeps it as an ``.eml`` file.

Run as ``python -m eventflow.devstack.inbox [--port 8025] [--outbox var/outbox]``. Each
message is written exactly as received (atomically: a reader never sees half a file) and
summed up on one line: envelope recipients, subject and ``X-EventFlow-Event-Id``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

#: Where messages go when no ``--outbox`` is given.
DEFAULT_OUTBOX = Path("var/outbox")
DEFAULT_PORT = 8025


class OutboxHandler:
    """aiosmtpd handler that writes each message under ``outbox`` and prints a summary."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._sequence = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Keep the message and answer 250, the way a real server accepts it."""
        content = envelope.original_content or b""
        path = self.store(content)
        print(summarize(content, envelope.rcpt_tos, path), flush=True)
        return "250 Message accepted for delivery"

    def store(self, content: bytes) -> Path:
        """Write ``content`` to a new ``.eml`` file and return its path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{os.getpid()}-{next(self._sequence):06d}.eml"
        final = self.outbox / name
        partial = self.outbox / f".{name}.part"
        partial.write_bytes(content)
        partial.replace(final)
        return final


def summarize(content: bytes, recipients: list[str], path: Path) -> str:
    """One line on a received message: who it is to, its subject and its event id."""
    headers = BytesHeaderParser(policy=default_policy).parsebytes(content)
    subject = str(headers.get("Subject", ""))
    event_id = str(headers.get("X-EventFlow-Event-Id", "-"))
    return (
        f"to={','.join(recipients)} subject={subject!r} X-EventFlow-Event-Id={event_id} file={path}"
    )


def serve(host: str, port: int, outbox: Path) -> Controller:
    """Start the inbox on ``host:port`` in a background thread and return its controller."""
    controller = Controller(OutboxHandler(outbox), hostname=host, port=port)
    controller.start()
    return controller


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m eventflow.devstack.inbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("EVENTFLOW_DEV_SMTP_PORT", DEFAULT_PORT))
    )
    parser.add_argument("--outbox", type=Path, default=DEFAULT_OUTBOX)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    controller = serve(args.host, args.port, args.outbox)
    print(f"SMTP inbox on {args.host}:{args.port}, messages kept in {args.outbox}/", flush=True)
    stop.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
