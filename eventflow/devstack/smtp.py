"""One SMTP server (aiosmtpd) for the development inbox, the tests and the benchmark.

It accepts every message unless told otherwise, keeps what it received, and can be
scripted: a reply for the next transactions (``"451 4.3.0 Try again later"``) at RCPT or
DATA, a stall before a reply, STARTTLS with AUTH for one user, or an outbox directory where
each message is kept as an ``.eml`` file. ``make run`` runs it as its inbox::

    python -m eventflow.devstack.smtp [--port 8025] [--outbox var/outbox]

and the benchmark in a process of its own with ``--control-port`` (see ``bench/sink.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from functools import cached_property
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

#: Where the inbox keeps messages when no ``--outbox`` is given, and its port.
DEFAULT_OUTBOX = Path("var/outbox")
DEFAULT_PORT = 8025
#: The name the server gives itself (aiosmtpd would otherwise look up the FQDN).
SERVER_NAME = "eventflow-smtp"

_EVENT_ID_RE = re.compile(rb"^X-EventFlow-Event-Id:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    """A message the server accepted (answered 250 at the end of DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    arrived: float = field(default_factory=time.time)
    login: str | None = None
    tls: bool = False

    @cached_property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)  # type: ignore[return-value]

    @property
    def event_id(self) -> str:
        match = _EVENT_ID_RE.search(self.raw[:8192])
        return match.group(1).decode("ascii", "replace") if match else ""


@dataclass
class Attempt:
    """One transaction as the server saw it, with the reply it gave."""

    stage: str
    reply: str
    rcpt_tos: list[str]
    message_id: str | None = None


class SMTPServer:
    """An aiosmtpd server on ``host`` (loopback by default) whose answers can be scripted."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        outbox: Path | None = None,
        tls_context: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.outbox = outbox
        self.tls_context = tls_context
        self.user, self.password = login or ("", "")
        self.received: list[Received] = []
        self.attempts: list[Attempt] = []
        #: Each RCPT address and each DATA's recipients, as they arrive.
        self.rcpt_seen: list[str] = []
        self.data_seen: list[str] = []
        #: Every AUTH tried: (login, password).
        self.logins: list[tuple[str, str]] = []
        #: Seconds to hold the reply to the next DATA *after* taking the message.
        self.reply_delay = 0.0
        self._replies: deque[tuple[str, str]] = deque()
        self._always: tuple[str, str] | None = None
        self._data_stall = 0.0
        self._rcpt_stalls: deque[float] = deque()
        self._rcpt_every = 0.0
        self._lock = threading.Lock()
        self._sequence = itertools.count(1)
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    # -- scripting ---------------------------------------------------------------------

    def reply_next(self, *replies: str, stage: str = "DATA") -> None:
        """Answer the next transactions with ``replies``, in order, then accept again."""
        with self._lock:
            self._replies.extend((stage, reply) for reply in replies)

    def reply_always(self, reply: str | None, stage: str = "DATA") -> None:
        """Answer every transaction with ``reply`` (``None``: accept again)."""
        with self._lock:
            self._always = (stage, reply) if reply else None

    def stall(self, seconds: float) -> None:
        """Wait this long before answering DATA (0: answer at once)."""
        self._data_stall = seconds

    def stall_next_rcpt(self, *seconds: float) -> None:
        """Hold the next RCPT commands this long each (one value per command): before
        anything is sent, so a worker killed then has sent nothing."""
        self._rcpt_stalls.extend(seconds)

    def stall_every_rcpt(self, seconds: float) -> None:
        """Hold every RCPT this long (0: stop stalling)."""
        self._rcpt_stalls.clear()
        self._rcpt_every = seconds

    # -- reading -----------------------------------------------------------------------

    def messages_for(self, event_id: str) -> list[Received]:
        return [m for m in self.received if m.event_id == event_id]

    def wait_for_rcpt(self, address: str, count: int = 1, timeout: float = 20) -> None:
        """Wait until RCPT ``address`` has arrived ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.rcpt_seen.count(address) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for RCPT #{count} for {address}")
            time.sleep(0.02)

    def stats(self) -> dict[str, Any]:
        """How many messages were accepted, and the first and last arrival (epoch s)."""
        received = list(self.received)
        return {"count": len(received),
                "first": received[0].arrived if received else None,
                "last": received[-1].arrived if received else None}

    def arrivals(self) -> dict[str, float]:
        """When each accepted message arrived, by its event id."""
        return {m.event_id: m.arrived for m in list(self.received)}

    def reset(self) -> None:
        """Forget everything received so far."""
        self.received.clear()
        self.attempts.clear()

    # -- running -----------------------------------------------------------------------

    def start(self) -> SMTPServer:
        options: dict[str, Any] = {}
        if self.tls_context is not None:
            options = {"tls_context": self.tls_context, "require_starttls": True,
                       "authenticator": self._authenticate, "auth_require_tls": True,
                       "auth_required": False}
        self._controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, ready_timeout=10,
            server_hostname=SERVER_NAME, **options,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _next_reply(self, stage: str) -> str | None:
        with self._lock:
            if self._replies and self._replies[0][0] == stage:
                return self._replies.popleft()[1]
            if self._always and self._always[0] == stage:
                return self._always[1]
        return None

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((login, password))
            return AuthResult(success=(login, password) == (self.user, self.password),
                              auth_data=auth_data)
        return AuthResult(success=False)

    def _keep(self, content: bytes, recipients: list[str]) -> None:
        """Write ``content`` to a new ``.eml`` file in the outbox (atomically: a reader
        never sees half a file) and print one line on it."""
        assert self.outbox is not None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{os.getpid()}-{next(self._sequence):06d}.eml"
        partial = self.outbox / f".{name}.part"
        partial.write_bytes(content)
        partial.replace(self.outbox / name)
        print(summarize(content, recipients, self.outbox / name), flush=True)
        for page in html_parts(content, self.outbox / name):
            print(f"  html part: {page}", flush=True)


