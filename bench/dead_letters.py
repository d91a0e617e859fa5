"""How long the dead-letter operations take over a long queue (issue 12, item 5).

``python -m bench.dead_letters [--count 10000] [--redis-url redis://127.0.0.1:6379/14]``

Fills an emptied Redis database (never database 0) with ``--count`` dead letters that
failed at distinct milliseconds, written as ``record_dead_letter`` writes them, then times,
through the API in this process (Flask's test client, so no network but Redis's):

- a whole listing, 500 letters a page;
- a listing filtered to 5 letters, 50 a page (every letter read, 5 returned);
- a dry run of a purge of every letter (each letter's purge script is run, counting);
- a dry run of a bulk replay over every letter;
- a bulk replay of every letter (``EVENTFLOW_REPLAY_RATE`` high enough to fit them all).

It prints one line per figure and asserts only that each answer is complete.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import redis

from eventflow import create_app
from eventflow.deadletters import record_dead_letter
from eventflow.settings import Settings
from eventflow.store import EventStore, event_key, history_key

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
EVENT = {"user_id": "user-1", "event_type": "USER_NOTIFICATION",
         "payload": {"to_email": "someone@example.com", "message": "Hello"}}


class SteppingClock:
    """A clock a millisecond further on each letter (set by the filler)."""

    def __init__(self) -> None:
        self.moment = 0.0

    def now(self) -> float:
        return self.moment


def fill(client: redis.Redis, count: int, rare: int) -> None:
    clock = SteppingClock()
    store = EventStore(client, clock)
    base_ms = int(time.time() * 1000) - count - 60_000
    for k in range(count):
        clock.moment = (base_ms + k + 0.4) / 1000
        event_id = str(uuid.uuid4())
        event = {**EVENT, "user_id": "user-rare"} if k % (count // rare) == 0 else EVENT
        now = store.now()
        pipe = client.pipeline()
        pipe.hset(event_key(event_id), mapping={
            "id": event_id, "user_id": event["user_id"], "event_type": event["event_type"],
            "payload": json.dumps(event["payload"]), "producer": "bench", "status": "queued",
            "attempts": "0", "created_at": now, "updated_at": now})
        pipe.rpush(history_key(event_id), store.entry("accepted", producer="bench"))
        pipe.execute()
        record_dead_letter(store, event_id, "permanent", "550 5.1.1 No such user")


def timed(label: str, call: Any) -> Any:
    start = time.perf_counter()
    result = call()
    print(f"{label:<48} {time.perf_counter() - start:7.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    options = parser.parse_args()
    client = redis.Redis.from_url(options.redis_url)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        parser.error("database 0 is refused: name another one in --redis-url")
    client.flushdb()
    timed(f"fill {options.count} dead letters", lambda: fill(client, options.count, 5))
    settings = Settings.from_env({
        "REDIS_URL": options.redis_url, "EVENTFLOW_ADMIN_KEYS": ADMIN_KEY,
        "EVENTFLOW_API_RATE_LIMIT": "1000000/minute",
        "EVENTFLOW_REPLAY_RATE": "1000000", "EVENTFLOW_VISIBILITY_TIMEOUT": "3600"})
    app = create_app(settings, {"TESTING": True})
    http = app.test_client()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def listing(query: str) -> int:
        listed, cursor = 0, None
        while True:
            url = "/api/v1/dead-letters" + query + (f"&cursor={cursor}" if cursor else "")
            page = http.get(url, headers=headers).json
            listed += len(page["items"])
            if (cursor := page["next_cursor"]) is None:
                return listed

    assert timed("list all, 500 a page", lambda: listing("?limit=500")) == options.count
    assert timed("list a filter matching 5, 50 a page",
                 lambda: listing("?limit=50&user_id=user-rare")) == 5
    purge = timed("dry run of a purge (flask dlq purge --dry-run)",
                  lambda: app.test_cli_runner().invoke(
                      args=["dlq", "purge", "--older-than", "1s", "--dry-run"]))
    assert f"Would purge {options.count} dead letter(s)" in purge.output, purge.output
    dry = timed("dry run of a bulk replay",
                lambda: http.post("/api/v1/dead-letters/replay?dry_run=true", headers=headers))
    assert dry.json["replayed"] == options.count, dry.json
    done = timed("bulk replay",
                 lambda: http.post("/api/v1/dead-letters/replay", headers=headers))
    assert done.json["replayed"] == options.count, done.json
    client.flushdb()


if __name__ == "__main__":
    main()
