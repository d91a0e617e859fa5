"""Properties of the event schema and of the email built from what it accepts.

Hypothesis generates subjects, names and addresses, hostile ones included (line breaks,
control characters, RFC 2047 encoded words hiding a newline, the CVE-2024-6923 family):
whatever the schema accepts becomes exactly one email, to one recipient, with exactly the
headers EventFlow writes; whatever could start a new header line is refused.
"""

from __future__ import annotations

import os
from email import message_from_bytes, policy
from email.utils import getaddresses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from eventflow.mailer import build_message
from eventflow.schemas import (
    DEFAULT_SUBJECTS,
    MAX_EMAIL,
    MAX_MESSAGE,
    MAX_SUBJECT,
    MAX_USER_ID,
    batch_schema,
    event_schema,
    load_batch,
    load_event,
    plain_event,
    reject_header_breaks,
)

EXAMPLES = int(os.environ.get("EVENTFLOW_FUZZ_EXAMPLES", "50"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])

MAIL_FROM = "EventFlow <noreply@eventflow.test>"
EXPECTED_HEADERS = {"from", "to", "subject", "date", "message-id", "x-eventflow-event-id",
                    "content-type", "content-transfer-encoding", "mime-version"}
BREAKS = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1b", "\x85", "\u2028", "\u2029",
          "=?UTF-8?Q?=0A?=", "=?UTF-8?Q?=E2=80=A8?=", "=?UTF-8?Q?=0D=0A?=", "=?utf-8?b?Cg==?=", "=?iso-8859-1?q?a=0Ab?="]

# Text with a good share of what attackers put into header fields.
hostile_text = st.lists(
    st.one_of(
        st.text(max_size=12),
        st.sampled_from(BREAKS + ["Bcc: victim@example.org", ", other@example.org", ":",
                                  "=?UTF-8?Q?", "?=", "=?UTF-8?Q?Bcc:_x@example.org?=",
                                  "<", ">", '"', "\t", "\u00e9"]),
    ),
    max_size=6,
).map("".join)


def event_with(subject: str | None = None, user_id: str = "user-1",
               to_email: str = "someone@example.com") -> dict[str, object]:
    payload: dict[str, object] = {"to_email": to_email, "message": "Hello"}
    if subject is not None:
        payload["subject"] = subject
    return {"user_id": user_id, "event_type": "USER_NOTIFICATION", "payload": payload}


def accepted(event: dict[str, object]) -> dict[str, object] | None:
    try:
        return event_schema.load(event)  # type: ignore[no-any-return]
    except ValidationError:
        return None


def contains_break(text: str) -> bool:
    return len(text.splitlines()) > 1 or any(
        token in text for token in ("\r", "\n", "\x00", "\x0b", "\x0c", "\x1b")) or any(
        word in text for word in BREAKS[10:])


@PROPERTY_SETTINGS
@given(subject=hostile_text)
def test_a_subject_the_schema_accepts_makes_one_email_with_only_our_headers(subject: str) -> None:
    # Given any subject
    event = accepted(event_with(subject=subject))
    if event is None:
        return  # refused: nothing is built (the next test checks what must be refused)
    # When the email is built and parsed back as a receiving server would
    raw = build_message("ev-1", event, MAIL_FROM, "eventflow.test").as_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    # Then it has exactly our headers, each once, one recipient, and the subject as given
    names = [name.lower() for name in parsed]
    assert sorted(names) == sorted(EXPECTED_HEADERS)
    assert getaddresses([str(parsed["To"])]) == [("", "someone@example.com")]
    if "=?" not in subject:  # an encoded word the producer wrote is shown decoded
        # (folding may change runs of white space, not the words)
        assert str(parsed["Subject"]).split() == subject.split()


@PROPERTY_SETTINGS
@given(prefix=st.text(max_size=10), brk=st.sampled_from(BREAKS), suffix=hostile_text)
def test_a_line_break_plain_or_encoded_is_refused_in_every_header_bound_field(
    prefix: str, brk: str, suffix: str
) -> None:
    # Given a value with a line break or control character, plain or in an encoded word
    value = prefix + brk + suffix
    # Then the subject, the user id and the address all refuse it
    assert accepted(event_with(subject=value)) is None
    assert accepted(event_with(user_id=value)) is None
    assert accepted(event_with(to_email=f"a{value}@example.com")) is None
    assert accepted(event_with(to_email=f"user@example.com{value}")) is None


@PROPERTY_SETTINGS
@given(text=st.text(max_size=40))
def test_reject_header_breaks_refuses_exactly_what_holds_a_break(text: str) -> None:
    # Given any text: it is refused if it holds a CR, LF, control character or any other
    # line boundary of str.splitlines() (a tab is allowed); else only for an encoded word
    control = any(ord(c) < 32 and c != "\t" or c in "\x7f\x85\u2028\u2029" for c in text)
    try:
        reject_header_breaks(text)
        refused = False
    except ValidationError:
        refused = True
    if control:
        assert refused
    elif "=?" not in text:
        assert not refused


@PROPERTY_SETTINGS
@given(user=st.from_regex(r"\A[a-z0-9._-]{1,20}\Z"),
       extra=st.sampled_from([", b@example.com", " <b@example.com>", ";b@example.com",
                              "\nBcc: b@example.com", " b@example.com", "@example.org"]))
def test_an_address_list_or_a_display_name_is_not_one_address(user: str, extra: str) -> None:
    # Given something that names a second recipient, or a name and an address
    # Then it is refused: the payload takes one plain address only
    assert accepted(event_with(to_email=f"{user}@example.com{extra}")) is None


