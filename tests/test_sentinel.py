"""Redis Sentinel: every process finds the master through the Sentinels and follows a
failover without a restart; with ``EVENTFLOW_REDIS_MIN_REPLICAS=1`` a ``202`` means a
replica holds the event, so a failover loses none and mails none twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
import redis
import requests
from flask import Flask

from eventflow.clock import SystemClock
from eventflow.enqueue import TaskMessage, build_task_message
from eventflow.scripts import ThreadScript
from eventflow.services import redis_client
from eventflow.settings import ConfigError, Settings, sentinel_addresses
from eventflow.store import EventStore, NotReplicated
from tests.conftest import EXAMPLE_EVENT, auth
from tests.faults import FAST_RECOVERY, event_to, final_record, web_process
from tests.processes import worker_processes
from tests.redis_server import RedisServer
from tests.sentinel_cluster import MASTER_NAME, SentinelCluster
from tests.smtp_server import ScriptedSMTPServer, free_port
from tests.test_delivery import RecordingSender, with_sender
from tests.waiting import wait_for

# -- the setting ---------------------------------------------------------------------------


def test_a_sentinel_url_names_every_sentinel_the_database_and_the_password() -> None:
    address = sentinel_addresses(
        "sentinel://:s3cret-pass@10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/4")
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (address.db, address.password) == (4, "s3cret-pass")
    assert "s3cret-pass" not in repr(address)


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("REDIS_URL", "sentinel://10.0.0.1:26379;redis://10.0.0.2:6379/0", "sentinel://host[:port]"),
    ("REDIS_URL", "sentinel://10.0.0.1:port/0", "is not a number"),
    ("REDIS_URL", "sentinel://10.0.0.1:26379/zero", "database must be a number"),
    ("REDIS_URL", "http://10.0.0.1:6379", "sentinel://host:26379;sentinel://host2:26379/<db>"),
    ("EVENTFLOW_SENTINEL_MASTER", "my master", "got 'my master'"),
    ("EVENTFLOW_REDIS_MIN_REPLICAS", "-1", "between 0 and 16"),
    ("EVENTFLOW_REDIS_MIN_REPLICAS", "two", "expected a whole number"),
])
def test_a_bad_sentinel_setting_stops_the_process_with_a_message_that_names_it(
    variable: str, value: str, message: str,
) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: value})
    assert raised.value.variable == variable and message in str(raised.value)


# -- which Sentinel decides ----------------------------------------------------------------


class AnsweringSentinels:
    """Stands for ``SentinelView``: what each of three Sentinels answers."""

    def __init__(self, *answers: tuple[int, str, int]) -> None:
        self.sentinels = [object(), object(), object()]
        self.answers = list(answers)

    def masters(self) -> list[tuple[int, str, int]]:
        return self.answers


@pytest.mark.parametrize(("answers", "refused"), [
    # every Sentinel names the server that took the write
    ([(0, "10.0.0.1", 6379)] * 3, ""),
    # the leader of a failover names the new master first, under a newer epoch
    ([(1, "10.0.0.2", 6379), (0, "10.0.0.1", 6379), (0, "10.0.0.1", 6379)], "10.0.0.2:6379"),
    # one that has not heard of a failover (cut off from the nodes) is outvoted by epoch
    ([(0, "10.0.0.3", 6379), (4, "10.0.0.1", 6379), (4, "10.0.0.1", 6379)], ""),
    # fewer than a majority answered
    ([(4, "10.0.0.1", 6379)], "only 1 of 3 Sentinels answered"),
])
def test_the_newest_configuration_among_a_majority_of_sentinels_decides_a_write(
    redis_client: redis.Redis, answers: list[tuple[int, str, int]], refused: str,
) -> None:
    store = EventStore(redis_client, SystemClock(), min_replicas=1)
    store._sentinels = AnsweringSentinels(*answers)  # type: ignore[assignment]
    reason = store._not_master(("10.0.0.1", 6379))
    assert (refused in reason and reason != "") if refused else reason == "", reason


# -- replicated acknowledgement on a plain Redis without replicas ----------------------------


def test_without_the_replicas_asked_for_an_event_is_answered_503_and_a_run_sends_nothing(
    make_app: Callable[..., Flask], redis_client: redis.Redis,
) -> None:
    # Given EVENTFLOW_REDIS_MIN_REPLICAS=1 and a Redis that has no replica
    app = make_app(EVENTFLOW_REDIS_MIN_REPLICAS="1")
    # When an event is posted
    response = app.test_client().post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    # Then it is not acknowledged: 503 not-replicated, sent again later with its key
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["type"].endswith("not-replicated")
    assert response.headers["Retry-After"] == "2"
    # And a run of an event stored before sends nothing: its take is not confirmed either
    services = app.extensions["eventflow"]
    message = build_task_message(app.extensions["celery"], "ev-1", ("ev-1",))
    make_app().extensions["eventflow"].store.accept("ev-1", EXAMPLE_EVENT, "producer", message)
    sender = RecordingSender()
    with pytest.raises(NotReplicated, match="0 of 1 replicas"):
        with_sender(services.delivery, sender).run("ev-1")
    assert sender.sent == []


# -- against real Sentinels ------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    running = SentinelCluster(tmp_path / "redis").start()
    yield running
    running.stop()


@pytest.mark.slow
def test_the_state_client_finds_the_master_through_the_sentinels_and_follows_a_failover(
    cluster: SentinelCluster,
) -> None:
    settings = Settings.from_env({"REDIS_URL": cluster.url, "EVENTFLOW_REDIS_MIN_REPLICAS": "1",
                                  "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME})
    client = redis_client(settings, decode_responses=True)
    client.set("before", "1")
    assert cluster.master.client().get("before") == "1"
    # The hot paths' scripts, on a connection of the thread's own, reach the master too
    ThreadScript(client, "return redis.call('SET', KEYS[1], ARGV[1])")(["scripted"], ["1"])
    assert cluster.master.client().get("scripted") == "1"
    old = cluster.master.port
    cluster.master.kill()
    cluster.wait_for_new_master(old)

    def write() -> bool:
        try:
            return bool(client.set("after", "1"))
        except redis.RedisError:
            return False

    deadline = time.monotonic() + 15
    while not write():
        assert time.monotonic() < deadline, "the client never reached the new master"
        time.sleep(0.1)
    assert client.get("before") == "1"


@pytest.mark.slow
def test_a_write_taken_by_a_server_the_sentinels_no_longer_name_is_not_acknowledged(
    cluster: SentinelCluster, tmp_path: Path,
) -> None:
    # Given a server that still believes it is the master, with a replica that confirms
    # its writes: a master frozen past the Sentinels' patience and thawed, before they
    # demote it (the replica not yet moved to the new master)
    stale = RedisServer(free_port(), tmp_path / "stale").start()
    follower = RedisServer(free_port(), tmp_path / "follower", "--replicaof", "127.0.0.1",
                           str(stale.port)).start()
    try:
        wait_for(lambda: follower.client().info("replication").get("master_link_status")
                 == "up", message="the stale master's replica in sync")
        settings = Settings.from_env({"REDIS_URL": cluster.url, "EVENTFLOW_REDIS_MIN_REPLICAS": "1",
                                      "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME})
        store = EventStore(redis_client(settings), SystemClock(), min_replicas=1)
        # and the store's connection made to it before the failover (the accept script's
        # connection of this thread), its scripts loaded there
        accept_script = store._accept
        accept_script.connection().connect_to(("127.0.0.1", stale.port))
        stale.client().script_load(accept_script.script.script)
        message = TaskMessage("celery", "{}")
        # When an event is accepted there: stored and confirmed by the replica
        with pytest.raises(NotReplicated, match="the Sentinels name"):
            store.accept("ev-stale", EXAMPLE_EVENT, "producer", message)
        assert stale.client().exists("ef:ev:ev-stale") == 1
        # Then it is not acknowledged (the API answers 503), and sent again, as the
        # producer does with its Idempotency-Key, it lands on the master the Sentinels name
        store.accept("ev-stale", EXAMPLE_EVENT, "producer", message)
        assert cluster.master.client().hget("ef:ev:ev-stale", "status") == "queued"
    finally:
        follower.kill()
        stale.kill()


class SteadyProducer:
    """Posts events at a steady rate, each with its own Idempotency-Key, and posts an event
    again (same key) until it gets a 202: what a producer following the README does."""

    def __init__(self, base: str, key: str, rate: float = 20) -> None:
        self.base, self.key, self.interval = base, key, 1 / rate
        self.accepted: dict[str, str] = {}  # address -> event id
        self.refusals: list[float] = []  # when a 503 or a refused connection came back
        self.unexpected: list[str] = []  # any other answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            address = f"user{n}@example.com"
            while not self._stop.is_set():
                try:
                    response = requests.post(
                        f"{self.base}/api/v1/events", json=event_to(address), timeout=5,
                        headers={"Authorization": f"Bearer {self.key}",
                                 "Idempotency-Key": f"order-{n}"})
                except requests.RequestException:
                    response = None
                if response is not None and response.status_code == 202:
                    self.accepted[address] = response.json()["id"]
                    break
                if response is not None and response.status_code != 503:
                    self.unexpected.append(f"{response.status_code} {response.text[:300]}")
                self.refusals.append(time.monotonic())
                time.sleep(0.1)
            time.sleep(self.interval)


def failover_under_load(
    cluster: SentinelCluster, environment: dict[str, str], smtp_server: ScriptedSMTPServer,
    tmp_path: Path, fault: str,
) -> None:
    env = {**environment, **FAST_RECOVERY, "REDIS_URL": cluster.url,
           "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME,
           "EVENTFLOW_REDIS_MIN_REPLICAS": "1", "EVENTFLOW_VISIBILITY_TIMEOUT": "10",
           "EVENTFLOW_RATE_LIMIT": "1000/day"}
    key = environment["EVENTFLOW_API_KEYS"].split(",")[0]
    with web_process(env, tmp_path, free_port()) as web, \
            worker_processes(env, tmp_path, count=2), \
            SteadyProducer(web.base, key) as producer:
        # Given a steady flow of events being accepted and delivered
        deadline = time.monotonic() + 20
        while len(smtp_server.received) < 10:
            assert time.monotonic() < deadline, f"no steady flow: {producer.unexpected[:3]}"
            time.sleep(0.05)
        # When the master dies (or freezes past the Sentinels' patience, then thaws)
        old = cluster.master.port
        faulted = time.monotonic()
        if fault == "kill":
            cluster.master.kill()
            detected = cluster.wait_for_new_master(old)
        else:
            cluster.freeze_master()
            detected = cluster.wait_for_new_master(old)
            cluster.thaw_master()
        sent_at_fault = len(smtp_server.received)
        deadline = time.monotonic() + 30
        while len(smtp_server.received) < sent_at_fault + 10:
            assert time.monotonic() < deadline, "deliveries did not resume after the failover"
            time.sleep(0.05)
        resumed = time.monotonic() - faulted
    assert producer.unexpected == []
    refused = [t - faulted for t in producer.refusals if t >= faulted]
    print(f"\nfailover ({fault}): Sentinels named a new master after {detected:.1f}s; "
          f"the API answered 503 or refused for {max(refused, default=0):.1f}s "
          f"({len(refused)} refusals); deliveries resumed after {resumed:.1f}s")
    # Then every event that got a 202 ends delivered, and exactly once
    client = redis_client(Settings.from_env({"REDIS_URL": cluster.url,
                                             "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME}),
                          decode_responses=True)
    with worker_processes(env, tmp_path, count=1):
        for address, event_id in producer.accepted.items():
            try:
                status = final_record(client, event_id, timeout=60)["status"]
            except AssertionError as error:
                raise AssertionError(f"{error}\n{cluster.describe(event_id)}") from None
            assert status == "delivered", address
    sent = Counter(m.rcpt_tos[0] for m in smtp_server.received)
    assert {a: n for a, n in sent.items() if n > 1} == {}
    assert set(producer.accepted) <= set(sent)
    # (How soon deliveries resume is measured and printed, not promised: on a loaded
    # machine it varies by seconds; the wait above bounds it at 30 s.)


@pytest.mark.slow
def test_every_event_answered_202_is_delivered_once_across_a_master_killed_under_load(
    cluster: SentinelCluster, environment: dict[str, str], smtp_server: ScriptedSMTPServer,
    tmp_path: Path,
) -> None:
    failover_under_load(cluster, environment, smtp_server, tmp_path, "kill")


@pytest.mark.slow
def test_every_event_answered_202_is_delivered_once_across_a_master_frozen_then_thawed(
    cluster: SentinelCluster, environment: dict[str, str], smtp_server: ScriptedSMTPServer,
    tmp_path: Path,
) -> None:
    failover_under_load(cluster, environment, smtp_server, tmp_path, "freeze")
