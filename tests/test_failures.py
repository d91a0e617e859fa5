"""One function decides what is worth retrying."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from eventflow.failures import classify, is_transient


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
        smtplib.SMTPConnectError(421, b"Too busy"),
        smtplib.SMTPDataError(451, b"4.3.0 Try again later"),
        smtplib.SMTPSenderRefused(450, b"Mailbox busy", "a@b.c"),
        smtplib.SMTPRecipientsRefused({"a@b.c": (452, b"Too many recipients")}),
    ],
)
def test_network_errors_and_4xx_replies_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"5.1.1 No such user")}),
        smtplib.SMTPSenderRefused(553, b"Sender not allowed", "a@b.c"),
        smtplib.SMTPDataError(554, b"Transaction failed"),
        smtplib.SMTPAuthenticationError(535, b"Bad credentials"),
        ssl.SSLCertVerificationError("certificate verify failed"),
        ValueError("a bug"),
    ],
)
def test_5xx_replies_and_faults_a_retry_cannot_fix_are_permanent(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_reply_keeps_its_code_text_and_stage() -> None:
    failure = classify(smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"5.1.1 No such user")}))
    assert failure.error == "550 5.1.1 No such user"
    assert failure.details == {"smtp_code": 550, "smtp_reply": "550 5.1.1 No such user",
                               "smtp_stage": "RCPT"}
