"""``/api/v1/events``: accept events from producers and tell them what became of them."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery
from flask import Blueprint, Response, current_app, request
from marshmallow import ValidationError

from eventflow.auth import authenticate
from eventflow.enqueue import build_task_message, deliver_messages, new_ids
from eventflow.problems import Problem
from eventflow.rendering import TemplateFailed, Templates
from eventflow.schemas import load_batch, load_event
from eventflow.services import Services
from eventflow.settings import ApiKey
from eventflow.store import Accepted, idempotency_key
from eventflow.store.base import event_view
from eventflow.throttle import Decision, Throttle, apply_decision, enforce

api = Blueprint("api", __name__, url_prefix="/api/v1")

#: Longest ``Idempotency-Key`` accepted.
MAX_IDEMPOTENCY_KEY = 255



def services() -> Services:
    return current_app.extensions["eventflow"]  # type: ignore[no-any-return]


def throttle() -> Throttle:
    return current_app.extensions["throttle"]  # type: ignore[no-any-return]


def json_body() -> Any:
    """The request's JSON, or a 415/400 problem."""
    if request.mimetype != "application/json":
        raise Problem(415, "Send the body as JSON with Content-Type: application/json.",
                      slug="unsupported-media-type")
    raw = request.get_data(cache=False)  # raises 413 beyond MAX_CONTENT_LENGTH
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, f"The body is not valid JSON: {exc}", slug="invalid-json") from None
    except RecursionError:
        raise Problem(400, "The body's JSON is nested too deeply.", slug="invalid-json") from None


def validation_problem(errors: Any) -> Problem:
    return Problem(422, "The event does not match the schema; see 'errors'.",
                   slug="validation-error", title="Unprocessable Content",
                   errors=errors if isinstance(errors, dict) else {"_schema": errors})


def check_renders(templates: Templates, event: dict[str, Any]) -> None:
    """Refuse (as a ``ValidationError``) an event whose template does not render with its
    data: the producer hears of a missing variable now, not its user of a hole later."""
    try:
        templates.check_event(event)
    except TemplateFailed as exc:
        raise ValidationError(exc.errors()) from None


def idempotency_header() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise Problem(
            422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters.",
            slug="validation-error", errors={"Idempotency-Key": ["Invalid value."]},
        )
    return key


def fingerprint(body: Any) -> str:
    """What makes two requests "the same" for an ``Idempotency-Key``."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def remembered_response(stored: str, expected_fingerprint: str) -> Response:
    """Answer again what was answered to the first request with this key."""
    first_fingerprint, _, response = stored.partition("\n")
    if first_fingerprint == "pending":
        raise Problem(409, "A request with this Idempotency-Key is still being processed.",
                      slug="idempotency-conflict", headers={"Retry-After": "1"})
    if first_fingerprint != expected_fingerprint:
        raise Problem(422, "This Idempotency-Key was used with a different body.",
                      slug="idempotency-mismatch")
    status, _, body = response.partition(" ")
    answer = Response(body, status=int(status), mimetype="application/json")
    answer.headers["Idempotent-Replayed"] = "true"
    if int(status) == 202:
        answer.headers["Location"] = f"/api/v1/events/{json.loads(body)['id']}"
    return answer


@dataclass(frozen=True)
class Acceptance:
    """What became of one valid event: the accept script's verdict and the answer parts."""

    event_id: str
    accepted: Accepted
    decision: Decision
    #: The JSON answer before and after the figure of the quota left.
    before: str
    after: str
    quota_limit: int
    #: The body's fingerprint, when an ``Idempotency-Key`` came with it.
    fingerprint: str = ""

    def answer(self) -> tuple[str, dict[str, str]]:
        """The body and headers of the ``202``."""
        headers = self.decision.headers()
        headers["Content-Type"] = "application/json"
        headers["Location"] = f"/api/v1/events/{self.event_id}"
        left = max(self.quota_limit - self.accepted.quota_used, 0)
        return f"{self.before}{left}{self.after}", headers


