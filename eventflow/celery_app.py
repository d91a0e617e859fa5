"""The Celery application, bound to the Flask app (the pattern of Flask's own docs)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import after_setup_logger
from flask import Flask

from eventflow.broker import tolerate_full_redis
from eventflow.settings import Settings


def celery_init_app(app: Flask, settings: Settings) -> Celery:
    """Create the Celery app for ``app``; every task runs inside an app context."""

    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    tolerate_full_redis()  # a full Redis must not stop the worker (eventflow/broker.py)
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object("celeryconfig")
    transport: dict[str, Any] = {
        # A message taken by a worker that died is handed out again after this long.
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": 2,
        "socket_timeout": 10,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        # kombu scans for messages of dead workers every interval * throttle seconds
        # (10 * 10 by default): with a short visibility timeout they would wait far
        # longer than it. Scan every tenth of the timeout (1 to 10 s), every time.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
    }
    if settings.redis_url.startswith("sentinel://"):
        # kombu's Sentinel transport asks the Sentinels of the URL for this master.
        transport["master_name"] = settings.sentinel_master
    # A run may not outlive the visibility timeout, or its message would be handed to a
    # second worker while the first still works on it.
    hard_limit = min(celery_app.conf.task_time_limit, int(settings.visibility_timeout * 0.8))
    celery_app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options=transport,
        task_time_limit=max(hard_limit, 2),
        # Stopping on a PaaS (a dyno restart sends SIGTERM to every process, then SIGKILL
        # some seconds later): the Procfile sets REMAP_SIGTERM=SIGQUIT so that the pool
        # processes ignore that SIGTERM instead of dying mid-send, and the main process
        # starts a soft shutdown: it stops taking messages, gives the tasks in hand this
        # long to finish, then puts every unacknowledged message back in the queue.
        # Keep it below the platform's grace period (Heroku: 30 s).
        worker_soft_shutdown_timeout=settings.worker_shutdown_timeout,
        # ... also when no task is running: a worker holding only messages that wait for
        # their retry time (ETA) takes that time to put them back before it exits
        # (Celery's remedy for ETA messages lost at teardown: celery/celery#9231).
        worker_enable_soft_shutdown_on_idle=settings.worker_shutdown_timeout > 0,
        task_soft_time_limit=max(min(celery_app.conf.task_soft_time_limit, hard_limit - 1), 1),
    )
    from eventflow.enqueue import DELIVER_TASK
    from tasks.delivery import retry_policy

    # The delivery task's retries, from the settings (read when the task is bound).
    celery_app.conf.task_annotations = {DELIVER_TASK: retry_policy(settings)}
    celery_app.conf.update(app.config.get("CELERY", {}))
    celery_app.set_default()
    celery_app.flask_app = app  # type: ignore[attr-defined]
    app.extensions["celery"] = celery_app
    # The status webhooks' tasks go to this app's queue.
    app.extensions["eventflow"].webhooks.celery_app = celery_app
    # Register the tasks and the signal handlers that record dead letters.
    import tasks  # noqa: F401
    from tasks.delivery import StalledEventSweep

    celery_app.steps["worker"].add(StalledEventSweep)

    return celery_app


@after_setup_logger.connect
def keep_the_ready_line(logger: logging.Logger | None = None, **kwargs: Any) -> None:
    """At ``--loglevel=WARNING`` (the Procfile's: a line per task costs throughput,
    ``bench/README.md``), still say "<hostname> ready." once the worker consumes, as at INFO: the
    dev stack, the tests and operators wait for that line."""
    ready_logger = logging.getLogger("celery.apps.worker")
    if ready_logger.getEffectiveLevel() > logging.INFO:
        ready_logger.setLevel(logging.INFO)
