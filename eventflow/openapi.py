"""``GET /api/v1/openapi.json``: the OpenAPI 3 document of the API.

The request bodies are described by the very marshmallow schemas that validate them
(``eventflow.schemas``), through apispec's ``MarshmallowPlugin``, so the document cannot
drift from what the API accepts. The answers are described by the schemas below. Each
operation is listed here once, by its Flask rule; ``tests/test_openapi.py`` checks that
every route the app registers is documented and fuzzes the app against this document.
"""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app, json
from marshmallow import INCLUDE, Schema, fields, validate

from eventflow.admin import ListQuerySchema, ReplayQuerySchema
from eventflow.deadletters import ERROR_TYPES
from eventflow.previews import PreviewRequestSchema, PreviewSchema
from eventflow.schemas import DEFAULT_SUBJECTS, AcceptedSchema, BatchSchema, EventSchema
from eventflow.statuses import Status, SuppressionReason
from eventflow.suppressions_api import SuppressionQuerySchema, SuppressionRequestSchema

openapi = Blueprint("openapi", __name__, url_prefix="/api/v1")

OPENAPI_VERSION = "3.0.3"
STATUSES = tuple(Status)


# -- what the API answers ------------------------------------------------------------------


class ProblemSchema(Schema):
    """An RFC 9457 problem document: every error the API answers."""

    class Meta:
        unknown = INCLUDE  # RFC 9457 allows extension members

    type = fields.String(required=True, metadata={"example": "https://eventflow.dev/problems/validation-error"})
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Per-field messages (validation failures)."})


class HistoryEntrySchema(Schema):
    """One step of an event: accepted, an attempt, the rate-limit decision, delivered..."""

    class Meta:
        unknown = INCLUDE  # each step carries its own details (SMTP reply, error...)

    step = fields.String(required=True)
    at = fields.DateTime(required=True)


class EventViewSchema(Schema):
    """An event, its status and its whole history."""

    id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    user_id = fields.String(required=True)
    event_type = fields.String(required=True, validate=validate.OneOf(sorted(DEFAULT_SUBJECTS)))
    producer = fields.String(required=True, metadata={"description": "Name of the key that sent it."})
    attempts = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)
    delivered_at = fields.DateTime(required=True, allow_none=True)
    history = fields.List(fields.Nested(HistoryEntrySchema), required=True)


class BatchResultSchema(Schema):
    """One event of a batch: ``{"id", "status": "queued"}`` or ``{"status": 422, "errors"}``."""

    id = fields.String()
    status = fields.Raw(required=True, metadata={"oneOf": [
        {"type": "string", "enum": ["queued"]}, {"type": "integer", "enum": [422]}]})
    errors = fields.Dict()


class BatchResultsSchema(Schema):
    results = fields.List(fields.Nested(BatchResultSchema), required=True)


class DeadLetterSchema(Schema):
    """An event that could not be delivered, with the reason."""

    class Meta:
        unknown = INCLUDE

    id = fields.String(required=True, metadata={"description": "The event id."})
    event = fields.Dict(required=True, metadata={"description": "The event as accepted."})
    error_type = fields.String(required=True, validate=validate.OneOf(ERROR_TYPES))
    error = fields.String(required=True)
    attempts = fields.Integer(required=True)
    failed_at = fields.DateTime(required=True)


class DeadLetterPageSchema(Schema):
    items = fields.List(fields.Nested(DeadLetterSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class ReplayQueuedSchema(Schema):
    """A dead letter queued again, under its own id."""

    id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["queued"]))
    task_id = fields.String(required=True, allow_none=True)
    scheduled_for = fields.DateTime(required=True, allow_none=True,
                                    metadata={"description": "When paced by EVENTFLOW_REPLAY_RATE."})