def accept_event(
    svc: Services, limiter: Throttle, celery_app: Celery, key: ApiKey, event: dict[str, Any],
    idem: str | None = None,
) -> Acceptance:
    """Count the request, read the user's quota and store ``event`` with its delivery task,
    in one round trip (or find the first answer to ``idem``). Shared by the view and by
    :class:`eventflow.fastpath.FastIngest`."""
    event_id = str(uuid.uuid4())
    # The quota is used at send time, by the worker: the answer says what is left right
    # now, before this event and any other still queued for the user are sent. It is read
    # by the accept script, which also remembers the answer for an Idempotency-Key: so the
    # answer is made of the parts around that figure.
    before, after = limiter.answer_parts(event_id)
    remember = None
    expected = ""
    if idem is not None:
        expected = fingerprint(event)
        remember = (idempotency_key(key.name, idem), f"{expected}\n202 {before}", after)
    message = build_task_message(celery_app, event_id, (event_id,))
    accepted = svc.store.accept(event_id, event, key.name, message, remember,
                                throttle=limiter.args(key))
    return Acceptance(event_id, accepted, limiter.decision(accepted), before, after,
                      limiter.quota.count, expected)


@api.post("/events")
def create_event() -> Response:
    """Validate one event, store it with its delivery task, and answer 202.

    Plain requests (no ``Idempotency-Key``, an event that is plainly valid) are answered
    before they reach Flask's routing, by :class:`eventflow.fastpath.FastIngest`, with the
    same :func:`accept_event`; this view answers all the others.
    """
    key = authenticate()
    body = json_body()
    limiter = throttle()
    try:
        idem = idempotency_header()
        event = load_event(body)
        check_renders(services().templates, event)
    except (Problem, ValidationError) as exc:
        # A refused event is counted against the API rate limit too (429 first if over),
        # in a round trip of its own: only accepted events are counted by the accept script.
        enforce(limiter, key)
        if isinstance(exc, ValidationError):
            raise validation_problem(exc.messages) from None
        raise

    acceptance = accept_event(services(), limiter, current_app.extensions["celery"], key,
                              event, idem)
    prior = acceptance.accepted.prior
    if not acceptance.decision.allowed or prior is not None:
        apply_decision(limiter, acceptance.decision)  # 429, or the first answer's headers
    if prior is not None:
        return remembered_response(prior, acceptance.fingerprint)
    answer, headers = acceptance.answer()
    return Response(answer, status=202, headers=headers)


@api.post("/events/batch")
def create_events() -> Response:
    """Validate and store up to 500 events, each on its own: 207 with a result per event."""
    key = authenticate()
    enforce(throttle(), key)
    body = json_body()
    idem = idempotency_header()
    try:
        batch = load_batch(body)
    except ValidationError as exc:
        raise validation_problem(exc.messages) from None

    svc = services()
    templates = svc.templates
    # Each result as JSON at once: json.dumps of a dict per event cost more than the rest
    # of its result. Event ids are UUIDs, which JSON writes as they are.
    results: list[str] = []
    valid: list[tuple[str, dict[str, Any]]] = []
    # The ids of a whole batch at once: uuid.uuid4() one at a time cost more than the
    # rest of an event's id and message (bench/README.md).
    ids = iter(new_ids(len(batch["events"])))
    for item in batch["events"]:
        try:
            event = load_event(item)
            check_renders(templates, event)
        except ValidationError as exc:
            results.append(json.dumps({"status": 422, "errors": exc.messages}))
            continue
        event_id = next(ids)
        valid.append((event_id, event))
        results.append(f'{{"id": "{event_id}", "status": "queued"}}')
    messages = deliver_messages(current_app.extensions["celery"],
                                [event_id for event_id, _ in valid])
    answer = '{"results": [' + ", ".join(results) + "]}"
    remember = None
    expected = ""
    if idem is not None:
        expected = fingerprint(body)
        remember = (idempotency_key(key.name, "batch:" + idem), f"{expected}\n207 {answer}")
    # All or nothing, in one script, with the answer to the Idempotency-Key: a batch cut
    # short (a lost connection, a killed process) stores none of its events and leaves
    # the key free, so the producer can send it again without duplicates; a duplicate
    # that comes after it gets its answer, never a copy.
    prior = svc.store.accept_batch(
        [(event_id, event, message) for (event_id, event), message in zip(valid, messages)],
        key.name, remember)
    if prior is not None:
        return remembered_response(prior, expected)
    return Response(answer, status=207, mimetype="application/json")


# Event ids are UUIDs: typed, so that GET /events/batch is no route rather than an id.
@api.get("/events/<uuid:event_id>")
def get_event(event_id: uuid.UUID) -> Response:
    """The event's status and its whole history."""
    key = authenticate()
    enforce(throttle(), key)
    record, history = services().store.get_with_history(str(event_id))
    if not record or (not key.admin and record.get("producer") != key.name):
        # Another producer's event is answered as unknown: its existence is not shared.
        raise Problem(404, "No event with this id.", slug="not-found")
    view = event_view(record)
    view["history"] = history
    return Response(json.dumps(view), status=200, mimetype="application/json")
