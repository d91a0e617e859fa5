"""Many hosts, proven: the web and the workers on hosts of their own (network namespaces).

Redis runs on a host of its own and is reached only over the virtual network; the web
process and each worker run the Procfile's own command lines on their hosts; the SMTP
server listens on the bridge, where every host reaches it. These tests need root: they
skip elsewhere with the reason, and where they can run (CI, as root) they always do.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from eventflow.devstack.processes import Process, procfile_command
from tests.conftest import ADMIN_KEY, PRODUCER_KEY
from tests.faults import FAST_RECOVERY, FINAL, WebProcess, event_to
from tests.hosts import BRIDGE_ADDRESS, Host, Network, network, start_redis, why_not_available
from tests.processes import worker_command
from tests.smtp_server import ScriptedSMTPServer, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

WEB_PORT = 8000


class HostWeb(WebProcess):
    """The Procfile's ``web`` line, unchanged (it binds 0.0.0.0: its host's address)."""

    def __init__(self, host: Host, env: dict[str, str], tmp_path: Path) -> None:
        self.base = f"http://{host.address}:{WEB_PORT}"
        self.process = host.run(procfile_command("web"),
                                {**env, "PORT": str(WEB_PORT), "WEB_CONCURRENCY": "2"},
                                tmp_path / f"web-{host.name}.log")
        self.session = requests.Session()

    def wait_ready(self, timeout: float = 45) -> None:
        # granian listens before its workers have imported the app: a first request
        # can wait longer than the parent's 2 s, on a machine shared with other suites.
        def answers() -> bool:
            self.process.check_alive()
            try:
                return requests.get(self.base + "/health", timeout=5).status_code < 500
            except (requests.ConnectionError, requests.Timeout):
                return False

        wait_for(answers, timeout, interval=0.2, message="the web host to answer")


@dataclass
class Cluster:
    """Redis, a web host and two worker hosts on one virtual network."""

    net: Network
    env: dict[str, str]
    redis: redis.Redis
    smtp: ScriptedSMTPServer
    tmp_path: Path

    def start_web(self) -> HostWeb:
        web = HostWeb(self.net.add_host("web", 10), self.env, self.tmp_path)
        web.wait_ready(timeout=45)
        return web

    def start_workers(self, count: int = 2, concurrency: int = 2) -> list[Process]:
        workers = []
        for n in range(1, count + 1):
            host = self.net.add_host(f"worker{n}", 10 + n)
            command = worker_command(concurrency, f"-n worker{n}@{host.address}")
            workers.append(host.run(command, self.env, self.tmp_path / f"worker{n}.log"))
        for worker in workers:
            worker.wait_for_output("ready.", timeout=60)
        return workers

    def history(self, event_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(f"ef:hist:{event_id}", 0, -1)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A virtual network with Redis on a host of its own and an SMTP server on the bridge."""
    reason = why_not_available()
    if reason is not None:
        pytest.skip(reason)
    with network() as net:
        redis_host = net.add_host("redis", 1)
        start_redis(redis_host, tmp_path)
        smtp = ScriptedSMTPServer(free_port(), host=BRIDGE_ADDRESS).start()
        env = {
            "REDIS_URL": f"redis://{redis_host.address}:6379/0",
            "SMTP_URL": smtp.url,
            "MAIL_FROM": "EventFlow <noreply@eventflow.test>",
            "EVENTFLOW_API_KEYS": PRODUCER_KEY,
            "EVENTFLOW_ADMIN_KEYS": ADMIN_KEY,
            "EVENTFLOW_MAX_RETRIES": "5",
            "WORKER_LOG_LEVEL": "INFO",
            **FAST_RECOVERY,
        }
        client = redis.Redis(host=redis_host.address, decode_responses=True,
                             socket_connect_timeout=2, socket_timeout=5)
        try:
            yield Cluster(net, env, client, smtp, tmp_path)
        finally:
            client.close()
            smtp.stop()


def final_statuses(cluster: Cluster, ids: list[str], timeout: float) -> dict[str, str]:
    def all_final() -> dict[str, str] | None:
        pipe = cluster.redis.pipeline(transaction=False)
        for event_id in ids:
            pipe.hget(f"ef:ev:{event_id}", "status")
        statuses = dict(zip(ids, pipe.execute(), strict=True))
        return statuses if all(s in FINAL for s in statuses.values()) else None

    return wait_for(all_final, timeout, interval=0.2,  # type: ignore[no-any-return]
                    message=f"{len(ids)} events to reach a final status")


