"""Building the email of an event and handing it to an SMTP server."""

from __future__ import annotations

import binascii
import email.policy
import os
import smtplib
import ssl
import threading
import time
from collections.abc import Mapping
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate
from functools import lru_cache
from typing import Any, Protocol

from eventflow.rendering import Rendered
from eventflow.schemas import DEFAULT_SUBJECTS
from eventflow.settings import SmtpSettings

#: A connection unused for longer than this is closed rather than reused.
IDLE_SECONDS = 30.0


class _HeaderClasses(HeaderRegistry):
    """The email package's header registry, making each header class once.

    The stock registry makes a new class with ``type()`` for every header of every
    message: a measurable share of a worker's time went there (``bench/README.md``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        made = self._made.get(name.lower())
        if made is None:
            made = self._made[name.lower()] = super().__getitem__(name)
        return made


#: The SMTP policy (CRLF line ends, as sent), with the class-making registry.
POLICY = email.policy.SMTP.clone(header_factory=_HeaderClasses())


@lru_cache(maxsize=128)
def _header(name: str, value: str) -> BaseHeader:
    """A parsed header, made once for values that come back (sender, recipients, subjects,
    the date of this second). Header objects do not change once made, so messages share
    them; ``header_store_parse`` still refuses CR and LF in the value.

    A parsed address header keeps its whole parse tree, so only the last few values are
    kept: enough for the sender, the subjects and recipients that come back within
    moments (what a larger cache cost: bench/README.md, "Where issue 17 ends").
    """
    return POLICY.header_store_parse(name, value)[1]  # type: ignore[no-any-return]


def build_message(
    event_id: str, event: Mapping[str, Any], mail_from: str, domain: str,
    rendered: Rendered | None = None,
) -> EmailMessage:
    """The email for one event, the same bytes on every attempt but for its ``Date``.

    With ``rendered`` (its template's output), its subject and text, and its HTML as a
    second part of a ``multipart/alternative`` (text first, as RFC 2046 orders them:
    the last part is the preferred one). Without, the payload's subject and message.
    """
    payload = event["payload"]
    message = EmailMessage(policy=POLICY)  # the policy refuses CR/LF in header values
    message["From"] = _header("From", mail_from)
    message["To"] = _header("To", payload["to_email"])
    subject = rendered.subject if rendered is not None else (
        payload.get("subject") or DEFAULT_SUBJECTS[event["event_type"]])
    message["Subject"] = _header("Subject", subject)
    message["Date"] = _header("Date", formatdate(usegmt=True))
    message["Message-ID"] = f"<{event_id}@{domain}>"
    message["X-EventFlow-Event-Id"] = event_id
    if rendered is not None and rendered.html is not None:
        message["MIME-Version"] = _header("MIME-Version", "1.0")
        message["Content-Type"] = _header("Content-Type", ALTERNATIVE)
        message.set_payload(alternative_body(rendered.text, rendered.html))
    else:
        message.set_content(rendered.text if rendered is not None else payload["message"])
    return message


#: The boundary between the parts of a ``multipart/alternative`` message. Both parts are
#: quoted-printable, where "=" is always followed by two hex digits or a line end, so
#: "=_" never occurs in them: one boundary serves every message (and its header is parsed
#: once, see ``_header``).
BOUNDARY = "=_eventflow_alternative_"
ALTERNATIVE = f'multipart/alternative; boundary="{BOUNDARY}"'


def quoted_printable(text: str) -> str:
    """``text`` as UTF-8 quoted-printable lines (CRLF ends, at most 76 characters)."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode()
    if not data.endswith(b"\n"):
        data += b"\n"
    return binascii.b2a_qp(data, istext=True).decode("ascii").replace("\n", "\r\n")


def alternative_body(text: str, html: str) -> str:
    """The body of a ``multipart/alternative`` message: the text, then the HTML, each
    ending with a line end of its own (the one before a boundary belongs to it).

    Written here rather than by the email package's content manager, which parsed and
    folded each part's headers anew for every message: several times the cost of the
    rest of the message (``bench/templates.py``).
    """
    parts = [
        f"--{BOUNDARY}\r\nContent-Type: text/{subtype}; charset=\"utf-8\"\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{quoted_printable(body)}\r\n"
        for subtype, body in (("plain", text), ("html", html))
    ]
    return "".join(parts) + f"--{BOUNDARY}--\r\n"


class Sender(Protocol):
    """Hands one message to a mail server for one recipient; returns the server's reply."""

    def send(self, mail_from: str, recipient: str, message: EmailMessage) -> str: ...


def as_smtp_bytes(message: EmailMessage) -> bytes:
    """The message as sent: CRLF line ends."""
    if message.policy.linesep == "\r\n":
        return message.as_bytes()
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


class _Connection(threading.local):
    conn: smtplib.SMTP | None = None
    pid = 0
    last_used = 0.0


class SmtpSender:
    """Sends over SMTP, reusing one connection per process (and thread) while it is fresh."""

    def __init__(self, settings: SmtpSettings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self._local = _Connection()

    @property
    def _conn(self) -> smtplib.SMTP | None:
        return self._local.conn

    @_conn.setter
    def _conn(self, conn: smtplib.SMTP | None) -> None:
        self._local.conn = conn

    def send(self, mail_from: str, recipient: str, message: EmailMessage) -> str:
        """One SMTP transaction: MAIL, RCPT to ``recipient`` only, DATA."""
        conn, reused = self._connection()
        try:
            try:
                code, reply = conn.mail(mail_from)
            except (smtplib.SMTPServerDisconnected, OSError):
                if not reused:
                    raise
                # The server dropped an idle connection; nothing was sent on it yet.
                self._conn = None
                conn, _ = self._connection()
                code, reply = conn.mail(mail_from)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, mail_from)
            code, reply = conn.rcpt(recipient)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
            code, reply = conn.data(as_smtp_bytes(message))
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        except smtplib.SMTPResponseException as exc:
            # The server answered: the connection is still good, but the transaction
            # must be reset before the next one.
            self._reset(exc.smtp_code)
            raise
        except BaseException:
            self.close()
            raise
        self._local.last_used = time.monotonic()
        return f"{code} {reply.decode(errors='replace')}"

    def close(self) -> None:
        """Drop the connection, politely if it still answers."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()

    def _reset(self, code: int) -> None:
        if code == 421 or self._conn is None:
            # 421: the server is closing the connection.
            self.close()
            return
        try:
            self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _connection(self) -> tuple[smtplib.SMTP, bool]:
        stale = time.monotonic() - self._local.last_used > IDLE_SECONDS
        if self._conn is not None and (self._local.pid != os.getpid() or stale):
            if self._local.pid != os.getpid():
                self._conn = None  # inherited across fork: the parent's socket, not ours
            else:
                self.close()
        if self._conn is not None:
            return self._conn, True
        self._conn = self._connect()
        self._local.pid = os.getpid()
        return self._conn, False

    def _connect(self) -> smtplib.SMTP:
        cfg = self.settings
        context = ssl.create_default_context()
        if not cfg.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        conn: smtplib.SMTP
        if cfg.implicit_tls:
            conn = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=self.timeout, context=context)
        else:
            conn = smtplib.SMTP(cfg.host, cfg.port, timeout=self.timeout)
        try:
            code, reply = conn.ehlo()
            if code != 250:
                code, reply = conn.helo()
                if code != 250:
                    raise smtplib.SMTPHeloError(code, reply)
            if cfg.starttls:
                conn.starttls(context=context)
                conn.ehlo()
            if cfg.username:
                conn.login(cfg.username, cfg.password or "")
        except BaseException:
            conn.close()
            raise
        return conn