@PROPERTY_SETTINGS
@given(event=st.fixed_dictionaries({
    "user_id": st.text(min_size=1, max_size=128),
    "event_type": st.sampled_from(["USER_NOTIFICATION", "PASSWORD_RESET", "NOPE", ""]),
    "payload": st.fixed_dictionaries({
        "to_email": st.emails() | st.text(max_size=30),
        "message": st.text(max_size=50),
    }, optional={"subject": st.text(max_size=210), "cc": st.emails()}),
}, optional={"extra": st.integers()}))
def test_the_schema_only_ever_answers_with_a_loaded_event_or_field_errors(
    event: dict[str, object],
) -> None:
    # Given any event-shaped data; When it is loaded
    try:
        loaded = event_schema.load(event)
    except ValidationError as exc:
        # Then a refusal names the fields at fault
        assert isinstance(exc.messages, dict) and exc.messages
        return
    # Or what was accepted keeps to every rule
    assert "extra" not in event and "cc" not in event["payload"]  # type: ignore[operator]
    assert 1 <= len(loaded["user_id"]) <= 128 and not contains_break(loaded["user_id"])
    subject = loaded["payload"].get("subject")
    assert subject is None or (1 <= len(subject) <= 200 and not contains_break(subject))


def test_the_message_builder_refuses_a_line_break_in_a_header_value_even_as_a_repeat() -> None:
    # Given a subject that builds once (its header is then kept for the next emails)
    event = {"event_type": "USER_NOTIFICATION",
             "payload": {"to_email": "someone@example.com", "message": "Hi", "subject": "Hi"}}
    build_message("ev-1", event, MAIL_FROM, "eventflow.test")
    # Then a subject with a line break is refused, however often it comes
    bad = {**event, "payload": {**event["payload"], "subject": "Hi\r\nBcc: x@example.com"}}
    for _ in range(2):
        with pytest.raises(ValueError, match="linefeed or carriage return"):
            build_message("ev-2", bad, MAIL_FROM, "eventflow.test")


def around(limit: int) -> st.SearchStrategy[str]:
    """Short text, and text of lengths at and next to ``limit`` ending in a telling character."""
    sized = st.tuples(st.sampled_from([1, 2, limit - 1, limit, limit + 1]),
                      st.sampled_from(["a", "é", "=", "?", "\t", "\n"]))
    return st.one_of(hostile_text, sized.map(lambda size: "b" * (size[0] - 1) + size[1]))


plain_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)
plain_events = st.fixed_dictionaries({
    "user_id": plain_text | around(MAX_USER_ID),
    "event_type": st.sampled_from(sorted(DEFAULT_SUBJECTS)),
    "payload": st.fixed_dictionaries({
        "to_email": st.emails() | around(MAX_EMAIL) | st.sampled_from([
            "someone@example.com", "Someone@EXAMPLE.com", "a@b", "x" * 64 + "@example.com",
            "a" * 250 + "@example.com", "a=?b@example.com", "é@example.com"]),
        "message": plain_text | around(MAX_MESSAGE),
    }, optional={"subject": plain_text | around(MAX_SUBJECT)}),
})
odd_values = st.one_of(hostile_text, st.none(), st.integers(), st.booleans(), st.just(""),
                       st.lists(plain_text, max_size=1), st.sampled_from(["NOPE", "a@b.c"]))


@settings(max_examples=EXAMPLES * 20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(event=plain_events, value=odd_values, field=st.sampled_from([
    None, "user_id", "event_type", "payload", "extra", "payload.to_email", "payload.message",
    "payload.subject", "payload.cc", "-user_id", "-payload.message"]))
def test_the_fast_check_of_plain_events_agrees_with_the_schema(
    event: dict[str, Any], value: Any, field: str | None,
) -> None:
    # Given a plain event, or one with a field set to an odd value, added or removed
    if field is not None:
        removed = field.startswith("-")
        *parents, name = field.lstrip("-").split(".")
        target = event["payload"] if parents else event
        if removed:
            del target[name]
        else:
            target[name] = value
    # When the fast check vouches for it
    fast = plain_event(event)
    if fast is None:
        return  # the schema decides
    # Then the schema accepts it too, and loads exactly the same event, in the same order
    loaded = event_schema.load(event)
    assert fast == loaded
    assert list(fast) == list(loaded) and list(fast["payload"]) == list(loaded["payload"])


def test_the_plain_example_event_takes_the_fast_check() -> None:
    # Given the contract's example event; Then the fast check vouches for it
    event = {"user_id": "user-123", "event_type": "USER_NOTIFICATION",
             "payload": {"to_email": "test@example.com", "message": "Hello",
                         "subject": "optional"}}
    assert plain_event(event) == event_schema.load(event)
    # And a refused one is left to the schema, which words the refusal
    assert plain_event({**event, "user_id": ""}) is None
    with pytest.raises(ValidationError):
        load_event({**event, "user_id": ""})


batch_items = st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.integers(), st.text(max_size=3), st.none(), st.lists(st.integers()))


@PROPERTY_SETTINGS
@given(events=st.one_of(st.lists(batch_items, max_size=4),
                        st.lists(st.just({}), min_size=499, max_size=502),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
       extra=st.sampled_from([None, "extra", "events2"]))
def test_the_fast_check_of_a_batch_agrees_with_the_batch_schema(
    events: Any, extra: str | None,
) -> None:
    body: dict[str, Any] = {"events": events}
    if extra:
        body[extra] = 1
    # Whatever the schema answers, load_batch answers the same: the same batch, or the
    # same refusal
    try:
        expected: Any = batch_schema.load(body)
    except ValidationError as exc:
        with pytest.raises(ValidationError) as refused:
            load_batch(body)
        assert refused.value.messages == exc.messages
    else:
        assert load_batch(body) == expected
