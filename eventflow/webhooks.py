"""Status webhooks: tell a producer when one of its events reaches a final status.

:meth:`Webhooks.notify_final` is called where a final status has just been recorded; it
puts a task message (``eventflow.webhook``, ``tasks/webhooks.py``) on the queue, so that a
slow or absent receiver never holds up an email. The task calls :meth:`Webhooks.send`
once per attempt: the body ``{"type": "event.<status>", "timestamp", "data"}`` signed per
Standard Webhooks, with a ``webhook-id`` that is the same for every attempt of the same
event and status, so that a receiver can drop duplicates (delivery is at least once).
Each attempt goes into the event's history.

A callback URL is refused when its host resolves to a private, loopback, link-local or
otherwise non-public address, unless ``EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE`` is set; the
connection goes to the address that was checked, so a second resolution cannot point
it elsewhere.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from redis.exceptions import RedisError
from standardwebhooks.webhooks import Webhook as Signer

from eventflow.enqueue import build_task_message
from eventflow.scripts import lua_source
from eventflow.statuses import Step
from eventflow.store.base import event_view
from eventflow.store.keys import event_key, history_key

log = logging.getLogger(__name__)

SLOT = lua_source("eventflow", "webhook_slot.lua")

#: The statuses a producer is told of (the contract's list; ``suppressed`` and ``bounced``
#: are recorded by the suppression list and the bounce endpoint).
NOTIFIED = frozenset({"delivered", "dead_lettered", "rate_limited", "suppressed", "bounced"})
#: The Celery task that sends one webhook.
WEBHOOK_TASK = "eventflow.webhook"
#: Seconds to connect, and to wait for each read, of one attempt: a receiver that hangs
#: holds a worker slot no longer than this.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
#: Most bytes of a receiver's answer kept in the history.
ANSWER_BYTES = 200
#: After an attempt at a URL timed out, its next attempts within this many seconds (from
#: any worker) wait without connecting: a receiver that hangs costs a worker slot once
#: per window, not once per event, so it cannot hold up the emails.
HANGING_SECONDS = 30
#: A receiver that answered within this many seconds is quick: it gets attempts in
#: parallel (for :data:`FAST_SECONDS`). Any other gets one attempt at a time, the others
#: waiting untried, so that a receiver that starts to hang holds one worker slot, not all.
SLOW_SECONDS = 0.5
FAST_SECONDS = 60
#: The longest one attempt can take (connect, send, read), with a second to spare.
ATTEMPT_SECONDS = CONNECT_TIMEOUT + 2 * READ_TIMEOUT + 1
#: HTTP statuses after which an attempt is tried again (any 5xx is too).
RETRY_STATUSES = frozenset({408, 425, 429})


class WebhookRefused(Exception):
    """The callback URL resolves to an address that is not allowed."""


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: ``ok`` (2xx), ``retry`` (5xx, 429, network) or neither."""

    ok: bool
    retry: bool
    http_status: int | None
    error: str | None
    duration: float
    #: The receiver did not answer in time (it may hang the next attempt too).
    timed_out: bool = False
    #: False when the POST was not made because the receiver is hanging; then ``wait``
    #: is how long to wait before trying.
    tried: bool = True
    wait: float = 0.0


def receiver_key(kind: str, url: str) -> str:
    """A key of the receiver at ``url``: ``inflight`` (sorted set of the attempts under
    way, by start time), ``fast`` (set while it answers within :data:`SLOW_SECONDS`) or
    ``hanging`` (set when its last attempt timed out)."""
    return f"ef:webhooks:{kind}:{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def webhook_id(event_id: str, status: str) -> str:
    """The ``webhook-id`` of the event's ``status``: the same on every attempt."""
    return f"msg_{event_id}_{status}"