def test_two_worker_hosts_drain_one_backlog_with_exact_quotas_and_every_event_sent_once(
    cluster: Cluster,
) -> None:
    # Given two worker hosts, ready, and a backlog that reaches them at once (one batch
    # on the web host): 4 users over their quota of 5 a day (9 events each) and 4 users
    # under it (3 each). (Posted before the workers started, the backlog could be
    # drained by the first worker ready before the second one is.)
    cluster.env["EVENTFLOW_RATE_LIMIT"] = "5/day"
    web = cluster.start_web()
    workers = cluster.start_workers(count=2, concurrency=2)
    users = [(f"heavy{n}", 9) for n in range(4)] + [(f"light{n}", 3) for n in range(4)]
    events = [event_to(f"{user}.{k}@example.com") | {"user_id": user}
              for user, count in users for k in range(count)]
    # When the two hosts drain it together
    started = time.monotonic()
    answer = web.post("/api/v1/events/batch", {"events": events})
    assert answer.status_code == 207, answer.text
    results = answer.json()["results"]
    assert all(result["status"] == "queued" for result in results), results
    sent: dict[str, list[str]] = {}
    for event, result in zip(events, results, strict=True):
        sent.setdefault(event["user_id"], []).append(result["id"])
    ids = [result["id"] for result in results]
    statuses = final_statuses(cluster, ids, timeout=90)
    drained = time.monotonic() - started

    # Then each user got exactly min(events, 5) emails and the rest were refused
    for user, events in sent.items():
        by_status = Counter(statuses[event_id] for event_id in events)
        assert by_status == Counter({"delivered": min(len(events), 5),
                                     "rate_limited": max(len(events) - 5, 0)}), (user, by_status)
        assert cluster.redis.zcard(f"ef:quota:{user}") == min(len(events), 5)
    # And every delivered event is one message at the server, a refused one none
    arrived = Counter(message.event_id for message in cluster.smtp.received)
    for event_id, status in statuses.items():
        assert arrived[event_id] == (1 if status == "delivered" else 0), event_id
    # And both hosts did part of the work
    for worker in workers:
        assert sum(event_id in worker.output() for event_id in ids) > 0, worker.log_tail()
    counters = cluster.redis.hgetall("ef:stats")
    assert int(counters["delivered"]) == 4 * 5 + 4 * 3
    assert int(counters["rate_limited"]) == 4 * 4
    assert int(counters.get("ambiguous", 0)) == 0
    print(f"\n[netns] 2 worker hosts drained {len(ids)} events in {drained:.1f}s "
          f"(from the batch's post)")


def test_a_worker_host_cut_off_mid_send_cannot_overwrite_the_run_that_took_over(
    cluster: Cluster,
) -> None:
    # Given two worker hosts, and a server that takes the message and holds its reply
    smtp = cluster.smtp
    web = cluster.start_web()
    workers = cluster.start_workers(count=2, concurrency=1)
    smtp.reply_delay = 60
    answer = web.post("/api/v1/events", event_to("cut@example.com"))
    event_id = answer.json()["id"]
    wait_for(lambda: smtp.messages_for(event_id), 20, message="the first send to arrive")
    victim_index = next(i for i, w in enumerate(workers) if event_id in w.output())
    victim_host = cluster.net.hosts[f"worker{victim_index + 1}"]
    survivor = workers[1 - victim_index]

    # When the victim's host is cut off in the middle of the send
    victim_host.cut()
    cut_at = time.monotonic()
    try:
        # Then, once its lease has run out, the other host takes the event and sends it
        def delivered() -> bool:
            return cluster.redis.hget(f"ef:ev:{event_id}", "status") == "delivered"

        wait_for(delivered, 45, interval=0.1, message="the other host to deliver the event")
        took_over = time.monotonic() - cut_at
        assert event_id in survivor.output()
    finally:
        # And when the link comes back
        victim_host.restore()
    restored_at = time.monotonic()

    # the cut-off run's late writes land (they carry its attempt number, 1) ...
    def late_write() -> list[dict[str, Any]] | None:
        history = cluster.history(event_id)
        return history if any(entry.get("attempt") == 1 and entry["step"] != "ambiguous_resend"
                              for entry in history) else None

    history = wait_for(late_write, 60, interval=0.2,
                       message="the cut-off run's late write to reach Redis")
    landed = time.monotonic() - restored_at
    # ... and give Whatever it started time to end: the message back, acknowledged
    wait_for(lambda: cluster.redis.hlen("unacked") == 0 and cluster.redis.llen("celery") == 0,
             30, interval=0.2, message="no message left in hand")

    # but they did not overwrite the newer run: the event stays delivered, once counted
    record = cluster.redis.hgetall(f"ef:ev:{event_id}")
    history = cluster.history(event_id)
    steps = [entry["step"] for entry in history]
    assert record["status"] == "delivered", (record, steps)
    assert record["attempts"] == "2", record
    assert cluster.redis.hget("ef:stats", "delivered") == "1"
    assert not cluster.redis.exists(f"ef:lease:{event_id}")
    # And its history tells what happened: the run lost, the second send (ambiguous:
    # the first one's reply never came), its delivery, then the cut-off run's outcome,
    # noted as superseded
    assert steps[:5] == ["accepted", "worker_lost", "ambiguous_resend", "attempt",
                         "delivered"], steps
    assert history[3]["attempt"] == 2 and history[3]["outcome"] == "delivered"
    late = history[5:]
    assert late and all(entry["step"] == "superseded" and entry["attempt"] == 1
                        for entry in late), late
    # And the server saw both sends, as the history says
    assert len(smtp.messages_for(event_id)) == 2
    print(f"\n[netns] cut-off host: another host delivered {took_over:.1f}s after the cut; "
          f"the stale run's late write landed {landed:.1f}s after the link came back; "
          f"history: {', '.join(steps)}; superseded: {json.dumps(late)}")
