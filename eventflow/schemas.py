"""What a producer may send: the event schema, shared by validation and the OpenAPI document."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from email_validator import EmailNotValidError, EmailSyntaxError, validate_email
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from eventflow.headers import reject_header_breaks
from eventflow.rendering import (
    DEFAULT_SUBJECTS,
    LOCALE_PATTERN,
    MAX_DATA_BYTES,
    MAX_LOCALE,
    check_data,
    check_locale,
)

MAX_BATCH = 500

#: Longest values, in characters (the address once normalised).
MAX_USER_ID, MAX_EMAIL, MAX_MESSAGE, MAX_SUBJECT = 128, 254, 20_000, 200

#: One line of text, no control characters: also the ``pattern`` of the OpenAPI document,
#: so that clients (and the fuzzer) know the rule. Encoded words are checked below.
_ONE_LINE = r"^[^\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]*$"
ONE_LINE = validate.Regexp(_ONE_LINE,
                           error="Must not contain CR, LF or control characters.")


def no_hidden_breaks(value: str) -> None:
    """Beside ``ONE_LINE``: what it lets through. Python's ``$`` also matches before a
    final newline, and an encoded word can hide a break. (What ``ONE_LINE`` refuses is
    left to its own message.)"""
    if re.match(_ONE_LINE, value):
        reject_header_breaks(value)


class Email(fields.String):
    """An email address as a mail server takes it: checked syntax, no DNS look-up."""

    # Its own key: "invalid" is String's message for a value that is not a string at all.
    default_error_messages = {"invalid_email": "Not a valid email address: {reason}"}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        reject_header_breaks(text)
        try:
            return normalized_email(text)
        except EmailNotValidError as exc:
            raise self.make_error("invalid_email", reason=str(exc)) from None


#: Special-use domains (RFC 6761, RFC 6762, and ``.internal``) that a recipient may be at
#: with ``EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS=true``: names a company relay can deliver to.
#: The others (``.onion``, ``.invalid``, ``.arpa``) stay refused.
SPECIAL_USE_DOMAINS = ("test", "local", "internal", "localhost")
#: A top-level domain put after a special-use one only to have the rest of the address
#: checked as usual, then taken off again.
_STAND_IN_TLD = ".com"

_special_use_allowed = False


def allow_special_use_domains(allowed: bool) -> None:
    """Accept (or not) recipients at :data:`SPECIAL_USE_DOMAINS`: a setting of the whole
    process, like the schemas themselves (``create_app`` sets it from the settings)."""
    global _special_use_allowed
    _special_use_allowed = allowed


def normalized_email(text: str) -> str:
    """The address as email_validator normalises it; ``EmailNotValidError`` if invalid."""
    return _normalized_email(text, _special_use_allowed)


# The check is a pure function of the text (no DNS look-up), and the same recipients come
# back again and again: remembering recent answers saves most of its cost. Refusals raise,
# so they are not remembered.
@lru_cache(maxsize=4096)
def _normalized_email(text: str, special_use_allowed: bool) -> str:
    domain = text.rpartition("@")[2].lower()
    special_use = any(domain == name or domain.endswith("." + name)
                      for name in SPECIAL_USE_DOMAINS)
    if not special_use:
        return validate_email(text, check_deliverability=False, allow_smtputf8=False).normalized
    if not special_use_allowed:
        # email_validator refuses most of these itself; .internal (reserved for private
        # use in 2024) it does not know yet.
        raise EmailSyntaxError("The part after the @-sign is a special-use domain name; set "
                               "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS=true to allow it.")
    # email_validator refuses these names whatever its options; everything else about
    # the address is checked as usual under a stand-in top-level domain.
    checked = validate_email(text + _STAND_IN_TLD, check_deliverability=False,
                             allow_smtputf8=False).normalized
    return checked.removesuffix(_STAND_IN_TLD)


class PayloadSchema(Schema):
    """What the email says and to whom."""

    to_email = Email(required=True, validate=validate.Length(max=MAX_EMAIL),
                     metadata={"description": "The one recipient.", "format": "email"})
    message = fields.String(validate=validate.Length(min=1, max=MAX_MESSAGE),
                            metadata={"description": "The plain-text body (the shipped "
                                      "templates send it as it is). Required unless `data` "
                                      "is given."})
    subject = fields.String(validate=[validate.Length(min=1, max=MAX_SUBJECT), ONE_LINE,
                                      no_hidden_breaks],
                            metadata={"description": "Defaults to one per event type."})
    data = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True),
                       validate=check_data,
                       metadata={"description": "The template's variables: any JSON values, "
                                 f"at most {MAX_DATA_BYTES // 1024} KiB as JSON. The event "
                                 "is refused (422, `errors.payload.data`) when its template "
                                 "does not render with them."})
    locale = fields.String(validate=[validate.Length(min=2, max=MAX_LOCALE), check_locale],
                           metadata={"description": "BCP 47 language tag, such as `fr-CA`: "
                                     "the template's files fall back from `fr-CA` to `fr` "
                                     "to the event type's own.",
                                     "pattern": LOCALE_PATTERN, "example": "fr-CA"})

    @validates_schema
    def _message_or_data(self, payload: dict[str, Any], **kwargs: Any) -> None:
        if "message" not in payload and "data" not in payload:
            raise ValidationError("Missing data for required field.", "message")


class EventSchema(Schema):
    """One event, as ``POST /api/v1/events`` takes it."""

    user_id = fields.String(required=True,
                            validate=[validate.Length(min=1, max=MAX_USER_ID), ONE_LINE,
                                      no_hidden_breaks],
                            metadata={"description": "Whose quota the email counts against."})
    event_type = fields.String(required=True, validate=validate.OneOf(sorted(DEFAULT_SUBJECTS)))
    payload = fields.Nested(PayloadSchema, required=True)


class BatchSchema(Schema):
    """Up to 500 events, each validated on its own (so not loaded through this schema)."""

    events = fields.List(fields.Dict(), required=True,
                         validate=validate.Length(min=1, max=MAX_BATCH))


class QuotaSchema(Schema):
    """The user's email quota, as left when the event was accepted (used at send time)."""

    limit = fields.Integer(required=True, metadata={"example": 20})
    remaining = fields.Integer(required=True, metadata={
        "description": "Emails the user can still be sent in the window, not counting "
                       "events still queued (this one included)."})
    window = fields.String(required=True, validate=validate.OneOf(
        ["second", "minute", "hour", "day"]))


