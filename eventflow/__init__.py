"""EventFlow: accept notification events over HTTP and deliver them by email."""

from __future__ import annotations

import io
import logging
from typing import Any

from flask import Flask, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

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
from eventflow.schemas import allow_special_use_domains
from eventflow.services import Services
from eventflow.settings import Settings
from eventflow.suppressions_api import suppressions_api
from eventflow.suppressions_cli import suppressions_cli
from eventflow.template_cli import templates_cli
from eventflow.throttle import init_throttle

#: Largest request body accepted (413 beyond).
MAX_BODY_BYTES = 64 * 1024
#: How much of a chunked body over the limit is read and dropped before the 413, so that
#: a client still sending reads the answer instead of a broken connection.
DRAIN_BYTES = 1024 * 1024


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
    allow_special_use_domains(settings.allow_special_use_domains)
    services = Services.build(settings, clock=clock, sender=sender)
    app.extensions["eventflow"] = services
    for error in services.templates.compile_errors():
        # Not a refusal: the other templates work, and the events that need this one are
        # refused with the same reason (422 at the door, template_error at send time).
        logging.getLogger(__name__).warning("templates: %s", error)
    celery_app = celery_init_app(app, settings)

    register_error_handlers(app)
    app.before_request(refuse_long_streamed_body)
    app.register_blueprint(api)
    app.register_blueprint(admin)
    app.register_blueprint(suppressions_api)
    app.register_blueprint(ops)
    app.register_blueprint(openapi)
    app.register_blueprint(previews)
    app.cli.add_command(dlq)
    app.cli.add_command(templates_cli)
    app.cli.add_command(suppressions_cli)
    init_throttle(app, services.redis, settings)
    init_metrics(app, services.store, celery_app.conf.task_default_queue)
    # Last: it answers plain POST /api/v1/events with what the lines above set up.
    init_fast_ingest(app)
    app.wsgi_app = TrustedProxies(  # type: ignore[method-assign]
        app.wsgi_app, settings.forwarded_allow_ips)
    return app


class TrustedProxies:
    """Believe ``X-Forwarded-For``/``-Proto`` from the peers in ``FORWARDED_ALLOW_IPS``
    only, as gunicorn did, through granian's own wrapper.

    The wrapper is made at the first request: a Celery worker builds this app too but
    serves no request, and importing granian loads its whole server into each of its
    processes (what that costs: bench/README.md, "Where issue 17 ends").
    """

    def __init__(self, wsgi_app: Any, allowed: str) -> None:
        self.wsgi_app = wsgi_app
        self.allowed = allowed
        self.wrapped: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.wrapped is None:  # two threads may both make it: the same wrapper
            from granian.utils.proxies import wrap_wsgi_with_proxy_headers

            self.wrapped = wrap_wsgi_with_proxy_headers(self.wsgi_app, self.allowed)
        return self.wrapped(environ, start_response)


def refuse_long_streamed_body() -> None:
    """Answer ``413`` for a chunked body over the limit, as for a declared one.

    Without a ``Content-Length`` werkzeug's reader stops at ``MAX_CONTENT_LENGTH`` and
    gives the first 64 KiB as if they were the whole body (a ``400`` for cut JSON). So
    such a body is read here, one byte past the limit at most, and kept for the view.
    """
    environ = request.environ
    if "CONTENT_LENGTH" in environ or "wsgi.input_terminated" not in environ:
        return  # declared (werkzeug checks it), or a server that does not end the stream
    limit: int = current_app.config["MAX_CONTENT_LENGTH"]
    raw = environ["wsgi.input"].read(limit + 1)
    if len(raw) > limit:
        drained = 0
        while drained < DRAIN_BYTES and (chunk := environ["wsgi.input"].read(64 * 1024)):
            drained += len(chunk)
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(raw)