def address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a callback may go to ``address``: a public (globally routable) one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for ``host``: the first that resolves, every one of them
    public unless ``allow_private`` (a name with one private address is refused whole)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            if not address_allowed(ipaddress.ip_address(address.partition("%")[0])):
                raise WebhookRefused(
                    f"{host} resolves to {address}, a private or loopback address "
                    "(EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE=true allows it)")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address already checked, with the URL's host as ``Host``."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), CONNECT_TIMEOUT)
        self.sock.settimeout(self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS, the certificate checked against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), CONNECT_TIMEOUT)
        sock.settimeout(self.timeout)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str], allow_private: bool) -> Attempt:
    """POST ``body`` to ``url`` once; no redirect is followed (it could lead anywhere)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.perf_counter()
    connection: http.client.HTTPConnection | None = None
    try:
        address = resolve(host, port, allow_private)
        kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = kind(host, port, address, READ_TIMEOUT)
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read(ANSWER_BYTES).decode("utf-8", "replace")
    except WebhookRefused as exc:
        return Attempt(False, False, None, str(exc), time.perf_counter() - started)
    except (OSError, http.client.HTTPException) as exc:
        # Refused, reset, timed out, TLS failed, not HTTP: the receiver may come back.
        error = f"{type(exc).__name__}: {exc}"
        return Attempt(False, True, None, error, time.perf_counter() - started,
                       timed_out=isinstance(exc, TimeoutError))
    finally:
        if connection is not None:
            connection.close()
    duration = time.perf_counter() - started
    status = response.status
    if 200 <= status < 300:
        return Attempt(True, False, status, None, duration)
    error = f"HTTP {status}" + (f": {answer.strip()}" if answer.strip() else "")
    return Attempt(False, status >= 500 or status in RETRY_STATUSES, status, error, duration)


#: Sorted set of the webhooks about to be enqueued (members ``<event id> <status> <at>``,
#: scored by the time in ms): written before the final status, removed with the task
#: message's push, so that a worker killed in between leaves it for the sweep.
PENDING_KEY = "ef:webhooks:pending"


class Webhooks:
    """Enqueues and sends the status webhooks of the producers that have one.

    Where a final status is recorded, the caller brackets the write::

        pending = webhooks.expect(event_id, status, producer)   # before
        ...record the status...
        webhooks.notify_final(event_id, status, pending)        # after

    ``expect`` notes the webhook as pending (for producers with a webhook only), and
    ``notify_final`` pushes its task message and clears the note in one step; a note left
    behind by a worker killed in between is found by :meth:`sweep_pending`, which sends
    the webhook if the status was recorded and forgets it otherwise.
    """

    def __init__(self, store: Any, settings: Any) -> None:
        self.store = store
        self.settings = settings
        #: Set by ``celery_init_app``: the app whose queue the webhook tasks go to.
        self.celery_app: Celery | None = None
        self._slot = store.redis.register_script(SLOT)

    def expect(self, event_id: str, status: str, producer: str | None = None) -> str | None:
        """Note that ``event_id`` is about to be recorded as ``status``; returns the note
        (``None`` when its producer has no webhook). ``producer`` is read from the record
        when not given. Never raises: the status must be recorded whatever happens here."""
        if not self.settings.webhooks or status not in NOTIFIED:
            return None
        try:
            if producer is None:
                producer = _text(self.store.redis.hget(event_key(event_id), "producer"))
            if self.settings.webhook_for(producer) is None:
                return None
            pending = f"{event_id} {status} {self.store.now()}"
            self.store.redis.zadd(PENDING_KEY, {pending: int(time.time() * 1000)})
            return pending
        except RedisError as exc:
            log.error("event %s: webhook for %s not noted as pending, Redis unavailable (%s)",
                      event_id, status, exc)
            # Still sent if the status is recorded: only a worker killed now loses it.
            return f"{event_id} {status} {self.store.now()}" if producer else None

    def notify_final(self, event_id: str, status: str, pending: str | None) -> None:
        """The event has just been recorded as ``status``: enqueue its webhook (the note
        ``pending`` from :meth:`expect`). Never raises: the status is recorded, and the
        email's outcome must not depend on the webhook."""
        if pending is None or self.celery_app is None:
            return
        try:
            self._enqueue(pending)
        except RedisError as exc:
            # The note stays: the sweep sends it once Redis answers again.
            log.error("event %s: webhook for %s not enqueued yet, Redis unavailable (%s)",
                      event_id, status, exc)

    def _enqueue(self, pending: str) -> None:
        assert self.celery_app is not None
        event_id, status, at = pending.split(" ", 2)
        message = build_task_message(self.celery_app, uuid.uuid4().hex, (event_id, status, at),
                                     WEBHOOK_TASK)
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.lpush(message.queue, message.payload)
        pipe.zrem(PENDING_KEY, pending)
        pipe.execute()

    def sweep_pending(self, older_than: float, limit: int = 500) -> int:
        """Enqueue the webhooks noted pending more than ``older_than`` seconds ago whose
        status was recorded (their worker died before it could), and forget the others
        (their status was never recorded); returns how many were enqueued."""
        cutoff = int((time.time() - older_than) * 1000)
        enqueued = 0
        for raw in self.store.redis.zrangebyscore(PENDING_KEY, "-inf", cutoff, start=0,
                                                  num=limit):
            pending = _text(raw)
            event_id, status, _ = pending.split(" ", 2)
            if _text(self.store.redis.hget(event_key(event_id), "status")) == status:
                self._enqueue(pending)
                enqueued += 1
                log.warning("event %s: webhook for %s was left pending: enqueued",
                            event_id, status)
            else:
                self.store.redis.zrem(PENDING_KEY, pending)
        return enqueued

    def send(self, event_id: str, status: str, at: str, attempt: int,
             retry_in: float | None = None) -> Attempt | None:
        """POST the webhook of the event's ``status`` once and note the attempt in its
        history (with ``retry_in``, the wait before the next one if this one is to be
        tried again). ``None`` when there is nothing to send (the event expired, its
        producer has no webhook any more)."""
        record = self.store.get(event_id)
        hook = self.settings.webhook_for(record.get("producer")) if record else None
        if record is None or hook is None:
            return None
        token = uuid.uuid4().hex
        keys = [receiver_key(kind, hook.url) for kind in ("hanging", "inflight", "fast")]
        wait_ms = int(self._slot(keys=keys, args=[repr(time.time()), token, SLOW_SECONDS,
                                                  ATTEMPT_SECONDS, HANGING_SECONDS]))
        if wait_ms:
            # Not an attempt: no history entry, no retry used up.
            return Attempt(False, True, None, "receiver hanging: not tried", 0.0,
                           tried=False, wait=wait_ms / 1000)
        msg_id = webhook_id(event_id, status)
        body = json.dumps({"type": f"event.{status}", "timestamp": at,
                           "data": event_view(record)}, separators=(",", ":"))
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "EventFlow-Webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Signer(hook.secret).sign(msg_id, now, body),
        }
        try:
            result = post(hook.url, body.encode(), headers, self.settings.webhooks_allow_private)
        finally:
            self.store.redis.zrem(keys[1], token)
        if result.timed_out:
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.set(keys[0], "1", ex=HANGING_SECONDS)
            pipe.delete(keys[2])
            pipe.execute()
        elif result.http_status is not None and result.duration < SLOW_SECONDS:
            self.store.redis.set(keys[2], "1", ex=FAST_SECONDS)
        details: dict[str, Any] = {"webhook_id": msg_id, "type": f"event.{status}",
                                   "attempt": attempt, "url": hook.url,
                                   "duration_ms": round(result.duration * 1000, 1)}
        if result.http_status is not None:
            details["http_status"] = result.http_status
        if result.error:
            details["error"] = result.error
        if not result.ok:
            if result.retry and retry_in is not None:
                details["retry_in_s"] = round(retry_in, 3)
            else:
                details["final"] = True
        step = Step.WEBHOOK_SENT if result.ok else Step.WEBHOOK_FAILED
        # RPUSHX: an event whose history expired meanwhile is not brought back half-made.
        self.store.redis.rpushx(history_key(event_id), self.store.entry(step, **details))
        return result


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))
