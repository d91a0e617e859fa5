"""Baseline (b): the hobby project's design, the peer a user might pick instead.

FastAPI + pydantic + one asynchronous LPUSH per event under ``uvicorn --workers 2``:
no key check, no idempotency, no per-event record, no rate limit. ``to_email`` is a plain
string so that the peer is as fast as it can be (a stricter bar for EventFlow).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

#: The list the hobby design pushes events onto.
QUEUE_KEY = "bench:hobby:events"


class Payload(BaseModel):
    """What the email says and to whom."""

    model_config = ConfigDict(extra="forbid")
    to_email: str
    message: str
    subject: str | None = None


class Event(BaseModel):
    """One notification event, as the hobby design accepts it."""

    model_config = ConfigDict(extra="forbid")
    user_id: str
    event_type: Literal["USER_NOTIFICATION"]
    payload: Payload


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open one Redis connection pool per worker process, on that worker's event loop."""
    app.state.redis = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    yield
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/api/v1/events", status_code=202)
async def create_event(event: Event) -> dict[str, str]:
    """Push the event onto a list and answer with its id."""
    event_id = uuid.uuid4().hex
    await app.state.redis.lpush(QUEUE_KEY, event.model_dump_json())
    return {"id": event_id, "status": "queued"}