class AcceptedSchema(Schema):
    """The answer to an accepted event."""

    id = fields.String(required=True)
    status = fields.String(required=True, metadata={"example": "queued"})
    quota = fields.Nested(QuotaSchema)


event_schema = EventSchema()
batch_schema = BatchSchema()


def load_event(body: Any) -> dict[str, Any]:
    """``event_schema.load(body)``, with the plainest events checked directly.

    marshmallow's machinery costs several times the checks themselves (figures in
    ``bench/README.md``). :func:`plain_event` vouches only
    for events whose every field is plainly valid, and returns for them exactly what the
    schema returns (``tests/test_schema_properties.py`` compares the two on generated
    events); everything else, refusals included, is the schema's to decide and word.
    """
    return plain_event(body) or event_schema.load(body)  # type: ignore[no-any-return]


def load_batch(body: Any) -> dict[str, Any]:
    """``batch_schema.load(body)``, with a plain batch (an object whose only field is a
    list of 1 to 500 objects) taken as it is: marshmallow's list field costs more per
    event than checking the event itself. Anything else is the schema's to word."""
    if type(body) is dict and body.keys() == {"events"}:
        events = body["events"]
        if type(events) is list and 0 < len(events) <= MAX_BATCH \
                and all(type(event) is dict for event in events):
            return {"events": events}
    return batch_schema.load(body)  # type: ignore[no-any-return]


#: Text with nothing for the header checks to look at: no control character, nothing
#: that splitlines() breaks at, no encoded word.
_PLAIN = re.compile(r"(?:(?!=\?)[^\x00-\x1f\x7f\x85\u2028\u2029])*\Z")
_EVENT_KEYS = frozenset(("user_id", "event_type", "payload"))
_PAYLOAD_KEYS = frozenset(("to_email", "message"))
_PAYLOAD_KEYS_WITH_SUBJECT = frozenset(("to_email", "message", "subject"))


def plain_event(body: Any) -> dict[str, Any] | None:
    """The event as ``event_schema`` loads it, or None when it is not plainly valid."""
    if type(body) is not dict or body.keys() != _EVENT_KEYS:
        return None
    user_id, event_type, payload = body["user_id"], body["event_type"], body["payload"]
    if (type(user_id) is not str or not 0 < len(user_id) <= MAX_USER_ID
            or not _PLAIN.match(user_id)
            or type(event_type) is not str or event_type not in DEFAULT_SUBJECTS
            or type(payload) is not dict):
        return None
    keys = payload.keys()
    if keys != _PAYLOAD_KEYS and keys != _PAYLOAD_KEYS_WITH_SUBJECT:
        return None
    to_email, message = payload["to_email"], payload["message"]
    if (type(to_email) is not str or not _PLAIN.match(to_email)
            or type(message) is not str or not 0 < len(message) <= MAX_MESSAGE):
        return None
    try:
        address = normalized_email(to_email)
    except EmailNotValidError:
        return None
    if len(address) > MAX_EMAIL:
        return None
    loaded = {"to_email": address, "message": message}
    if "subject" in payload:
        subject = payload["subject"]
        if (type(subject) is not str or not 0 < len(subject) <= MAX_SUBJECT
                or not _PLAIN.match(subject)):
            return None
        loaded["subject"] = subject
    return {"user_id": user_id, "event_type": event_type, "payload": loaded}
