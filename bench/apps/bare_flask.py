"""Baseline (a): a bare Flask JSON POST endpoint, served with the Procfile's ``web`` command.

It parses the JSON body and answers 202 with an id, and does nothing else: the ceiling that
any Flask endpoint under the same server and flags can reach on this machine.
"""

from __future__ import annotations

import uuid

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/api/v1/events")
def create_event() -> tuple[Response, int]:
    """Parse the body and answer as EventFlow does, without validating or storing it."""
    body = request.get_json()
    if not isinstance(body, dict):
        return jsonify(error="expected a JSON object"), 400
    return jsonify(id=uuid.uuid4().hex, status="queued"), 202
