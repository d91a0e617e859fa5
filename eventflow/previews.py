"""``POST /api/v1/templates/<event_type>/preview``: what an event's email would say (admin
keys only), rendered by the very templates the workers use. ``flask templates preview``
answers the same from a shell."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app
from marshmallow import Schema, ValidationError, fields, validate

from eventflow.admin import admin_key
from eventflow.api import json_body
from eventflow.problems import Problem
from eventflow.rendering import (
    LOCALE_PATTERN,
    MAX_DATA_BYTES,
    MAX_LOCALE,
    Rendered,
    TemplateFailed,
    Templates,
    check_data,
    check_locale,
)
from eventflow.schemas import DEFAULT_SUBJECTS, MAX_EMAIL, MAX_MESSAGE, MAX_SUBJECT
from eventflow.services import Services

previews = Blueprint("previews", __name__, url_prefix="/api/v1")


class PreviewPayloadSchema(Schema):
    """The event's other payload fields, for templates that use them (the shipped ones
    send ``payload.message`` under ``payload.subject``)."""

    to_email = fields.String(validate=validate.Length(max=MAX_EMAIL))
    message = fields.String(validate=validate.Length(min=1, max=MAX_MESSAGE))
    subject = fields.String(validate=validate.Length(min=1, max=MAX_SUBJECT))


class PreviewRequestSchema(Schema):
    """What to render the template with: an event's ``data`` and ``locale``."""

    data = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True),
                       load_default=dict, validate=check_data,
                       metadata={"description": "The template's variables, as an event's "
                                 f"payload.data (at most {MAX_DATA_BYTES // 1024} KiB)."})
    locale = fields.String(validate=[validate.Length(min=2, max=MAX_LOCALE), check_locale],
                           metadata={"pattern": LOCALE_PATTERN, "example": "fr-CA"})
    payload = fields.Nested(PreviewPayloadSchema, load_default=dict)


class PreviewSchema(Schema):
    """The rendered email, and which template files made it."""

    subject = fields.String(required=True)
    text = fields.String(required=True)
    html = fields.String(required=True, allow_none=True,
                         metadata={"description": "null when the template has no HTML."})
    template = fields.String(required=True)
    locale = fields.String(required=True, allow_none=True,
                           metadata={"description": "The locale whose files were used."})
    template_version = fields.String(required=True,
                                     metadata={"description": "A hash of the files used."})


preview_request_schema = PreviewRequestSchema()


def preview(templates: Templates, event_type: str, request: dict[str, Any]) -> Rendered:
    """Render ``event_type``'s template as an event with this data would be rendered.

    Raises ``ValidationError`` (a 422) when it does not render, naming what is missing."""
    loaded = preview_request_schema.load(request)
    payload = {**loaded["payload"], "data": loaded["data"]}
    if "locale" in loaded:
        payload["locale"] = loaded["locale"]
    try:
        return templates.render(event_type, loaded["data"], payload,
                                locale=loaded.get("locale"))
    except TemplateFailed as exc:
        raise ValidationError(exc.errors()) from None


@previews.post("/templates/<event_type>/preview")
def preview_template(event_type: str) -> Response:
    """200 with the subject, text and HTML the event type's template renders, or 422."""
    admin_key()
    if event_type not in DEFAULT_SUBJECTS:
        raise Problem(404, f"No event type {event_type!r}; known: "
                      f"{', '.join(sorted(DEFAULT_SUBJECTS))}.", slug="not-found")
    body = json_body()
    services: Services = current_app.extensions["eventflow"]
    try:
        rendered = preview(services.templates, event_type, body)
    except ValidationError as exc:
        raise Problem(422, "The template does not render with this data; see 'errors'.",
                      slug="validation-error", title="Unprocessable Content",
                      errors=exc.messages if isinstance(exc.messages, dict)
                      else {"_schema": exc.messages}) from None
    return Response(json.dumps(rendered.as_dict()), status=200, mimetype="application/json")
