"""A batch's Idempotency-Key survives a web process killed in the middle of the batch.

The answer to the key is written by the same script that stores the batch's events: a
web process killed at any moment leaves either the events with their answer, or neither.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.faults import WebProcess, event_to
from tests.smtp_server import free_port
from tests.waiting import wait_for

#: Events per batch: enough that a batch takes a while to validate and store.
BATCH = 150
#: Producers sending batches at once (the web process serves 2 x 4 at a time).
PRODUCERS = 8


def batch_for(key: str) -> dict[str, Any]:
    """The body sent with ``key``, the same every time it is sent."""
    return {"events": [event_to(f"{key}-{n}@example.com") for n in range(BATCH)]}


@pytest.mark.slow
def test_batches_cut_short_by_a_killed_web_process_get_their_ids_when_sent_again(
    environment: dict[str, str], redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given the Procfile's web process, and producers sending batches, each with a key
    port = free_port()
    web = WebProcess(environment, tmp_path, port)
    sent: list[str] = []
    stop = threading.Event()

    def produce(producer: int) -> None:
        for n in range(1000):
            if stop.is_set():
                return
            key = f"p{producer}-{n}"
            sent.append(key)
            try:
                web.post("/api/v1/events/batch", batch_for(key), timeout=20,
                         **{"Idempotency-Key": key})
            except requests.RequestException:
                return  # the process is gone: this batch's fate is unknown to its producer

    try:
        web.wait_ready()
        producers = [threading.Thread(target=produce, args=(n,)) for n in range(PRODUCERS)]
        for thread in producers:
            thread.start()
        # When the web process is killed (SIGKILL) while batches are being stored
        wait_for(lambda: int(redis_client.hget("ef:stats", "accepted") or 0) >= 4 * BATCH,
                 20, message="some batches stored")
        web.process.kill_group()
        stop.set()
        for thread in producers:
            thread.join(30)
    finally:
        stop.set()
        web.stop()

    # Then each producer, sending its batch again with its key to a new web process,
    # gets its batch's event ids: the first answer if the batch was stored, else a
    # batch stored now (never a 409 for a key left "in flight")
    again = WebProcess(environment, tmp_path, port)
    try:
        again.wait_ready()
        answers = {key: again.post("/api/v1/events/batch", batch_for(key), timeout=20,
                                   **{"Idempotency-Key": key}) for key in sent}
    finally:
        again.stop()
    codes = {key: answer.status_code for key, answer in answers.items()}
    assert set(codes.values()) == {207}, {k: c for k, c in codes.items() if c != 207}
    ids = [result["id"] for answer in answers.values() for result in answer.json()["results"]]
    assert len(ids) == len(sent) * BATCH
    # And every stored event is in one answer: nothing stored twice, nothing orphaned
    stored = {key.removeprefix("ef:ev:") for key in redis_client.scan_iter("ef:ev:*", count=1000)}
    assert stored == set(ids)
    assert len(set(ids)) == len(ids)
    assert redis_client.llen("celery") == len(ids)
    assert int(redis_client.hget("ef:stats", "accepted") or 0) == len(ids)
