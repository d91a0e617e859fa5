"""What one delivered event costs in Redis memory, and what a day of them costs.

    .venv/bin/python -m bench.memory [--events 2000] [--users 2000] [--json]

Starts a redis-server of its own (shipped durability settings, no memory limit, on a free
port, data in a temporary directory), accepts ``--events`` events through the app's own
API (the test client: the same accept script as production) and delivers each through
:class:`eventflow.delivery.Delivery` with a sender that answers ``250`` (no SMTP), so
that exactly what production keeps after a delivery stays in Redis: the event's record,
its history, and its entry in its user's quota log. The Celery messages, consumed here
without Celery, are removed before measuring.

It reports the ``INFO memory`` ``used_memory`` growth per event, and ``MEMORY USAGE`` of
one event's keys (record, history, quota log), then a capacity table: events a day ×
``EVENTFLOW_EVENT_RETENTION`` → memory.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import redis

from eventflow.devstack.redis import find_redis_server

PRODUCER_KEY = "bench-memory-key-0123456789abcdef"
#: Events a day and retentions (days) of the capacity table.
DAILY = (10_000, 100_000, 1_000_000)
RETENTION_DAYS = (1, 8, 30)


class Accepting:
    """A sender that accepts every message, as an SMTP server answering 250 would."""

    def send(self, mail_from: str, recipient: str, message: EmailMessage) -> str:
        return "250 2.0.0 Ok: queued"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
         str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
         "--maxmemory-policy", "noeviction", "--save", "", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.dbsize()
            return process, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def measure(events: int, users: int, redis_options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Accept and deliver ``events`` events for ``users`` users; return the figures."""
    from eventflow import create_app
    from eventflow.settings import Settings

    with tempfile.TemporaryDirectory() as data:
        process, port = start_redis(Path(data), *redis_options)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            settings = Settings.from_env({
                "REDIS_URL": url, "EVENTFLOW_API_KEYS": PRODUCER_KEY,
                "EVENTFLOW_RATE_LIMIT": "1000000/day", "EVENTFLOW_API_RATE_LIMIT": "1000000/second",
            })
            app = create_app(settings, {"TESTING": True}, sender=Accepting())
            web = app.test_client()
            delivery = app.extensions["eventflow"].delivery
            queue = app.extensions["celery"].conf.task_default_queue
            client = redis.Redis(port=port)
            headers = {"Authorization": f"Bearer {PRODUCER_KEY}"}

            def deliver_one(n: int) -> str:
                body = {"user_id": f"user-{n % users:06d}", "event_type": "USER_NOTIFICATION",
                        "payload": {"to_email": f"user{n % users}@example.com",
                                    "message": "Your order has shipped."}}
                response = web.post("/api/v1/events", json=body, headers=headers)
                assert response.status_code == 202, response.get_data(as_text=True)
                event_id = response.json["id"]
                assert delivery.run(event_id).status == "delivered"
                return str(event_id)

            # Warm up: the scripts' cache, the stats and timing hashes, the first keys.
            for n in range(50):
                deliver_one(n)
            client.delete(queue)
            client.memory_purge()
            before = used_memory(client)
            last = ""
            for n in range(events):
                last = deliver_one(50 + n)
            client.delete(queue)
            client.memory_purge()
            after = used_memory(client)
            user = f"user-{(50 + events - 1) % users:06d}"
            keys = {"record": f"ef:ev:{last}", "history": f"ef:hist:{last}",
                    "quota log": f"ef:quota:{user}"}
            usage = {name: int(client.memory_usage(key, samples=0) or 0)
                     for name, key in keys.items()}
            quota_entries = int(client.zcard(f"ef:quota:{user}"))
            history_items = [json.loads(i) for i in client.lrange(f"ef:hist:{last}", 0, -1)]
            record_fields = len(client.hgetall(f"ef:ev:{last}"))
            encodings = {name: client.object("encoding", key).decode()
                         for name, key in keys.items()}
        finally:
            process.kill()
            process.wait(timeout=10)
    per_event = (after - before) / events
    return {
        "events": events, "users": users, "used_memory_delta": after - before,
        "bytes_per_event": round(per_event), "memory_usage": usage,
        "quota_entries_of_that_user": quota_entries, "history_steps": len(history_items),
        "record_fields": record_fields, "encodings": encodings,
    }


def capacity_table(bytes_per_event: float) -> str:
    """Markdown: events a day × retention → Redis memory (the delivered events alone)."""
    head = "| events a day | " + " | ".join(f"{d} d retention" for d in RETENTION_DAYS) + " |"
    rule = "|---|" + "---|" * len(RETENTION_DAYS)
    rows = []
    for daily in DAILY:
        cells = [_size(daily * days * bytes_per_event) for days in RETENTION_DAYS]
        rows.append(f"| {daily:,} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--users", type=int, default=2000,
                        help="distinct users (each has its own quota log)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--redis-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a redis-server option, e.g. hash-max-listpack-value=1024")
    args = parser.parse_args(argv)
    options = tuple(part for option in args.redis_option
                    for part in ("--" + option.partition("=")[0], option.partition("=")[2]))
    figures = measure(args.events, args.users, options)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{figures['events']} events delivered for {figures['users']} users: "
          f"used_memory grew {figures['used_memory_delta']:,} B, "
          f"{figures['bytes_per_event']:,} B per delivered event")
    print("MEMORY USAGE of the last event's keys: " + ", ".join(
        f"{name} {size} B ({figures['encodings'][name]})"
        for name, size in figures["memory_usage"].items())
        + f"; its user's quota log holds {figures['quota_entries_of_that_user']} entries")
    print()
    print(capacity_table(figures["bytes_per_event"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
