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
import re
import uuid
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
    body: str
    envelope: str

    def fill(self, task_id: str, arg: str) -> TaskMessage:
        body = base64.b64encode(self.body.replace(_ARG, arg).encode()).decode()
        payload = (self.envelope.replace(_TASK_ID, task_id).replace(_ARG, arg)
                   .replace(_TAG, str(uuid.uuid4()), 1).replace(_BODY, body, 1))
        return TaskMessage(queue=self.queue, payload=payload)


_BODY = "@@EF-BODY@@"


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
            queue=built["properties"]["delivery_info"]["routing_key"], body=body,
            envelope=json.dumps(built),
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
