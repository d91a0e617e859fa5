"""``POST /api/v1/events`` for plain requests, answered before Flask's request machinery.

Accepting an event is the hot path of the service, and on a small machine Flask's own
work per request (the request context, routing, the request and response objects, the
hooks) cost as much CPU as everything EventFlow does for the event (measured in
``bench/README.md``). This WSGI middleware, put around the app's
``wsgi_app`` by the app factory (as Flask's documentation does with its own middleware),
answers the plainest and by far the commonest request itself:

- ``POST`` to exactly ``/api/v1/events``, ``Content-Type: application/json``, a
  ``Content-Length`` within the app's limit and no ``Idempotency-Key``;
- a known ``Bearer`` key (:func:`eventflow.auth.bearer_secret`, ``find_key``);
- a body whose event :func:`eventflow.schemas.plain_event` vouches for, and whose
  template renders with it.

It stores the event with the view's own :func:`eventflow.api.accept_event` and answers the
same ``202``, with the same headers and the same HTTP metrics. Everything else goes to the
Flask app unchanged (the body given back as it was read), before anything is counted or
stored: the view then decides and words every refusal. A failure after the accept
script was sent (Redis unreachable, a ``429`` from the script) is answered by the app's
own error handlers and hooks, without sending it again: the script's outcome is not
known, and a second try would store a second event.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from timeit import default_timer
from typing import Any

from flask import Flask
from werkzeug.routing import Rule

from eventflow.api import accept_event
from eventflow.auth import bearer_secret, find_key
from eventflow.metrics import STARTED, HttpMetrics
from eventflow.rendering import TemplateFailed
from eventflow.schemas import plain_event
from eventflow.throttle import Throttle, refusal

#: The one route answered here, and the view that answers it otherwise.
PATH = "/api/v1/events"
ENDPOINT = "api.create_event"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class FastIngest:
    """Answers plain ``POST /api/v1/events`` requests; hands every other one to ``app``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.flask: WSGIApp = app.wsgi_app
        self.services = app.extensions["eventflow"]
        self.limiter: Throttle = app.extensions["throttle"]
        self.celery_app = app.extensions["celery"]
        self.metrics: HttpMetrics | None = app.extensions.get("http_metrics")
        self.max_body: int = app.config["MAX_CONTENT_LENGTH"]
        self.rule: Rule = next(rule for rule in app.url_map.iter_rules()
                               if rule.endpoint == ENDPOINT)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST"
                or environ.get("CONTENT_TYPE") != "application/json"
                or "HTTP_IDEMPOTENCY_KEY" in environ):
            return self.flask(environ, start_response)
        started = default_timer()
        secret = bearer_secret(environ.get("HTTP_AUTHORIZATION", ""))
        key = find_key(self.services.settings.api_keys, secret) if secret else None
        length_text = environ.get("CONTENT_LENGTH", "")
        length = int(length_text) if length_text.isdigit() else 0
        if key is None or not 0 < length <= self.max_body:
            return self.flask(environ, start_response)

        raw = environ["wsgi.input"].read(length)
        event = None
        if len(raw) == length:  # else the client went away: the app says so
            try:
                event = plain_event(json.loads(raw))
                if event is not None:
                    self.services.templates.check_event(event)
            except (ValueError, RecursionError):  # the view words the 400
                pass
            except TemplateFailed:  # the view words the 422
                event = None
        if event is None:
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.flask(environ, start_response)

        try:
            acceptance = accept_event(self.services, self.limiter, self.celery_app, key, event)
        except Exception as exc:  # noqa: BLE001 (answered by the app's handlers, as in the view)
            return self._answer_failure(environ, start_response, started, exc)
        if not acceptance.decision.allowed:
            # (the problem carries the RateLimit-* headers and Retry-After)
            return self._answer_failure(environ, start_response, started,
                                        refusal(self.limiter, acceptance.decision))
        answer, headers = acceptance.answer()
        body = answer.encode()
        start_response("202 ACCEPTED", [*headers.items(), ("Content-Length", str(len(body)))])
        if self.metrics is not None:
            self.metrics.observe("POST", self.rule, 202, started)
        return [body]

    def _answer_failure(
        self, environ: dict[str, Any], start_response: StartResponse, started: float,
        error: Exception,
    ) -> Iterable[bytes]:
        """Answer ``error`` as the view raising it would be: the app's error handlers
        (problem+json, the traceback logged), its ``after_request`` hooks (metrics,
        ``RateLimit-*`` headers) and its teardown."""
        environ[STARTED] = started
        with self.app.request_context(environ):
            try:
                raise error
            except Exception as exc:  # noqa: BLE001 (as Flask's full_dispatch_request does)
                response = self.app.finalize_request(self.app.handle_user_exception(exc))
            return response(environ, start_response)  # type: ignore[no-any-return]


def init_fast_ingest(app: Flask) -> None:
    """Put :class:`FastIngest` in front of ``app`` (after its blueprints and extensions)."""
    app.wsgi_app = FastIngest(app)  # type: ignore[method-assign]