class _Handler:
    def __init__(self, server: SMTPServer) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        owner = self.server
        owner.rcpt_seen.append(address)
        delay = owner._rcpt_stalls.popleft() if owner._rcpt_stalls else owner._rcpt_every
        if delay:
            await asyncio.sleep(delay)
        reply = owner._next_reply("RCPT")
        if reply:
            owner.attempts.append(Attempt("RCPT", reply, [address]))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        owner = self.server
        owner.data_seen.extend(envelope.rcpt_tos)
        if owner._data_stall:
            await asyncio.sleep(owner._data_stall)
        raw = envelope.original_content or envelope.content or b""
        reply = owner._next_reply("DATA") or "250 2.0.0 Message accepted"
        login = session.auth_data.login.decode() if isinstance(
            session.auth_data, LoginPassword) else None
        received = Received(envelope.mail_from, list(envelope.rcpt_tos), raw, login=login,
                            tls=session.ssl is not None)
        owner.attempts.append(Attempt("DATA", reply, list(envelope.rcpt_tos),
                                      _header(raw, b"Message-ID")))
        if reply.startswith("250"):
            owner.received.append(received)
            if owner.outbox is not None:
                owner._keep(raw, list(envelope.rcpt_tos))
        delay, owner.reply_delay = owner.reply_delay, 0.0
        if delay:
            # The message is taken (as an MTA that has queued it), the reply is late.
            await asyncio.sleep(delay)
        return reply


def _header(raw: bytes, name: bytes) -> str | None:
    match = re.search(rb"^" + name + rb":\s*(\S+)", raw[:8192], re.IGNORECASE | re.MULTILINE)
    return match.group(1).decode("ascii", "replace") if match else None


def html_parts(content: bytes, eml: Path) -> list[Path]:
    """Write each HTML part of the message beside its ``.eml`` file (``<name>.html``,
    then ``<name>-2.html``...), for a developer to open in a browser; returns them."""
    message = message_from_bytes(content, policy=policy.default)
    written = []
    for number, part in enumerate(
            (p for p in message.walk() if p.get_content_type() == "text/html"), 1):
        try:
            html = part.get_content()
        except (LookupError, ValueError):  # an unknown charset: the .eml still has it
            continue
        suffix = "" if number == 1 else f"-{number}"
        target = eml.with_name(f"{eml.stem}{suffix}.html")
        partial = eml.with_name(f".{target.name}.part")
        partial.write_text(html, encoding="utf-8")
        partial.replace(target)
        written.append(target)
    return written


def summarize(content: bytes, recipients: list[str], path: Path) -> str:
    """One line on a received message: who it is to, its subject and its event id."""
    headers = message_from_bytes(content.split(b"\r\n\r\n", 1)[0], policy=policy.default)
    subject = str(headers.get("Subject", ""))
    event_id = str(headers.get("X-EventFlow-Event-Id", "-"))
    return (
        f"to={','.join(recipients)} subject={subject!r} X-EventFlow-Event-Id={event_id} file={path}"
    )


def serve_control(server: SMTPServer, host: str, port: int) -> None:
    """Answer one-line commands on ``host:port`` (``reset``, ``stats``, ``arrivals``) with
    one line of JSON, until the process ends: how the benchmark reads a server that runs
    in a process of its own, so that it never shares a GIL with what it measures."""
    import json
    import socketserver

    class Control(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                command = line.decode().strip()
                if command == "reset":
                    server.reset()
                    reply: Any = {"ok": True}
                elif command in ("stats", "arrivals"):
                    reply = getattr(server, command)()
                else:
                    reply = {"error": f"unknown command {command!r}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    control = socketserver.ThreadingTCPServer((host, port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m eventflow.devstack.smtp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("EVENTFLOW_DEV_SMTP_PORT", DEFAULT_PORT))
    )
    parser.add_argument("--outbox", type=Path, help="keep each message there as an .eml file")
    parser.add_argument("--control-port", type=int, help="answer reset/stats/arrivals there")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if args.outbox is not None:
        args.outbox.mkdir(parents=True, exist_ok=True)
    server = SMTPServer(args.port, args.host, outbox=args.outbox).start()
    if args.control_port:
        serve_control(server, args.host, args.control_port)
    kept = f", messages kept in {args.outbox}/" if args.outbox else ""
    print(f"SMTP server on {args.host}:{args.port}{kept}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
