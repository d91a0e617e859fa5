"""A reply lost after Redis ran a script: the client runs it again, and nothing changes.

Each store step runs twice on the same Redis: once plainly, once through a proxy that
drops Redis's reply to its script (or transaction) and closes the connection, so that
the app's own client, with its own retry settings, sends it again. Both runs must leave
Redis in the same state (records, histories, queue, counters, quota, leases, remembered
answers) and give the caller the same answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from eventflow.enqueue import TaskMessage, build_task_message
from eventflow.services import redis_client
from eventflow.settings import Settings
from eventflow.store import EventStore, ThrottleArgs
from eventflow.store.intake import ACCEPT, ACCEPT_BATCH
from eventflow.store.ledger import DELIVERED, TAKE
from tests.conftest import EXAMPLE_EVENT, auth
from tests.faults import final_record, steps
from tests.lost_reply import LostReplyProxy
from tests.processes import worker_processes
from tests.smtp_server import ScriptedSMTPServer

#: What a store step sends to Redis: a script, or a MULTI/EXEC transaction.
WRITES = ("EVAL", "EVALSHA", "EXEC")


class StillClock:
    """The same moment for every call: both runs write the same timestamps."""

    def now(self) -> float:
        return 1_800_000_000.25


@pytest.fixture
def proxy(redis_url: str) -> Iterator[LostReplyProxy]:
    with LostReplyProxy(redis_url) as running:
        yield running


def store_for(url: str) -> EventStore:
    """The event store on the app's own Redis client (its timeouts and retry settings)."""
    return EventStore(redis_client(Settings.from_env({"REDIS_URL": url})), StillClock())


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Everything in the database, with what Redis's own clock decides left out (sorted
    sets' scores, the API rate limit's theoretical arrival time, expiry times)."""
    state: dict[str, Any] = {}
    for key in sorted(str(key) for key in client.keys("*")):  # a decoding client
        kind = client.type(key)
        if kind == "hash":
            state[key] = client.hgetall(key)
        elif kind == "list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == "zset":
            state[key] = sorted(client.zrange(key, 0, -1))
        elif kind == "string":
            state[key] = "(set)" if key.startswith("ef:throttle:") else client.get(key)
        else:
            state[key] = kind
    return state


Step = Callable[[EventStore, str], Any]


def same_outcome_with_a_lost_reply(
    redis_client: redis.Redis, proxy: LostReplyProxy, setup: Step, step: Step,
    meanwhile: Step | None = None,
) -> tuple[Any, Any]:
    """Run ``setup`` then ``step`` on an event, once plainly and once with the reply to
    ``step``'s write lost (``meanwhile`` runs while the client waits for it); assert that
    Redis ends the same both times, and return both answers of ``step``."""
    plain, cut = store_for(_url(redis_client)), store_for(proxy.url)
    answers = []
    for store, lose in ((plain, False), (cut, True)):
        redis_client.flushdb()
        # A first event through the same store: every script's connection is in use,
        # as it is in a process that has been running.
        setup(store, "warm-up")
        step(store, "warm-up")
        setup(plain, "ev-1")
        if lose:
            proxy.cut(WRITES, before_cut=(lambda: meanwhile(plain, "ev-1")) if meanwhile else None)
        answers.append(sent_again_if_lost(step, store, "ev-1"))
        if not lose and meanwhile:
            meanwhile(plain, "ev-1")
        if lose:
            assert proxy.cuts == 1, proxy.commands
        if not lose:
            first = snapshot(redis_client)
    assert snapshot(redis_client) == first
    return answers[0], answers[1]


def sent_again_if_lost(step: Step, store: EventStore, event_id: str) -> Any:
    """``step``, sent once more if its connection broke: as the client's retry does (the
    scripts on a thread's own connection), or the caller's (a worker that retries the
    recording of an outcome it knows, when the client has no retry of its own)."""
    try:
        return step(store, event_id)
    except redis.ConnectionError:
        return step(store, event_id)


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


_MESSAGES: dict[str, TaskMessage] = {}


def message_for(app: Flask, event_id: str) -> TaskMessage:
    # Built once: a message carries a random delivery tag, and both runs store the same.
    if event_id not in _MESSAGES:
        _MESSAGES[event_id] = build_task_message(app.extensions["celery"], event_id, (event_id,))
    return _MESSAGES[event_id]


def nothing(store: EventStore, event_id: str) -> None:
    pass


def accepted(app: Flask) -> Step:
    def accept(store: EventStore, event_id: str) -> None:
        store.accept(event_id, EXAMPLE_EVENT, "producer", message_for(app, event_id))
    return accept


def taken(app: Flask, quota_limit: int = 20) -> Step:
    def accept_and_take(store: EventStore, event_id: str) -> None:
        accepted(app)(store, event_id)
        store.take(event_id, f"run-of-{event_id}", 30_000, quota_limit, 86400, 3)
    return accept_and_take


def delivered(store: EventStore, event_id: str) -> None:
    store.take(event_id, "delivering-run", 30_000, 20, 86400, 3)
    store.mark_delivered(event_id, 1, "250 2.0.0 OK", 0.02)


# -- the web side ----------------------------------------------------------------------

def test_an_accept_run_again_after_its_event_was_delivered_leaves_the_event_delivered(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    # Given an accept (with an Idempotency-Key and the API rate limit) whose reply is
    # lost, and a worker that delivers the event before the client sends it again
    limits = ThrottleArgs("ef:throttle:producer", 1000, 60_000, 86_400_000, 20)

    def accept(store: EventStore, event_id: str) -> Any:
        verdict = store.accept(
            event_id, EXAMPLE_EVENT, "producer", message_for(app, event_id),
            (f"ef:idem:producer:{event_id}", "fingerprint\n202 {", "}"), throttle=limits)
        return verdict.allowed, verdict.quota_used, verdict.prior

    # When the accept runs again
    plain, again = same_outcome_with_a_lost_reply(redis_client, proxy, nothing, accept,
                                                  meanwhile=delivered)
    # Then the event stays delivered: one record, one history, one message, counted once
    # (same_outcome_with_a_lost_reply compared the whole database), and the producer
    # gets the first answer, not a replay
    # (The quota left is read again: the delivery has used one since.)
    assert (again[0], again[2]) == (plain[0], plain[2]) == (True, None)
    assert redis_client.hget("ef:ev:ev-1", "status") == "delivered"
    assert redis_client.hget("ef:stats", "accepted") == "2"


@pytest.mark.parametrize("idempotency", [{}, {"Idempotency-Key": "order-1"}],
                         ids=["plain", "with Idempotency-Key"])
def test_a_post_whose_accept_reply_is_lost_is_answered_with_its_one_event(
    make_app: Callable[..., Flask], redis_client: redis.Redis, proxy: LostReplyProxy,
    idempotency: dict[str, str],
) -> None:
    # Given the app (its fast path for plain requests) on a Redis whose reply to the
    # accept script will be lost, after a first request
    app = make_app(REDIS_URL=proxy.url)
    client = app.test_client()
    assert client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).status_code == 202
    proxy.cut(WRITES, match=running(ACCEPT))
    # When an event is posted, stored, and its reply lost
    answer = client.post("/api/v1/events", json=EXAMPLE_EVENT,
                         headers={**auth(), **idempotency})
    # Then the producer gets its event's id, as a first answer, and the event is stored
    # and queued once
    assert proxy.cuts == 1
    assert answer.status_code == 202, answer.get_json()
    assert "Idempotent-Replayed" not in answer.headers
    # (counted once against the API rate limit: 2 requests of 6000 a minute, or fewer
    # as the window moves on)
    assert int(answer.headers["RateLimit-Remaining"]) >= 5998
    event_id = answer.get_json()["id"]
    assert redis_client.hget(f"ef:ev:{event_id}", "status") == "queued"
    assert redis_client.llen(f"ef:hist:{event_id}") == 1
    assert redis_client.hget("ef:stats", "accepted") == "2"
    assert redis_client.llen("celery") == 2


def test_a_batch_accept_run_again_stores_its_events_once(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    def accept_batch(store: EventStore, event_id: str) -> Any:
        ids = [f"{event_id}-{n}" for n in range(3)]
        return store.accept_batch([(i, EXAMPLE_EVENT, message_for(app, i)) for i in ids],
                                  "producer")

    plain, again = same_outcome_with_a_lost_reply(redis_client, proxy, nothing, accept_batch)
    assert again == plain
    assert redis_client.llen("celery") == 6
    assert redis_client.hget("ef:stats", "accepted") == "6"


def test_a_batch_run_again_with_an_idempotency_key_answers_its_own_ids(
    make_app: Callable[..., Flask], redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    # Given the app on a Redis whose reply to the batch's script will be lost
    app = make_app(REDIS_URL=proxy.url)
    client = app.test_client()
    batch = {"events": [EXAMPLE_EVENT, {"user_id": "u"}, EXAMPLE_EVENT]}
    warm_up = client.post("/api/v1/events/batch", json=batch, headers=auth())
    assert warm_up.status_code == 207
    proxy.cut(WRITES, match=running(ACCEPT_BATCH))
    # When a batch with an Idempotency-Key is sent, runs, and its reply is lost
    first = client.post("/api/v1/events/batch", json=batch,
                        headers={**auth(), "Idempotency-Key": "batch-1"})
    # Then the client's retry answers the batch's own ids, not a copy or a conflict
    assert proxy.cuts == 1
    assert first.status_code == 207, first.get_json()
    ids = [r["id"] for r in first.get_json()["results"] if "id" in r]
    assert len(ids) == 2
    assert redis_client.hget("ef:stats", "accepted") == "4"
    assert redis_client.llen("celery") == 4
    # And the same request again gets the same answer, storing nothing
    again = client.post("/api/v1/events/batch", json=batch,
                        headers={**auth(), "Idempotency-Key": "batch-1"})
    assert (again.status_code, again.get_json()) == (207, first.get_json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert redis_client.hget("ef:stats", "accepted") == "4"


# -- the worker side -------------------------------------------------------------------

def take_answer(store: EventStore, event_id: str, token: str = "run-2") -> Any:
    taken = store.take(event_id, f"{token}-{event_id}", 30_000, 20, 86400, 3)
    record = taken.claim.record or {}
    return (taken.claim.state, taken.claim.losses, taken.step, taken.attempt, taken.ambiguous,
            record.get("payload"))


def test_a_take_run_again_is_the_same_claim_not_another_run(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    plain, again = same_outcome_with_a_lost_reply(redis_client, proxy, accepted(app),
                                                  take_answer)
    assert again == plain
    assert plain[:5] == ("queued", 0, "send", 1, False)


def test_a_take_after_a_lost_run_run_again_counts_the_loss_and_the_resend_once(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    # Given an event whose previous run started its send and died (its lease gone)
    def lost_run(store: EventStore, event_id: str) -> None:
        taken(app)(store, event_id)
        store.redis.delete(f"ef:lease:{event_id}")

    plain, again = same_outcome_with_a_lost_reply(redis_client, proxy, lost_run, take_answer)
    assert again == plain
    assert plain[:5] == ("sending", 1, "send", 2, True)
    assert redis_client.hget("ef:stats", "ambiguous") == "2"  # warm-up's and ev-1's


def test_a_take_refused_by_the_quota_run_again_is_refused_once(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    def refused(store: EventStore, event_id: str) -> Any:
        answer = store.take(event_id, f"run-{event_id}", 30_000, 0, 86400, 3)
        return answer.step, answer.attempt

    plain, again = same_outcome_with_a_lost_reply(redis_client, proxy, accepted(app), refused)
    assert again == plain == ("refused", 0)


def test_a_delivered_record_run_again_counts_one_delivery(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    def deliver(store: EventStore, event_id: str) -> None:
        store.mark_delivered(event_id, 1, "250 2.0.0 OK", 0.02)

    same_outcome_with_a_lost_reply(redis_client, proxy, taken(app), deliver)
    assert redis_client.hget("ef:stats", "delivered") == "2"
    assert redis_client.hget("ef:timing", "count") == "2"


@pytest.mark.parametrize("retry_in", [0.5, None], ids=["retried", "last attempt"])
def test_a_failed_attempt_run_again_is_recorded_once(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy, retry_in: float | None,
) -> None:
    def fail(store: EventStore, event_id: str) -> None:
        store.mark_failed_attempt(event_id, 1, "transient", "421 try later",
                                  {"smtp_code": 421}, 0.03, retry_in)

    same_outcome_with_a_lost_reply(redis_client, proxy, taken(app), fail)
    assert redis_client.hget("ef:stats", "failures_transient") == "2"
    assert str(redis_client.lrange("ef:hist:ev-1", 0, -1)[-1]).count('"outcome":"transient"') == 1
    assert len(redis_client.lrange("ef:hist:ev-1", 0, -1)) == 2


def test_a_rate_limited_record_run_again_counts_once(
    app: Flask, redis_client: redis.Redis, proxy: LostReplyProxy,
) -> None:
    def refuse(store: EventStore, event_id: str) -> None:
        store.mark_rate_limited(event_id, "0/day")

    same_outcome_with_a_lost_reply(redis_client, proxy, taken(app, quota_limit=0), refuse)
    assert redis_client.hget("ef:stats", "rate_limited") == "2"
    assert redis_client.hget("ef:ev:ev-1", "status") == "rate_limited"


# -- a whole run -----------------------------------------------------------------------

def test_a_worker_run_whose_take_and_delivered_replies_are_lost_sends_one_email(
    make_app: Callable[..., Flask], redis_client: redis.Redis, proxy: LostReplyProxy,
    smtp_server: ScriptedSMTPServer,
) -> None:
    # Given the app's delivery (its Redis client, a real SMTP server) on a Redis whose
    # replies to the run's take and to its delivered record will be lost
    app = make_app(REDIS_URL=proxy.url)
    client = app.test_client()
    delivery = app.extensions["eventflow"].delivery
    ids = [client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).get_json()["id"]
           for _ in range(2)]
    assert delivery.run(ids[0]).status == "delivered"  # a first run: connections in use
    proxy.cut(WRITES, match=running(TAKE))
    proxy.cut(WRITES, match=running(DELIVERED))
    # When the next event is delivered
    outcome = delivery.run(ids[1])
    # Then the run went on as if nothing was lost: one email, delivered once, a true history
    assert outcome.status == "delivered"
    assert proxy.cuts == 2
    assert len(smtp_server.messages_for(ids[1])) == 1
    history = redis_client.lrange(f"ef:hist:{ids[1]}", 0, -1)
    assert [json.loads(entry)["step"] for entry in history] == ["accepted", "attempt",
                                                                 "delivered"]
    assert redis_client.hget("ef:stats", "delivered") == "2"
    assert redis_client.hget("ef:stats", "ambiguous") is None


def running(script: str) -> Callable[[list[bytes]], bool]:
    """Whether a command runs ``script`` (EVALSHA with its digest)."""
    digest = hashlib.sha1(script.encode()).hexdigest().encode()
    return lambda words: words[1:2] == [digest]


@pytest.mark.slow
def test_the_procfile_worker_delivers_each_event_once_when_its_script_replies_are_lost(
    environment: dict[str, str], app: Flask, redis_client: redis.Redis,
    proxy: LostReplyProxy, smtp_server: ScriptedSMTPServer, tmp_path: Path,
) -> None:
    # Given the Procfile's worker on a Redis reached through the proxy, which has
    # delivered a first event (its connections are in use)
    client = app.test_client()

    def post() -> str:
        answer = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
        return str(answer.get_json()["id"])

    env = {**environment, "REDIS_URL": proxy.url}
    with worker_processes(env, tmp_path):
        first = post()
        final_record(redis_client, first)
        # When the replies to the take and to the delivered record of the next events
        # are lost, one after the other
        # (each event's first take and first delivered record: not the client's retry)
        take, deliver = once_per_event(TAKE), once_per_event(DELIVERED)
        for _ in range(EVENTS):
            proxy.cut(WRITES, match=take)
            proxy.cut(WRITES, match=deliver)
        ids = [post() for _ in range(EVENTS)]
        finals = [final_record(redis_client, event_id) for event_id in ids]
    # Then each is delivered once, with one email and a true history
    assert proxy.cuts == 2 * EVENTS
    assert [f["status"] for f in finals] == ["delivered"] * EVENTS
    assert [len(smtp_server.messages_for(event_id)) for event_id in ids] == [1] * EVENTS
    for event_id in ids:
        assert steps(redis_client, event_id) == ["accepted", "attempt", "delivered"]
    assert redis_client.hget("ef:stats", "delivered") == str(EVENTS + 1)
    assert redis_client.hget("ef:stats", "ambiguous") is None


def once_per_event(script: str) -> Callable[[list[bytes]], bool]:
    """Whether a command runs ``script`` on an event (its first key) for the first time."""
    runs, seen = running(script), set()

    def first(words: list[bytes]) -> bool:
        if not runs(words) or words[3] in seen:
            return False
        seen.add(words[3])
        return True

    return first


#: Events whose replies are lost in the Procfile worker test.
EVENTS = 4
