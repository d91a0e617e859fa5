"""Every error as an RFC 9457 problem document (``application/problem+json``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, json
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from eventflow.store import NotReplicated, not_replicated

log = logging.getLogger(__name__)

#: Seconds a client is told to wait when Redis is full: long enough for an operator's
#: alert or the retention to free memory, short enough not to stall producers for long.
STORAGE_FULL_RETRY_AFTER = 10

PROBLEM_TYPE = "https://eventflow.dev/problems/"


class Problem(Exception):
    """An error to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        errors: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title or HTTP_STATUS_CODES.get(status, "Error")
        self.errors = errors
        self.headers = dict(headers or {})


def problem_response(problem: Problem) -> Response:
    """The HTTP response for ``problem``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + problem.slug if problem.slug else "about:blank",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    response = Response(
        json.dumps(body), status=problem.status, mimetype="application/problem+json"
    )
    response.headers.update(problem.headers)
    return response


_HTTP_DETAILS = {
    400: "The request could not be understood.",
    404: "There is nothing at this URL.",
    405: "This URL does not accept that method.",
    413: "The request body is larger than 64 KiB.",
    415: "The request body must be JSON, sent as Content-Type: application/json.",
}


def register_error_handlers(app: Flask) -> None:
    """Answer every error of ``app``, expected or not, with a problem document."""

    @app.errorhandler(Problem)
    def _problem(problem: Problem) -> Response:
        return problem_response(problem)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        detail = _HTTP_DETAILS.get(status) or exc.description or ""
        return problem_response(Problem(status, detail, headers=headers))

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def _redis_down(exc: Exception) -> Response:
        log.warning("Redis unreachable: %s", exc)
        return problem_response(
            Problem(503, "The event store (Redis) is unreachable; nothing was stored. "
                    "Try again shortly.", slug="store-unavailable", headers={"Retry-After": "5"})
        )

    @app.errorhandler(OutOfMemoryError)
    def _redis_full(exc: Exception) -> Response:
        # maxmemory reached under noeviction: Redis refuses a script or a MULTI block
        # before its first write, so nothing was stored half-way.
        log.warning("Redis is full (maxmemory): %s", exc)
        return problem_response(
            Problem(503, "The event store (Redis) is full; nothing was stored. Try again "
                    "later.", slug="storage-full", title="Storage Full",
                    headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER)})
        )

    @app.errorhandler(NotReplicated)
    @app.errorhandler(ResponseError)
    def _not_replicated(exc: Exception) -> Response:
        if not isinstance(exc, NotReplicated) and not not_replicated(exc):
            return _unexpected(exc)
        log.warning("write not replicated: %s", exc)
        return problem_response(
            Problem(503, "The event store could not confirm the event on enough replicas "
                    "(EVENTFLOW_REDIS_MIN_REPLICAS); it may have been stored. Send it again "
                    "with the same Idempotency-Key.", slug="not-replicated",
                    headers={"Retry-After": "2"})
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Logged with its traceback here, answered without one.
        log.exception("unhandled error")
        return problem_response(Problem(500, "An unexpected error occurred.", slug="internal"))
