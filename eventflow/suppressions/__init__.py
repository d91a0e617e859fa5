"""The suppression list: addresses EventFlow no longer sends to.

An address goes on it when the SMTP server refuses its mailbox for good (a 5xx reply with
a mailbox enhanced status code, :func:`eventflow.failures.suppressing_status`), when a
bounce that arrives later says so (``POST /api/v1/bounces``), or by hand (API, CLI). A
worker checks it in the same script that takes an event, before the user's quota
(``store/take.lua``): an event for a suppressed address ends ``suppressed``, nothing sent
and no quota used.

Keys:

- ``ef:sup:<address>``: hash, the entry (``address``, ``reason``, ``created_at``,
  ``expires_at``, ``event_id``, ``smtp_reply``); a hard bounce's expires with it
  (``EVENTFLOW_SUPPRESSION_TTL``), manual entries and complaints never do;
- ``ef:sups``: sorted set of the addresses, all scored 0, so that a listing pages in
  address order (``ZRANGE ... BYLEX``) with the last address as its cursor. An expired
  entry's member is removed when a listing meets it.

The address is email-validator's normalised form (ASCII only: ``allow_smtputf8`` is off),
lower-cased, so that ``Bob@Example.com`` and ``bob@example.com`` are one entry.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from email_validator import EmailNotValidError

from eventflow.clock import Clock, isoformat
from eventflow.scripts import lua_source
from eventflow.statuses import SuppressionReason
from eventflow.store.keys import PREFIX, _text

ENTRY_PREFIX = PREFIX + "sup:"
INDEX_KEY = PREFIX + "sups"
#: Entries read per round trip while a listing filters by reason.
SCAN_BATCH = 200
#: Most entries one listing reads, whatever it finds (a short page then has a cursor).
SCAN_MOST = 5000

ADD = lua_source("eventflow.suppressions", "add.lua")

#: Reasons whose entries never expire.
PERMANENT_REASONS = frozenset({SuppressionReason.MANUAL, SuppressionReason.COMPLAINT})
FIELDS = ("address", "reason", "created_at", "expires_at", "event_id", "smtp_reply")


def suppression_address(address: str) -> str:
    """The form an address has on the list; ``EmailNotValidError`` if it is not one."""
    from eventflow.schemas import normalized_email

    return normalized_email(address.strip()).lower()


def suppression_key(address: str) -> str:
    """The entry's key; ``address`` as :func:`suppression_address` gives it (the same
    form as an accepted event's ``to_email``, lower-cased: what ``take.lua`` looks up)."""
    return ENTRY_PREFIX + address


class InvalidCursor(ValueError):
    """A listing cursor this server did not hand out."""


def encode_cursor(address: str) -> str:
    return base64.urlsafe_b64encode(address.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> str:
    try:
        address = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (ValueError, binascii.Error):
        raise InvalidCursor("This cursor was not handed out by this server.") from None
    if not 0 < len(address) <= 320 or "@" not in address:
        raise InvalidCursor("This cursor was not handed out by this server.")
    return address


@dataclass(frozen=True)
class Page:
    items: list[dict[str, str | None]]
    next_cursor: str | None


def public(entry: Mapping[str, str]) -> dict[str, str | None]:
    """An entry as the API shows it (empty fields as ``null``)."""
    return {name: entry.get(name) or None for name in FIELDS}


class Suppressions:
    """Reads and writes the suppression list."""

    def __init__(self, client: redis.Redis, clock: Clock, ttl_seconds: int) -> None:
        self.redis = client
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self._add = client.register_script(ADD)

    def add(self, address: str, reason: str, event_id: str = "", smtp_reply: str = "",
            keep_permanent: bool = False) -> dict[str, str | None]:
        """Put ``address`` (any form) on the list, or replace its entry; a hard bounce's
        entry expires after the TTL. With ``keep_permanent`` an entry that never expires
        stays as it is. Returns the entry as stored. ``EmailNotValidError`` if the
        address is not one."""
        address = suppression_address(address)
        now = self.clock.now()
        expires = (None if SuppressionReason(reason) in PERMANENT_REASONS
                   else now + self.ttl_seconds)
        self._add(keys=[suppression_key(address), INDEX_KEY], args=[
            address, reason, isoformat(now), isoformat(expires) if expires else "",
            int(expires) if expires else "", event_id, smtp_reply[:1000],
            "1" if keep_permanent else "0"])
        entry = self.get(address)
        return entry or public({"address": address, "reason": reason})

    def get(self, address: str) -> dict[str, str | None] | None:
        """The entry of ``address`` (any form), or ``None``."""
        try:
            address = suppression_address(address)
        except EmailNotValidError:
            return None
        raw = self.redis.hgetall(suppression_key(address))
        return public({_text(k): _text(v) for k, v in raw.items()}) if raw else None

    def delete(self, address: str) -> bool:
        """Take ``address`` off the list; False if it was not on it."""
        try:
            address = suppression_address(address)
        except EmailNotValidError:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(suppression_key(address))
        pipe.zrem(INDEX_KEY, address)
        deleted, _ = pipe.execute()
        return bool(deleted)

    def page(self, limit: int, cursor: str | None = None, reason: str | None = None) -> Page:
        """Up to ``limit`` entries in address order after ``cursor``, of ``reason`` if
        given; ``next_cursor`` is ``None`` at the end. A page may be shorter than
        ``limit`` and still have a cursor, when a filter left most entries out."""
        after = decode_cursor(cursor) if cursor else None
        items: list[dict[str, str | None]] = []
        read = 0
        while len(items) < limit and read < SCAN_MOST:
            start = f"({after}" if after else "-"
            addresses = [_text(a) for a in self.redis.zrange(
                INDEX_KEY, start, "+", bylex=True, offset=0, num=SCAN_BATCH)]
            if not addresses:
                return Page(items, None)
            pipe = self.redis.pipeline(transaction=False)
            for address in addresses:
                pipe.hgetall(suppression_key(address))
            expired = []
            for address, raw in zip(addresses, pipe.execute(), strict=True):
                read += 1
                after = address
                if not raw:
                    expired.append(address)
                    continue
                entry = public({_text(k): _text(v) for k, v in raw.items()})
                if reason is None or entry["reason"] == reason:
                    items.append(entry)
                    if len(items) == limit:
                        break
            if expired:
                self._forget(expired)
            if len(addresses) < SCAN_BATCH and len(items) < limit:
                return Page(items, None)
        return Page(items, encode_cursor(after) if after else None)

    def _forget(self, addresses: list[str]) -> None:
        """Remove expired entries' members from the index (unless added again since)."""
        for address in addresses:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(suppression_key(address))
                    if not pipe.exists(suppression_key(address)):
                        pipe.multi()
                        pipe.zrem(INDEX_KEY, address)
                        pipe.execute()
                except redis.WatchError:
                    pass  # added again meanwhile: its member stays

    def count(self) -> int:
        """Addresses on the list (expired entries not yet met by a listing included)."""
        return int(self.redis.zcard(INDEX_KEY))
