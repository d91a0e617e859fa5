"""One place that decides whether a failed send is worth retrying."""

from __future__ import annotations

import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Failure:
    """A failed send, classified.

    ``kind`` is ``transient`` (a later attempt may succeed: the server is busy or out of
    reach) or ``permanent`` (the same message will be refused again).
    """

    kind: str
    error: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def transient(self) -> bool:
        return self.kind == "transient"


class DeliveryFailed(Exception):
    """Raised by the delivery task when an event goes to the dead-letter queue."""

    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(error_type, error)  # both in args, so it pickles
        self.error_type = error_type
        self.error = error

    def __str__(self) -> str:
        return f"{self.error_type}: {self.error}"


class RetryLater(Exception):
    """Raised by the delivery step for a transient failure with retries left.

    The failed attempt, the ``retrying`` status and the wait are already recorded when it
    is raised; the task retries on it (``autoretry_for``) after ``countdown`` seconds.
    """

    def __init__(self, error: str, countdown: float) -> None:
        super().__init__(error, countdown)  # both in args, so it pickles
        self.error = error
        self.countdown = countdown

    def __str__(self) -> str:
        return f"retry in {self.countdown:.3g}s: {self.error}"


def is_transient(exc: BaseException) -> bool:
    """``True`` if retrying the send that raised ``exc`` may succeed."""
    return classify(exc).transient


def classify(exc: BaseException) -> Failure:
    """Classify an exception raised while sending over SMTP."""
    if isinstance(exc, DeliveryFailed):
        # Decided before anything was sent (a template that does not render): permanent.
        return Failure("permanent", exc.error, {"error_type": exc.error_type})
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # One recipient per message, so one reply.
        code, text = next(iter(exc.recipients.values()), (550, b"recipient refused"))
        return _reply_failure(code, text, "RCPT")
    if isinstance(exc, smtplib.SMTPResponseException):
        stage = {
            smtplib.SMTPSenderRefused: "MAIL",
            smtplib.SMTPDataError: "DATA",
            smtplib.SMTPHeloError: "HELO",
            smtplib.SMTPAuthenticationError: "AUTH",
        }.get(type(exc), "")
        return _reply_failure(exc.smtp_code, exc.smtp_error, stage)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return Failure("permanent", f"SMTP server does not support a required extension: {exc}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Failure("transient", f"connection lost: {exc or 'server disconnected'}",
                       {"network_error": "disconnected"})
    if isinstance(exc, ssl.SSLCertVerificationError):
        # A certificate that does not verify will not verify on the next attempt either.
        reason = getattr(exc, "verify_message", None) or exc
        return Failure("permanent", f"TLS certificate not trusted: {reason}",
                       {"network_error": "tls_verification"})
    if isinstance(exc, ssl.SSLError):
        return Failure("transient", f"TLS error: {exc}", {"network_error": "tls"})
    if isinstance(exc, socket.gaierror):
        return Failure("transient", f"cannot resolve the SMTP host: {exc}",
                       {"network_error": "dns"})
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return Failure("transient", "timed out talking to the SMTP server",
                       {"network_error": "timeout"})
    if isinstance(exc, ConnectionRefusedError):
        return Failure("transient", "connection refused by the SMTP server",
                       {"network_error": "refused"})
    if isinstance(exc, OSError):
        return Failure("transient", f"{type(exc).__name__}: {exc}",
                       {"network_error": type(exc).__name__})
    return Failure("permanent", f"{type(exc).__name__}: {exc}", {"internal": True})


def _reply_failure(code: int, text: bytes | str, stage: str) -> Failure:
    message = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    reply = f"{code} {message}".strip()
    kind = "permanent" if 500 <= code < 600 else "transient"
    details: dict[str, Any] = {"smtp_code": code, "smtp_reply": reply}
    if stage:
        details["smtp_stage"] = stage
    return Failure(kind, reply, details)
