"""EventFlow: accept notification events over HTTP and deliver them by email."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from eventflow.admin import admin
from eventflow.api import api
from eventflow.celery_app import celery_init_app
from eventflow.cli import dlq
from eventflow.clock import Clock
from eventflow.doctor import check_deployment
from eventflow.fastpath import init_fast_ingest
from eventflow.mailer import Sender
from eventflow.metrics import init_metrics
from eventflow.openapi import openapi
from eventflow.ops import ops
from eventflow.previews import previews
from eventflow.problems import register_error_handlers
from eventflow.services import Services
from eventflow.settings import Settings
from eventflow.template_cli import templates_cli
from eventflow.throttle import init_throttle

#: Largest request body accepted (413 beyond).
MAX_BODY_BYTES = 64 * 1024


def create_app(
    settings: Settings | None = None,
    test_config: dict[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    sender: Sender | None = None,
) -> Flask:
    """Build the Flask app (and its Celery app) from ``settings`` or the environment."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    check_deployment(settings)  # refuses a Redis that would drop data; warns otherwise
    services = Services.build(settings, clock=clock, sender=sender)
    app.extensions["eventflow"] = services
    for error in services.templates.compile_errors():
        # Not a refusal: the other templates work, and the events that need this one are
        # refused with the same reason (422 at the door, template_error at send time).
        logging.getLogger(__name__).warning("templates: %s", error)
    celery_app = celery_init_app(app, settings)

    register_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(admin)
    app.register_blueprint(ops)
    app.register_blueprint(openapi)
    app.register_blueprint(previews)
    app.cli.add_command(dlq)
    app.cli.add_command(templates_cli)
    init_throttle(app, services.redis, settings)
    init_metrics(app, services.store, celery_app.conf.task_default_queue)
    # Last: it answers plain POST /api/v1/events with what the lines above set up.
    init_fast_ingest(app)
    return app
