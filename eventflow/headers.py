"""What may go into a header line: the checks shared by the producer's fields and the
subject a template renders."""

from __future__ import annotations

import re
from email.header import decode_header

from marshmallow import ValidationError

_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
# Control characters, and every other character that Python's str.splitlines() (and so
# the email package's header policy) takes for a line break: NEL, LS, PS.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")


def reject_header_breaks(value: str) -> None:
    """Refuse what could start a new header line, plainly or hidden in an encoded word."""
    if "\r" in value or "\n" in value:
        raise ValidationError("Must not contain CR or LF characters.")
    if _CONTROL.search(value):
        raise ValidationError("Must not contain control characters.")
    for word in _ENCODED_WORD.findall(value):
        try:
            decoded = "".join(
                part.decode(charset or "ascii", errors="replace") if isinstance(part, bytes)
                else part
                for part, charset in decode_header(word)
            )
        except (ValueError, LookupError):
            raise ValidationError("Contains a malformed encoded word.") from None
        if "\r" in decoded or "\n" in decoded or _CONTROL.search(decoded):
            raise ValidationError("Must not contain encoded CR, LF or control characters.")