class ReplayReportSchema(Schema):
    """What a bulk replay did (or, with ``dry_run``, would do)."""

    replayed = fields.Integer(required=True)
    dry_run = fields.Boolean(required=True)
    ids = fields.List(fields.String(), required=True)
    rejected = fields.List(fields.Dict(), required=True,
                           metadata={"description": "Letters that fail today's schema."})
    skipped = fields.List(fields.String(), required=True)
    deferred = fields.Integer(required=True)
    retry_after = fields.Float(required=True, allow_none=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class EventCountsSchema(Schema):
    accepted = fields.Integer(required=True)
    delivered = fields.Integer(required=True)
    retried = fields.Integer(required=True)
    rate_limited = fields.Integer(required=True)
    dead_lettered = fields.Integer(required=True)
    suppressed = fields.Integer(required=True)
    bounced = fields.Integer(required=True)


class SuppressionSchema(Schema):
    """An address on the suppression list: events to it end ``suppressed``, unsent."""

    address = fields.String(required=True, metadata={
        "description": "Normalised (email-validator) and lower-cased."})
    reason = fields.String(required=True,
                           validate=validate.OneOf([r.value for r in SuppressionReason]))
    created_at = fields.DateTime(required=True)
    expires_at = fields.DateTime(required=True, allow_none=True, metadata={
        "description": "Hard bounces only (EVENTFLOW_SUPPRESSION_TTL); null: never."})
    event_id = fields.String(required=True, allow_none=True,
                             metadata={"description": "The event whose refusal added it."})
    smtp_reply = fields.String(required=True, allow_none=True)


class SuppressionPageSchema(Schema):
    items = fields.List(fields.Nested(SuppressionSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class BounceResultSchema(Schema):
    """What a posted bounce said and did."""

    event_id = fields.String(required=True, allow_none=True,
                             metadata={"description": "The event it names (VERP), if any."})
    status = fields.String(required=True, allow_none=True, metadata={
        "description": "The event's status after: bounced (null: unknown event)."})
    recipient = fields.String(required=True)
    action = fields.String(required=True)
    recipient_status = fields.String(required=True,
                                     metadata={"description": "RFC 3463 code, e.g. 5.1.1."})
    diagnostic = fields.String(required=True)
    suppressed = fields.String(required=True, allow_none=True,
                               metadata={"description": "The address suppressed, if any."})


class StatsSchema(Schema):
    events = fields.Nested(EventCountsSchema, required=True)
    queue_depth = fields.Integer(required=True)
    dead_letters = fields.Integer(required=True)


# -- the operations ------------------------------------------------------------------------

_PROBLEM = {"application/problem+json": {"schema": "ProblemSchema"}}
_RATE_HEADERS = {
    "RateLimit-Limit": {"$ref": "#/components/headers/RateLimit-Limit"},
    "RateLimit-Remaining": {"$ref": "#/components/headers/RateLimit-Remaining"},
    "RateLimit-Reset": {"$ref": "#/components/headers/RateLimit-Reset"},
}
_ERRORS = {
    400: "The body is not valid JSON.",
    401: "No key, an unknown key, or no keys configured on the server.",
    403: "The key is not an admin key.",
    404: "Unknown (or another producer's) event; an unknown event type.",
    409: "A request with this Idempotency-Key is still being processed.",
    413: "The body is larger than 64 KiB.",
    415: "The body is not sent as application/json.",
    422: "The request does not match the schema, or the event type's template does not "
         "render with its data (see `errors`: `errors.payload.data` names the missing "
         "variable).",
    429: "Over EVENTFLOW_API_RATE_LIMIT for this key; see Retry-After.",
    500: "An unexpected error.",
    503: "Redis is unreachable; nothing was stored.",
}


def _problems(*statuses: int) -> dict[int, Any]:
    answers: dict[int, Any] = {}
    for status in statuses:
        answer: dict[str, Any] = {"description": _ERRORS[status], "content": _PROBLEM}
        if status == 429:
            answer["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"},
                                 **_RATE_HEADERS}
        if status in (401,):
            answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        answers[status] = answer
    return answers


def _json(schema: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}, **extra}


_IDEMPOTENCY = {
    "in": "header", "name": "Idempotency-Key", "required": False,
    "description": "The same key from the same producer within 24 h answers the first "
                   "response again; nothing is sent twice.",
    # Printable characters, as ``api.idempotency_header`` checks (headers are Latin-1).
    "schema": {"type": "string", "minLength": 1, "maxLength": 255,
               "pattern": r"^[\x20-\x7e\xa1-\xac\xae-\xff]+$"},
}
_KEYED: list[dict[str, list[str]]] = [{"bearer": []}]

#: Every operation, by Flask rule and method.
OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "/api/v1/events": {"post": {
        "summary": "Accept one event for delivery", "tags": ["events"], "security": _KEYED,
        "parameters": [_IDEMPOTENCY],
        "requestBody": {"required": True, "content": {"application/json": {"schema": EventSchema}}},
        "responses": {
            202: _json("AcceptedSchema", "Stored durably and queued.",
                       headers={"Location": {"schema": {"type": "string"}}, **_RATE_HEADERS}),
            **_problems(400, 401, 409, 413, 415, 422, 429, 500, 503),
        },
    }},
    "/api/v1/events/batch": {"post": {
        "summary": "Accept up to 500 events, each validated and stored on its own",
        "tags": ["events"], "security": _KEYED, "parameters": [_IDEMPOTENCY],
        "requestBody": {"required": True, "content": {"application/json": {"schema": BatchSchema}}},
        "responses": {
            207: _json("BatchResultsSchema", "One result per event, in the order given.",
                       headers=_RATE_HEADERS),
            **_problems(400, 401, 409, 413, 415, 422, 429, 500, 503),
        },
    }},
    "/api/v1/events/<uuid:event_id>": {"get": {
        "summary": "The status of an event and its history", "tags": ["events"],
        "security": _KEYED,
        "responses": {200: _json("EventViewSchema", "The event.", headers=_RATE_HEADERS),
                      **_problems(401, 404, 429, 500, 503)},
    }},
    # admin.py: the query parameters are its own marshmallow schemas, expanded by apispec.
    "/api/v1/dead-letters": {"get": {
        "summary": "Dead letters, newest first", "tags": ["dead letters"], "security": _KEYED,
        "parameters": [{"in": "query", "schema": ListQuerySchema}],
        "responses": {200: _json("DeadLetterPageSchema", "A page of dead letters."),
                      **_problems(401, 403, 422, 500, 503)},
    }},
    "/api/v1/dead-letters/<event_id>": {
        "get": {
            "summary": "One dead letter, with its history and audit trail",
            "tags": ["dead letters"], "security": _KEYED,
            "responses": {200: _json("DeadLetterSchema", "The dead letter."),
                          **_problems(401, 403, 404, 500, 503)},
        },
        "delete": {
            "summary": "Delete a dead letter", "tags": ["dead letters"], "security": _KEYED,
            "responses": {204: {"description": "Deleted."},
                          **_problems(401, 403, 404, 500, 503)},
        },
    },
    "/api/v1/dead-letters/<event_id>/replay": {"post": {
        "summary": "Queue a dead letter again", "tags": ["dead letters"], "security": _KEYED,
        "responses": {202: _json("ReplayQueuedSchema", "Queued again.",
                                 headers={"Location": {"schema": {"type": "string"}}}),
                      **_problems(401, 403, 404, 422, 429, 500, 503)},
    }},
    "/api/v1/dead-letters/replay": {"post": {
        "summary": "Queue again every dead letter that matches the filters",
        "tags": ["dead letters"], "security": _KEYED,
        # (admin.py also takes these as a JSON body; the query string is the documented form)
        "parameters": [{"in": "query", "schema": ReplayQuerySchema}],
        "responses": {202: _json("ReplayReportSchema", "What was (or would be) replayed.",
                                 headers={"Retry-After": {
                                     "$ref": "#/components/headers/Retry-After"}}),
                      **_problems(400, 401, 403, 422, 500, 503)},
    }},
    # suppressions_api.py
    "/api/v1/suppressions": {
        "get": {
            "summary": "Suppressed addresses, in address order", "tags": ["suppressions"],
            "security": _KEYED,
            "parameters": [{"in": "query", "schema": SuppressionQuerySchema}],
            "responses": {200: _json("SuppressionPageSchema", "A page of the list."),
                          **_problems(401, 403, 422, 429, 500, 503)},
        },
        "post": {
            "summary": "Suppress an address by hand", "tags": ["suppressions"],
            "security": _KEYED,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": SuppressionRequestSchema}}},
            "responses": {201: _json("SuppressionSchema", "On the list.",
                                     headers={"Location": {"schema": {"type": "string"}}}),
                          **_problems(400, 401, 403, 413, 415, 422, 429, 500, 503)},
        },
    },
    "/api/v1/suppressions/<path:address>": {
        "get": {
            "summary": "One suppressed address", "tags": ["suppressions"], "security": _KEYED,
            "responses": {200: _json("SuppressionSchema", "The entry."),
                          **_problems(401, 403, 404, 429, 500, 503)},
        },
        "delete": {
            "summary": "Take an address off the list", "tags": ["suppressions"],
            "security": _KEYED,
            "responses": {204: {"description": "Deleted."},
                          **_problems(401, 403, 404, 429, 500, 503)},
        },
    },
    "/api/v1/bounces": {"post": {
        "summary": "A bounce that came back later (a delivery status notification)",
        "tags": ["suppressions"], "security": _KEYED,
        "requestBody": {"required": True, "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("message/rfc822", "multipart/report")}},
        "responses": {202: _json("BounceResultSchema", "Read: the event it names is bounced, "
                                 "the address suppressed when the failure is permanent."),
                      **_problems(401, 403, 413, 415, 422, 429, 500, 503)},
    }},
    "/api/v1/templates/<event_type>/preview": {"post": {
        "summary": "Render an event type's email with this data, as a worker would",
        "tags": ["templates"], "security": _KEYED,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": PreviewRequestSchema}}},
        "responses": {200: _json("PreviewSchema", "The subject, text and HTML (null when "
                                 "the template has none)."),
                      **_problems(400, 401, 403, 404, 413, 415, 422, 429, 500, 503)},
    }},
    "/health": {"get": {
        "summary": "Whether the service and Redis answer", "tags": ["operations"],
        "security": [],
        "responses": {200: _json("HealthSchema", "Healthy."),
                      503: _json("HealthSchema", "Redis is unreachable."),
                      **_problems(500)},
    }},
    "/stats": {"get": {
        "summary": "Pipeline counters", "tags": ["operations"], "security": [],
        "responses": {200: _json("StatsSchema", "The counters."), **_problems(500, 503)},
    }},
    "/metrics": {"get": {
        "summary": "Prometheus metrics", "tags": ["operations"], "security": [],
        "responses": {200: {"description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                      **_problems(500)},
    }},
    "/api/v1/openapi.json": {"get": {
        "summary": "This document", "tags": ["operations"], "security": [],
        "responses": {200: {"description": "The OpenAPI 3 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}


def openapi_path(rule: str) -> str:
    """``/events/<event_id>`` as OpenAPI writes it: ``/events/{event_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def build_spec() -> dict[str, Any]:
    """The OpenAPI document, as a dict."""
    spec = APISpec(
        title="EventFlow", version="1.0.0", openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin()],
        info={"description": "Accept notification events over HTTP and deliver them by email."},
        security=[{"bearer": []}],
    )
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer",
                   "description": "A key of EVENTFLOW_API_KEYS (or EVENTFLOW_ADMIN_KEYS for "
                                  "the dead-letter endpoints)."})
    headers = {
        "RateLimit-Limit": "Requests allowed per window (EVENTFLOW_API_RATE_LIMIT).",
        "RateLimit-Remaining": "Requests left before 429.",
        "RateLimit-Reset": "Seconds until the full allowance is back.",
        "Retry-After": "Seconds to wait before trying again.",
    }
    for name, description in headers.items():
        spec.components.header(name, {"description": description,
                                      "schema": {"type": "integer", "minimum": 0}})
    for schema in (ProblemSchema, AcceptedSchema, EventViewSchema, BatchResultsSchema,
                   DeadLetterSchema, DeadLetterPageSchema, ReplayQueuedSchema,
                   ReplayReportSchema, HealthSchema,
                   StatsSchema, PreviewSchema, SuppressionSchema, SuppressionPageSchema,
                   BounceResultSchema):
        spec.components.schema(schema.__name__.removesuffix("Schema"), schema=schema)
    for rule, operations in OPERATIONS.items():
        parameters = [
            {"in": "path", "name": name, "required": True,
             "schema": {"type": "string", "format": "uuid"} if converter == "uuid:"
             else {"type": "string", "enum": sorted(DEFAULT_SUBJECTS)}
             if name == "event_type" else {"type": "string"}}
            for converter, name in re.findall(r"<([^:<>]+:)?([^<>]+)>", rule)
        ]
        spec.path(path=openapi_path(rule), operations=operations, parameters=parameters)
    document = spec.to_dict()
    # A payload carries a message, data for its template, or both (PayloadSchema's rule).
    document["components"]["schemas"]["Payload"]["anyOf"] = [
        {"required": ["message"]}, {"required": ["data"]}]
    return document


def document(app: Flask) -> str:
    """The document as JSON, built once per app."""
    cached: str | None = app.extensions.get("openapi")
    if cached is None:
        cached = app.extensions["openapi"] = json.dumps(build_spec())
    return cached


@openapi.get("/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI 3 document of this API; no key needed."""
    return Response(document(current_app), mimetype="application/json")
