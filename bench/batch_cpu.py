"""The web process's CPU per batched event, in-process, without a server (issue 17).

    .venv/bin/python -m bench.batch_cpu [--batches 20] [--repetitions 7] [--profile]
                                        [--tree DIR]

Starts a redis-server of its own, builds the app, and POSTs batches of 250 of the
benchmark's events to ``/api/v1/events/batch`` through Flask's test client, one thread.
Prints the process's CPU time (``time.process_time``: user + system, the Redis calls'
system calls included) per event for each repetition, their median, min and max, and
Redis's time in the batch script per event (``INFO commandstats``). With ``--profile``,
cProfile's top functions instead. ``--tree`` measures the ``eventflow`` package of another
checkout (``git archive main | tar -x -C /tmp/main-tree``) the same way.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.load import event_body

API_KEY = "bench-batch-cpu-key-0123456789abcdef"
BATCH = 250


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="batches a repetition")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--tree", type=Path, help="the checkout whose eventflow to measure")
    args = parser.parse_args(argv)
    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))

    import eventflow
    from bench.memory import start_redis
    from eventflow import create_app
    from eventflow.settings import Settings

    print(f"measuring {Path(eventflow.__file__).parent}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as data:
        process, port = start_redis(Path(data), "--hash-max-listpack-value", "1024")
        try:
            settings = Settings.from_env({
                "REDIS_URL": f"redis://127.0.0.1:{port}/0", "EVENTFLOW_API_KEYS": API_KEY,
                "EVENTFLOW_RATE_LIMIT": "1000000/day",
                "EVENTFLOW_API_RATE_LIMIT": "1000000000/minute",
            })
            web = create_app(settings).test_client()
            body = json.dumps({"events": [event_body(f"user-{i}") for i in range(BATCH)]})
            headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

            def post() -> None:
                answer = web.post("/api/v1/events/batch", data=body, headers=headers)
                if answer.status_code != 207:
                    raise SystemExit(f"the batch was answered {answer.status_code}")

            client = redis.Redis(port=port)
            for _ in range(args.batches):  # warm up: scripts, caches, templates
                post()
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(args.batches * 5):
                    post()
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                return 0
            client.config_resetstat()
            per_event = []
            for _ in range(args.repetitions):
                client.flushdb()
                started = time.process_time()
                for _ in range(args.batches):
                    post()
                per_event.append((time.process_time() - started) / (args.batches * BATCH) * 1e6)
            script = client.info("commandstats").get("cmdstat_evalsha", {"usec": 0})
            events = args.repetitions * args.batches * BATCH
        finally:
            process.kill()
            process.wait(timeout=10)
    print(f"web CPU per batched event: median {statistics.median(per_event):.1f} µs "
          f"[{min(per_event):.1f}–{max(per_event):.1f}] over {args.repetitions} repetitions "
          f"of {args.batches} batches of {BATCH}; Redis in scripts "
          f"{script['usec'] / events:.1f} µs an event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
