"""Choosing dead letters: the filters of a listing or a bulk replay, and the cursor of a
page (a position in (failed_at ms, id) order)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from eventflow.deadletters.keys import ERROR_TYPES, _json


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters an operation applies to; ``None`` matches everything.

    ``since_ms`` is inclusive and ``until_ms`` exclusive, both times of failure.
    """

    error_type: str | None = None
    event_type: str | None = None
    user_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, letter: Mapping[str, Any]) -> bool:
        event = letter.get("event") or {}
        return (
            (self.error_type is None or letter.get("error_type") == self.error_type)
            and (self.event_type is None or event.get("event_type") == self.event_type)
            and (self.user_id is None or event.get("user_id") == self.user_id)
        )

    def failed_before(self, until_ms: int) -> LetterFilter:
        """This filter, narrowed to letters that failed before ``until_ms``."""
        if self.until_ms is not None and self.until_ms <= until_ms:
            return self
        return replace(self, until_ms=until_ms)


def _milliseconds(moment: datetime) -> int:
    if moment.tzinfo is None:  # a time without offset is UTC, as everywhere in EventFlow
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class FilterSchema(Schema):
    """The filters of the dead-letter endpoints and of ``flask dlq``, from strings."""

    error_type = fields.String(validate=validate.OneOf(ERROR_TYPES))
    event_type = fields.String(validate=validate.Length(min=1, max=128))
    user_id = fields.String(validate=validate.Length(min=1, max=128))
    since = fields.DateTime(metadata={"description": "ISO 8601; failed at or after."})
    until = fields.DateTime(metadata={"description": "ISO 8601; failed before."})

    @validates_schema
    def _since_before_until(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        since, until = data.get("since"), data.get("until")
        if since and until and _milliseconds(since) >= _milliseconds(until):
            raise ValidationError("Must be later than 'since'.", "until")


def letter_filter(data: Mapping[str, Any]) -> LetterFilter:
    """A :class:`LetterFilter` from data loaded by a :class:`FilterSchema`."""
    return LetterFilter(
        error_type=data.get("error_type"),
        event_type=data.get("event_type"),
        user_id=data.get("user_id"),
        since_ms=_milliseconds(data["since"]) if data.get("since") else None,
        until_ms=_milliseconds(data["until"]) if data.get("until") else None,
    )


class InvalidCursor(ValueError):
    """A pagination cursor this server did not hand out."""


def encode_cursor(position: tuple[int, str]) -> str:
    """An opaque cursor for "after this (failed_at ms, id)"."""
    raw = _json(list(position)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[int, str]:
    """The position a cursor stands for, or :class:`InvalidCursor`."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        score, event_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCursor("This cursor was not handed out by this server.") from None
    if (type(score) is not int or not 0 <= score < 2**53 or not isinstance(event_id, str)
            or not 0 < len(event_id) <= 256):
        raise InvalidCursor("This cursor was not handed out by this server.")
    return score, event_id

