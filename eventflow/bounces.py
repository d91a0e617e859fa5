"""Reading a bounce that arrived after the SMTP server took the message: a delivery status
notification (RFC 3464), posted to ``POST /api/v1/bounces``.

The per-recipient fields (``Final-Recipient``, ``Action``, ``Status``,
``Diagnostic-Code``) are read from the ``message/delivery-status`` part with the standard
library's email parser, which gives them exactly as the reporting server wrote them.
``flufl.bounce`` (GNU Mailman's bounce detectors) gives only the addresses that bounced,
with no status code or diagnostic, so it is used for what RFC 3464 parsing cannot read: a
bounce without a delivery-status part (qmail, old Exim and other formats it knows), where
it tells the recipient and whether the failure is permanent.

The event is named by the address the bounce came back to, VERP style
(``local+<event id>@domain``, from ``EVENTFLOW_BOUNCE_ADDRESS``), in the headers an MTA
writes on delivery (``Delivered-To``, ``X-Original-To``, ``Envelope-To``) or ``To``; failing
that, by the ``X-EventFlow-Event-Id`` of the returned message's headers.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from flufl.bounce import all_failures

from eventflow.failures import enhanced_status

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_VERP = re.compile(r"[^\s<>@,]+\+(" + _UUID + r")@[^\s<>@,]+", re.IGNORECASE)
_EVENT_ID = re.compile(_UUID, re.IGNORECASE)
#: Headers of the bounce, in order, that may carry the address it was delivered to.
_RETURN_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")


class NotABounce(ValueError):
    """The body is not a delivery status notification this parser can read."""


@dataclass(frozen=True)
class Bounce:
    """What a bounce says: for which event, which recipient, and how it failed."""

    event_id: str | None
    recipient: str
    action: str
    status: str
    diagnostic: str

    @property
    def permanent(self) -> bool:
        """Whether the failure is for good (``5.x.x`` status, ``Action: failed``)."""
        if self.status:
            return self.status.startswith("5.")
        return self.action == "failed"

    def details(self) -> dict[str, str]:
        """The history entry's fields."""
        return {"recipient": self.recipient, "action": self.action, "status": self.status,
                "diagnostic": self.diagnostic,
                "kind": "permanent" if self.permanent else "transient"}


def parse_bounce(raw: bytes, bounce_address: str | None = None) -> Bounce:
    """The bounce in ``raw`` (a whole message: ``multipart/report`` or a message with
    one inside), or :class:`NotABounce`."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    event_id = _event_id(message, bounce_address)
    report = _delivery_status(message)
    if report is not None:
        return _from_report(report, event_id)
    return _from_detectors(message, event_id)


def _from_report(report: Message, event_id: str | None) -> Bounce:
    # A delivery-status part is groups of fields: the message's, then one per recipient.
    groups = [part for part in report.get_payload() if isinstance(part, Message)] \
        if report.is_multipart() else []
    recipients = [g for g in groups if g.get("Final-Recipient") or g.get("Original-Recipient")]
    if not recipients:
        raise NotABounce("The delivery-status part names no recipient (Final-Recipient).")
    # One recipient per message (EventFlow sends to one address): the first failed one.
    group = next((g for g in recipients if str(g.get("Action", "")).lower() == "failed"),
                 recipients[0])
    recipient = _address(str(group.get("Final-Recipient") or group.get("Original-Recipient")))
    diagnostic = " ".join(str(group.get("Diagnostic-Code", "")).split())
    diagnostic = diagnostic.split(";", 1)[1].strip() if ";" in diagnostic else diagnostic
    status = str(group.get("Status", "")).strip().split(" ")[0]
    if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        status = enhanced_status(diagnostic) or ""
    return Bounce(event_id, recipient, str(group.get("Action", "")).strip().lower(),
                  status, diagnostic[:1000])


def _from_detectors(message: Message, event_id: str | None) -> Bounce:
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # noqa: BLE001 (its detectors index into headers they assume: a
        # message without From raises IndexError in flufl.bounce 6.0's Yale detector)
        temporary, permanent = frozenset(), frozenset()
    for addresses, action, status in ((permanent, "failed", "5.0.0"),
                                      (temporary, "delayed", "4.0.0")):
        for address in sorted(addresses):
            text = address.decode(errors="replace") if isinstance(address, bytes) else address
            return Bounce(event_id, text, action, status, "")
    raise NotABounce("This is not a delivery status notification: no multipart/report with "
                     "a message/delivery-status part, and no bounce format recognised.")


def _delivery_status(message: Message) -> Message | None:
    """The ``message/delivery-status`` part, looking inside an attached message too."""
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            return part
    return None


def _event_id(message: Message, bounce_address: str | None) -> str | None:
    local, _, domain = (bounce_address or "").rpartition("@")
    for name in _RETURN_HEADERS:
        for value in message.get_all(name) or []:
            for match in _VERP.finditer(str(value)):
                address = match.group(0).lower()
                if not bounce_address or (address.startswith(local.lower() + "+")
                                          and address.endswith("@" + domain.lower())):
                    return match.group(1).lower()
    # The returned message's own headers (text/rfc822-headers or message/rfc822).
    for part in message.walk():
        inner: Message | None = None
        if part.get_content_type() == "message/rfc822" and part.is_multipart():
            returned = part.get_payload(0)
            inner = returned if isinstance(returned, Message) else None
        elif part.get_content_type() == "text/rfc822-headers":
            body = part.get_payload(decode=True)
            text = body.decode(errors="replace") if isinstance(body, bytes) else ""
            inner = email.message_from_string(text, policy=email.policy.compat32)
        if inner is not None:
            found = _EVENT_ID.fullmatch(str(inner.get("X-EventFlow-Event-Id", "")).strip())
            if found:
                return found.group(0).lower()
    return None


def _address(field: str) -> str:
    """``rfc822; bob@example.com`` gives ``bob@example.com``."""
    value = field.split(";", 1)[1] if ";" in field else field
    return value.strip().strip("<>")
