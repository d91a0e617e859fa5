"""One place that decides whether a failed send is worth retrying."""

from __future__ import annotations

import re
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


#: Enhanced status codes (RFC 3463) that refuse the mailbox itself: the address goes on the
#: suppression list. X.1.x and X.2.x are about the address and the mailbox; of these,
#: 5.1.7 and 5.1.8 concern the sender, 5.2.2 (mailbox full) passes, 5.2.3 and 5.2.4 are
#: about the message or a list. X.6.x (content) and X.7.x (policy, such as 5.7.1) are
#: about the message or the sender and never suppress the recipient.
SUPPRESSING_STATUSES = frozenset({"5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10",
                                  "5.2.0", "5.2.1"})
_ENHANCED_STATUS = re.compile(r"^\s*(?:\d{3}[\s-]+)?([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_status(reply: str) -> str | None:
    """The enhanced status code (RFC 3463) at the start of an SMTP reply's text, if any:
    ``550 5.1.1 User unknown`` gives ``5.1.1``."""
    match = _ENHANCED_STATUS.match(reply)
    return match.group(1) if match else None


def suppressing_status(failure: Failure) -> str | None:
    """The enhanced status code when ``failure`` is a permanent refusal of the
    recipient's mailbox (the address should not be mailed again), else ``None``."""
    if failure.transient or "smtp_code" not in failure.details:
        return None
    if failure.details.get("smtp_stage") in ("MAIL", "HELO", "AUTH"):
        return None
    code = enhanced_status(str(failure.details.get("smtp_reply", "")))
    return code if code in SUPPRESSING_STATUSES else None


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
