"""Celery task messages written straight into Redis, next to the event they carry.

``apply_async`` needs its own round trips to Redis and cannot join a transaction, so an
event could be stored without its message (or the reverse) if the web process died in
between. Instead the message is built with Celery's own ``create_task_message`` and
wrapped the way kombu's Redis transport wraps it, so that the web process can write the
event, its history and its message in one atomic step; a stock worker consumes it exactly
like one sent by ``apply_async`` (``tests/test_enqueue.py`` checks this).
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from celery import Celery

#: The Celery task that delivers one event.
DELIVER_TASK = "eventflow.deliver"


@dataclass(frozen=True)
class TaskMessage:
    """A serialised message and the Redis list it goes to."""

    queue: str
    payload: str


def build_task_message(
    celery_app: Celery, task_id: str, args: tuple[object, ...], task_name: str = DELIVER_TASK,
    *, eta: datetime | None = None,
) -> TaskMessage:
    """Serialise a call of ``task_name(*args)`` as kombu's Redis transport stores it.

    With ``eta`` (timezone-aware) the worker runs it no earlier than then.
    """
    if eta is None and len(args) == 1 and isinstance(args[0], str) \
            and _PLAIN.match(task_id) and _PLAIN.match(args[0]):
        return _template(celery_app, task_name).fill(task_id, args[0])
    return _build(celery_app, task_id, args, task_name, eta)


def deliver_messages(celery_app: Celery, event_ids: list[str]) -> list[TaskMessage]:
    """The delivery message of each of ``event_ids`` (plain ids, as :func:`new_ids` makes
    them): for a batch, the messages :func:`build_task_message` builds one at a time."""
    template = _template(celery_app, DELIVER_TASK)
    tags = new_ids(len(event_ids))
    return [template.fill(event_id, event_id, tag) for event_id, tag in zip(event_ids, tags)]


# A random UUID (version 4, RFC 4122 variant) is 16 random bytes but for the version in
# the high nibble of byte 6 and the variant in the two high bits of byte 8: these tables
# set them, as uuid.UUID(bytes=..., version=4) does.
_VERSION_4 = bytes(byte & 0x0F | 0x40 for byte in range(256))
_VARIANT = bytes(byte & 0x3F | 0x80 for byte in range(256))


def new_ids(count: int, random_bytes: Callable[[int], bytes] = os.urandom) -> list[str]:
    """``count`` random ids, each as ``str(uuid.uuid4())`` writes it, from one read of the
    system's randomness: ``uuid.uuid4()`` one at a time cost more than the rest of a
    batched event's message (figures in ``bench/README.md``)."""
    raw = bytearray(random_bytes(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    text = raw.hex()
    return [f"{text[i:i + 8]}-{text[i + 8:i + 12]}-{text[i + 12:i + 16]}-{text[i + 16:i + 20]}-"
            f"{text[i + 20:i + 32]}" for i in range(0, 32 * count, 32)]


#: Ids that appear the same in JSON, in ``repr`` and in the template (event ids are UUIDs).
_PLAIN = re.compile(r"[A-Za-z0-9_.:-]{1,200}\Z")
# Placeholders of the template: not _PLAIN, so no real id can contain them.
_TASK_ID, _ARG, _TAG = "@@EF-TASK-ID@@", "@@EF-ARG@@", "@@EF-DELIVERY-TAG@@"


@dataclass(frozen=True)
class _Template:
    """A message of ``task(arg)`` made once by Celery, with placeholders for the per-call values.

    Celery's ``create_task_message`` and the JSON encoding of its result cost more than
    the rest of accepting an event; filling a template gives the same bytes for a
    fraction of it (``tests/test_enqueue.py`` compares the two).
    """

    queue: str
    #: The body's JSON, cut where the argument goes.
    body: list[str]
    #: The message's JSON, cut before and after each placeholder, the placeholders kept:
    #: joined with the values in their place, it is filled in one pass.
    envelope: list[str]

    def fill(self, task_id: str, arg: str, tag: str | None = None) -> TaskMessage:
        body = base64.b64encode(arg.join(self.body).encode()).decode()
        values = {_TASK_ID: task_id, _ARG: arg, _TAG: tag or str(uuid.uuid4()), _BODY: body}
        return TaskMessage(queue=self.queue,
                           payload="".join([values.get(part, part) for part in self.envelope]))


_BODY = "@@EF-BODY@@"
_PLACEHOLDER = re.compile("(" + "|".join(map(re.escape, (_TASK_ID, _ARG, _TAG, _BODY))) + ")")


def _template(celery_app: Celery, task_name: str) -> _Template:
    # One per Celery app and task, made on first use: the app's configuration is final by
    # the time a message is sent.
    templates: dict[str, _Template] = celery_app.__dict__.setdefault("_eventflow_templates", {})
    template = templates.get(task_name)
    if template is None:
        built = json.loads(_build(celery_app, _TASK_ID, (_ARG,), task_name, None).payload)
        body = base64.b64decode(built["body"]).decode()
        built["body"] = _BODY
        built["properties"]["delivery_tag"] = _TAG
        template = templates[task_name] = _Template(
            queue=built["properties"]["delivery_info"]["routing_key"], body=body.split(_ARG),
            envelope=_PLACEHOLDER.split(json.dumps(built)),
        )
    return template


def _build(
    celery_app: Celery, task_id: str, args: tuple[object, ...], task_name: str,
    eta: datetime | None,
) -> TaskMessage:
    """The message made by Celery itself, for any arguments."""
    queue = celery_app.conf.task_default_queue or "celery"
    headers, properties, body, _ = celery_app.amqp.create_task_message(
        task_id, task_name, args, {}, eta=eta, create_sent_event=False, root_id=task_id,
        origin="eventflow-web", ignore_result=bool(celery_app.conf.task_ignore_result),
        time_limit=celery_app.conf.task_time_limit,
        soft_time_limit=celery_app.conf.task_soft_time_limit,
    )
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    properties = dict(properties)
    properties.update(
        delivery_mode=2,
        delivery_info={"exchange": "", "routing_key": queue},
        priority=0,
        body_encoding="base64",
        delivery_tag=str(uuid.uuid4()),
    )
    message = {
        "body": encoded,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return TaskMessage(queue=queue, payload=json.dumps(message))
