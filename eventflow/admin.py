"""``/api/v1/dead-letters``: see why emails failed, replay or delete them (admin keys only).

Every endpoint authenticates first, so a producer key gets ``403`` whatever else is wrong
with its request. The work itself is done by :class:`eventflow.deadletters.DeadLetters`,
which ``flask dlq`` uses too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, request
from marshmallow import Schema, ValidationError, fields, validate

from eventflow.auth import authenticate
from eventflow.deadletters import (
    DeadLetters,
    FilterSchema,
    InvalidCursor,
    ReplayOutcome,
    letter_filter,
)
from eventflow.problems import Problem
from eventflow.services import Services
from eventflow.settings import ApiKey
from eventflow.throttle import enforce

admin = Blueprint("admin", __name__, url_prefix="/api/v1")

#: Largest page of dead letters.
MAX_PAGE = 500


class ListQuerySchema(FilterSchema):
    """``GET /dead-letters``: the filters, a page size and where to continue."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.String(validate=validate.Length(min=1, max=512))


class ReplayQuerySchema(FilterSchema):
    """``POST /dead-letters/replay``: the filters, and whether to only report."""

    dry_run = fields.Boolean(load_default=False)
    limit = fields.Integer(validate=validate.Range(min=1),
                           metadata={"description": "Replay at most this many."})


list_query_schema = ListQuerySchema()
replay_query_schema = ReplayQuerySchema()


def dead_letters() -> DeadLetters:
    services: Services = current_app.extensions["eventflow"]
    return DeadLetters(services.store, current_app.extensions["celery"], services.settings)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None
                  ) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json",
                    headers=dict(headers or {}))


def load_query(schema: Schema, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The query string (and ``extra``) loaded by ``schema``, or a 422 problem."""
    params: dict[str, Any] = {
        name: values[0] if len(values) == 1 else values
        for name, values in request.args.to_dict(flat=False).items()
    }
    params.update(extra or {})
    try:
        return schema.load(params)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise Problem(422, "Some parameters are not valid; see 'errors'.",
                      slug="validation-error", title="Unprocessable Content",
                      errors=exc.messages if isinstance(exc.messages, dict)
                      else {"_schema": exc.messages}) from None


def not_found(event_id: str, service: DeadLetters) -> Problem:
    """404, saying what became of the letter when its audit trail knows."""
    detail = "No dead letter with this id."
    audit = service.audit(event_id)
    if audit:
        last = audit[-1]
        what = last["action"] + (f" ({last['outcome']})" if "outcome" in last else "")
        detail = (f"This event is not in the dead-letter queue; its last dead-letter action "
                  f"was {what} at {last['at']}. See /api/v1/events/{event_id}.")
    return Problem(404, detail, slug="not-found")


def too_busy(outcome: ReplayOutcome) -> Problem:
    """429: the replay schedule (``EVENTFLOW_REPLAY_RATE``) has no room just now."""
    wait = max(1, round(outcome.retry_after or 1))
    return Problem(429, "Replays are paced by EVENTFLOW_REPLAY_RATE and the schedule is full "
                   f"for now; try again in {wait} s.", slug="replay-paced",
                   headers={"Retry-After": str(wait)})



def admin_key() -> ApiKey:
    """The request's admin key (401/403 otherwise), counted by the per-key rate limit."""
    key = authenticate(admin=True)
    enforce(current_app.extensions["throttle"], key)
    return key

@admin.get("/dead-letters")
def list_dead_letters() -> Response:
    """A page of dead letters, newest first, and the cursor of the next page."""
    admin_key()
    params = load_query(list_query_schema)
    try:
        page = dead_letters().page(letter_filter(params), params["limit"], params.get("cursor"))
    except InvalidCursor as exc:
        raise Problem(422, str(exc), slug="validation-error", title="Unprocessable Content",
                      errors={"cursor": [str(exc)]}) from None
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@admin.get("/dead-letters/<event_id>")
def get_dead_letter(event_id: str) -> Response:
    """One dead letter: the event, the failure, its history and its audit trail."""
    admin_key()
    service = dead_letters()
    letter = service.get(event_id)
    if letter is None:
        raise not_found(event_id, service)
    return json_response(letter)


@admin.delete("/dead-letters/<event_id>")
def delete_dead_letter(event_id: str) -> Response:
    """Delete one dead letter: 204 (its audit trail keeps who deleted it)."""
    key = admin_key()
    service = dead_letters()
    if not service.delete(event_id, by=key.name):
        raise not_found(event_id, service)
    return Response(status=204)


@admin.post("/dead-letters/<event_id>/replay")
def replay_dead_letter(event_id: str) -> Response:
    """Queue one dead letter again under the same id: 202."""
    key = admin_key()
    service = dead_letters()
    outcome = service.replay(event_id, by=key.name)
    if outcome.state == "missing":
        raise not_found(event_id, service)
    if outcome.state == "invalid":
        raise Problem(422, "The event no longer passes today's event schema, so it was not "
                      "replayed; it stays in the dead-letter queue. See 'errors'.",
                      slug="replay-invalid", title="Unprocessable Content",
                      errors=outcome.errors)
    if outcome.state == "deferred":
        raise too_busy(outcome)
    return json_response(
        {"id": event_id, "status": "queued", "task_id": outcome.task_id,
         "scheduled_for": outcome.scheduled_for},
        status=202, headers={"Location": f"/api/v1/events/{event_id}"},
    )


@admin.post("/dead-letters/replay")
def replay_dead_letters() -> Response:
    """Replay every matching dead letter (paced), or with ``dry_run`` only report: 202."""
    key = admin_key()
    body: dict[str, Any] = {}
    if request.content_length and request.is_json:
        # The same parameters may come as a JSON object instead of a query string.
        loaded = request.get_json(silent=True)
        if not isinstance(loaded, dict):
            raise Problem(400, "The body, if any, must be a JSON object of parameters.",
                          slug="invalid-json")
        body = loaded
    params = load_query(replay_query_schema, body)
    report = dead_letters().replay_matching(
        letter_filter(params), by=key.name, dry_run=params["dry_run"], limit=params.get("limit")
    )
    headers = {}
    if report.deferred:
        # Some letters wait for room in the replay schedule: say when to ask again.
        headers["Retry-After"] = str(max(1, round(report.retry_after or 1)))
    return json_response(report.as_json(), status=202, headers=headers)
