"""The tests' SMTP server: the project's one (:mod:`eventflow.devstack.smtp`), a real
aiosmtpd server on loopback that a test scripts to answer 421/451/550, to stall, or to be
gone (``stop()``: connections are refused)."""

from eventflow.devstack.smtp import Attempt, Received, free_port
from eventflow.devstack.smtp import SMTPServer as ScriptedSMTPServer

__all__ = ["Attempt", "Received", "ScriptedSMTPServer", "free_port"]
