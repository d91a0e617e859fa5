"""``/api/v1/suppressions`` and ``/api/v1/bounces`` (admin keys only): the suppression list,
and the bounces that come back after a message was taken. The work is done by
:class:`eventflow.suppressions.Suppressions` (which ``flask suppressions`` uses too) and
:mod:`eventflow.bounces`."""

from __future__ import annotations

import logging

from email_validator import EmailNotValidError
from flask import Blueprint, Response, current_app, request
from marshmallow import Schema, ValidationError, fields, validate

from eventflow.admin import admin_key, json_response, load_query
from eventflow.bounces import NotABounce, parse_bounce
from eventflow.problems import Problem
from eventflow.services import Services
from eventflow.statuses import Status, SuppressionReason
from eventflow.suppressions import InvalidCursor, Suppressions

log = logging.getLogger(__name__)

suppressions_api = Blueprint("suppressions", __name__, url_prefix="/api/v1")

#: Largest page of suppressions.
MAX_PAGE = 500
#: Content types a bounce may come as.
BOUNCE_TYPES = ("message/rfc822", "multipart/report")


class SuppressionQuerySchema(Schema):
    """``GET /suppressions``: a page size, where to continue, and a reason to filter by."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.String(validate=validate.Length(min=1, max=512))
    reason = fields.String(validate=validate.OneOf([r.value for r in SuppressionReason]))


class SuppressionRequestSchema(Schema):
    """``POST /suppressions``: an address and why (default ``manual``)."""

    address = fields.String(required=True, validate=validate.Length(min=3, max=254),
                            metadata={"format": "email"})
    reason = fields.String(load_default=SuppressionReason.MANUAL.value,
                           validate=validate.OneOf([r.value for r in SuppressionReason]))


list_query_schema = SuppressionQuerySchema()
add_schema = SuppressionRequestSchema()


def suppressions() -> Suppressions:
    services: Services = current_app.extensions["eventflow"]
    return services.suppressions


def invalid(field: str, message: str) -> Problem:
    return Problem(422, "Some fields are not valid; see 'errors'.", slug="validation-error",
                   title="Unprocessable Content", errors={field: [message]})


@suppressions_api.get("/suppressions")
def list_suppressions() -> Response:
    """A page of the suppression list, in address order, and the next page's cursor."""
    admin_key()
    params = load_query(list_query_schema)
    try:
        page = suppressions().page(params["limit"], params.get("cursor"), params.get("reason"))
    except InvalidCursor as exc:
        raise invalid("cursor", str(exc)) from None
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@suppressions_api.get("/suppressions/<path:address>")
def get_suppression(address: str) -> Response:
    """One entry of the list: 404 when the address is not on it."""
    admin_key()
    entry = suppressions().get(address)
    if entry is None:
        raise Problem(404, "This address is not on the suppression list.", slug="not-found")
    return json_response(entry)


@suppressions_api.delete("/suppressions/<path:address>")
def delete_suppression(address: str) -> Response:
    """Take an address off the list: 204; events to it are sent again."""
    admin_key()
    if not suppressions().delete(address):
        raise Problem(404, "This address is not on the suppression list.", slug="not-found")
    return Response(status=204)


@suppressions_api.post("/suppressions")
def add_suppression() -> Response:
    """Put an address on the list by hand: 201 with the entry."""
    admin_key()
    if not request.is_json:
        raise Problem(415, "Send the body as JSON with Content-Type: application/json.",
                      slug="unsupported-media-type")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Problem(400, "The body must be a JSON object.", slug="invalid-json")
    try:
        data = add_schema.load(body)
    except ValidationError as exc:
        raise Problem(422, "Some fields are not valid; see 'errors'.", slug="validation-error",
                      title="Unprocessable Content",
                      errors=exc.messages if isinstance(exc.messages, dict)
                      else {"_schema": exc.messages}) from None
    try:
        entry = suppressions().add(data["address"], data["reason"])
    except EmailNotValidError as exc:
        raise invalid("address", f"Not a valid email address: {exc}") from None
    return json_response(entry, status=201,
                         headers={"Location": f"/api/v1/suppressions/{entry['address']}"})


@suppressions_api.post("/bounces")
def post_bounce() -> Response:
    """A delivery status notification: its event becomes ``bounced`` and, when the
    failure is permanent, its recipient is suppressed. 202."""
    admin_key()
    if request.mimetype not in BOUNCE_TYPES:
        raise Problem(415, "Send the bounce as it arrived, with Content-Type message/rfc822 "
                      "or multipart/report.", slug="unsupported-media-type")
    raw = request.get_data(cache=False)  # 413 beyond MAX_CONTENT_LENGTH
    if request.mimetype == "multipart/report":
        # The body is the report itself: give the parser its Content-Type header.
        raw = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode() + raw
    services: Services = current_app.extensions["eventflow"]
    try:
        bounce = parse_bounce(raw, services.settings.bounce_address)
    except NotABounce as exc:
        raise Problem(422, str(exc), slug="not-a-bounce", title="Unprocessable Content",
                      errors={"body": [str(exc)]}) from None
    status = None
    if bounce.event_id:
        pending = services.webhooks.expect(bounce.event_id, Status.BOUNCED)
        status = services.store.mark_bounced(bounce.event_id, bounce.details())
        if status == Status.BOUNCED:
            services.webhooks.notify_final(bounce.event_id, Status.BOUNCED, pending)
    suppressed = None
    if bounce.permanent and bounce.recipient:
        try:
            entry = services.suppressions.add(
                bounce.recipient, SuppressionReason.HARD_BOUNCE, event_id=bounce.event_id or "",
                smtp_reply=" ".join(filter(None, (bounce.status, bounce.diagnostic))),
                keep_permanent=True)
            suppressed = entry["address"]
        except EmailNotValidError:
            log.warning("bounce names a recipient that is not an address: %r", bounce.recipient)
    return json_response({"event_id": bounce.event_id, "status": status,
                          "recipient": bounce.recipient, "action": bounce.action,
                          "recipient_status": bounce.status, "diagnostic": bounce.diagnostic,
                          "suppressed": suppressed}, status=202)
