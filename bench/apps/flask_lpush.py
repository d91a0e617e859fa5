"""Reference: the bare Flask app plus one Redis round trip, served like the baseline.

It parses the JSON body, pushes it onto a Redis list with redis-py (one ``LPUSH``) and
answers 202 with an id. Next to the bare app it measures what a single round trip to
Redis costs under the Procfile's ``web`` server on this machine: the least that storing
an event durably costs, before any key check, validation or record keeping.
"""

from __future__ import annotations

import json
import os
import uuid

import redis
from flask import Flask, Response, jsonify, request

#: The list the reference pushes events onto (in the benchmark's database).
QUEUE_KEY = "bench:flask-lpush:events"

app = Flask(__name__)
client = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.post("/api/v1/events")
def create_event() -> tuple[Response, int]:
    """Parse the body, push it, and answer as the bare app does."""
    body = request.get_json()
    if not isinstance(body, dict):
        return jsonify(error="expected a JSON object"), 400
    client.lpush(QUEUE_KEY, json.dumps(body))
    return jsonify(id=uuid.uuid4().hex, status="queued"), 202
