"""A real SMTP server on loopback (aiosmtpd) that tests can script.

It records every message it accepts and every transaction it refuses, and answers from a
script: a reply for the next transactions (``"451 4.3.0 Try again later"``), at RCPT or
DATA, a stall, or its absence (``stop()``: connections are refused).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


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
    message: EmailMessage
    raw: bytes

    @property
    def event_id(self) -> str:
        return str(self.message["X-EventFlow-Event-Id"])


@dataclass
class Attempt:
    """One transaction as the server saw it, with the reply it gave."""

    stage: str
    reply: str
    rcpt_tos: list[str]
    message_id: str | None = None


@dataclass
class _Script:
    replies: deque[tuple[str, str]] = field(default_factory=deque)
    always: tuple[str, str] | None = None
    stall: float = 0.0


class ScriptedSMTPServer:
    """An aiosmtpd server on 127.0.0.1 whose answers the test decides."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.attempts: list[Attempt] = []
        self._script = _Script()
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    # -- scripting ---------------------------------------------------------------------

    def reply_next(self, *replies: str, stage: str = "DATA") -> None:
        """Answer the next transactions with ``replies``, in order, then accept again."""
        with self._lock:
            self._script.replies.extend((stage, reply) for reply in replies)

    def reply_always(self, reply: str | None, stage: str = "DATA") -> None:
        """Answer every transaction with ``reply`` (``None``: accept again)."""
        with self._lock:
            self._script.always = (stage, reply) if reply else None

    def stall(self, seconds: float) -> None:
        """Wait this long before answering DATA (0: answer at once)."""
        self._script.stall = seconds

    def messages_for(self, event_id: str) -> list[Received]:
        return [m for m in self.received if m.event_id == event_id]

    # -- running -----------------------------------------------------------------------

    def start(self) -> ScriptedSMTPServer:
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _next_reply(self, stage: str) -> str | None:
        with self._lock:
            script = self._script
            if script.replies and script.replies[0][0] == stage:
                return script.replies.popleft()[1]
            if script.always and script.always[0] == stage:
                return script.always[1]
        return None


class _Handler:
    def __init__(self, server: ScriptedSMTPServer) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.server._next_reply("RCPT")
        if reply:
            self.server.attempts.append(Attempt("RCPT", reply, [address]))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.server._script.stall:
            await asyncio.sleep(self.server._script.stall)
        raw = envelope.original_content or envelope.content
        message = message_from_bytes(raw, policy=policy.default)
        reply = self.server._next_reply("DATA") or "250 2.0.0 Message accepted"
        self.server.attempts.append(
            Attempt("DATA", reply, list(envelope.rcpt_tos), str(message["Message-ID"]))
        )
        if reply.startswith("250"):
            self.server.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), message, raw)  # type: ignore[arg-type]
            )
        return reply

