"""What a producer may send: the event schema, shared by validation and the OpenAPI document."""

from __future__ import annotations

import re
from email.header import decode_header
from typing import Any

from email_validator import EmailNotValidError, validate_email
from marshmallow import Schema, ValidationError, fields, validate, validates

#: Known event types and the subject used when the payload gives none.
DEFAULT_SUBJECTS = {
    "USER_NOTIFICATION": "You have a new notification",
    "USER_SIGNUP": "Welcome!",
    "PASSWORD_RESET": "Reset your password",
    "SECURITY_ALERT": "Security alert for your account",
    "ORDER_CONFIRMATION": "Your order is confirmed",
}

MAX_BATCH = 500

_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def reject_header_breaks(value: str) -> None:
    """Refuse what could start a new header line, plainly or hidden in an encoded word."""
    if "\r" in value or "\n" in value:
        raise ValidationError("Must not contain CR or LF characters.")
    if _CONTROL.search(value):
        raise ValidationError("Must not contain control characters.")
    for word in _ENCODED_WORD.findall(value):
        try:
            decoded = b"".join(
                part if isinstance(part, bytes) else part.encode()
                for part, _ in decode_header(word)
            )
        except (ValueError, LookupError):
            raise ValidationError("Contains a malformed encoded word.") from None
        if b"\r" in decoded or b"\n" in decoded or _CONTROL.search(decoded.decode("latin-1")):
            raise ValidationError("Must not contain encoded CR, LF or control characters.")


class Email(fields.String):
    """An email address as a mail server takes it: checked syntax, no DNS look-up."""

    default_error_messages = {"invalid": "Not a valid email address: {reason}"}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        reject_header_breaks(text)
        try:
            checked = validate_email(text, check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError as exc:
            raise self.make_error("invalid", reason=str(exc)) from None
        return checked.normalized


class PayloadSchema(Schema):
    """What the email says and to whom."""

    to_email = Email(required=True, validate=validate.Length(max=254),
                     metadata={"description": "The one recipient.", "format": "email"})
    message = fields.String(required=True, validate=validate.Length(min=1, max=20_000),
                            metadata={"description": "The plain-text body."})
    subject = fields.String(validate=validate.Length(min=1, max=200),
                            metadata={"description": "Defaults to one per event type."})

    @validates("subject")
    def _subject_is_one_line(self, value: str, **kwargs: Any) -> None:
        reject_header_breaks(value)


class EventSchema(Schema):
    """One event, as ``POST /api/v1/events`` takes it."""

    user_id = fields.String(required=True, validate=validate.Length(min=1, max=128),
                            metadata={"description": "Whose quota the email counts against."})
    event_type = fields.String(required=True, validate=validate.OneOf(sorted(DEFAULT_SUBJECTS)))
    payload = fields.Nested(PayloadSchema, required=True)

    @validates("user_id")
    def _user_id_is_one_line(self, value: str, **kwargs: Any) -> None:
        reject_header_breaks(value)


class BatchSchema(Schema):
    """Up to 500 events, each validated on its own (so not loaded through this schema)."""

    events = fields.List(fields.Dict(), required=True,
                         validate=validate.Length(min=1, max=MAX_BATCH))


class AcceptedSchema(Schema):
    """The answer to an accepted event."""

    id = fields.String(required=True)
    status = fields.String(required=True, metadata={"example": "queued"})


event_schema = EventSchema()
batch_schema = BatchSchema()
