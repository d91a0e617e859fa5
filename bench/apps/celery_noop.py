"""Baseline (d): a bare Celery no-op task, drained by the Procfile's ``worker`` command.

It uses the project's own ``celeryconfig`` (acks late, prefetch 1, JSON) and the same
broker, so the only difference from EventFlow's worker is the work inside the task.
"""

from __future__ import annotations

import os

from celery import Celery

#: Name under which the harness enqueues the no-op task.
NOOP_TASK = "bench.noop"

celery_app = Celery("bench_noop")
celery_app.config_from_object("celeryconfig")
celery_app.conf.broker_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")


@celery_app.task(name=NOOP_TASK)
def noop(event_id: str) -> None:
    """Do nothing: the cost measured is Celery's own (fetch, decode, ack)."""
