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
