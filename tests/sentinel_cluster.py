"""A Redis master, its replicas and three Sentinels of a test's own, on loopback.

Real ``redis-server`` processes (``--replicaof``) and real ``redis-server --sentinel``
processes with a config file each, as in ``deploy/sentinel/``: the test can SIGKILL the
master, or freeze it with SIGSTOP, and watch the Sentinels promote a replica.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from eventflow.devstack.redis import find_redis_server
from eventflow.devstack.smtp import free_port
from tests.redis_server import RedisServer

MASTER_NAME = "eventflow"
#: The shipped Sentinel layout.
SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "sentinel"
#: How long a master may not answer before the Sentinels call it down.
DOWN_AFTER_MS = 1000


def shipped_copy(directory: Path) -> Path:
    """A copy of the shipped ``redis.conf`` in ``directory``: a Sentinel has the nodes
    rewrite their own file (``CONFIG REWRITE``) when it reconfigures them."""
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / "redis.conf"
    copy.write_text((SHIPPED / "redis.conf").read_text())
    return copy


class SentinelCluster:
    """One master, ``replicas`` replicas and three Sentinels (quorum 2)."""

    def __init__(self, directory: Path, replicas: int = 2) -> None:
        self.directory = directory
        # The shipped layout's files, on loopback ports of the test's own.
        self.master = RedisServer(free_port(), directory / "master",
                                  conf=shipped_copy(directory / "master"))
        self.replicas = [
            RedisServer(free_port(), directory / f"replica{n}", "--replicaof", "127.0.0.1",
                        str(self.master.port), conf=shipped_copy(directory / f"replica{n}"))
            for n in range(replicas)
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``REDIS_URL`` in kombu's Sentinel form."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def start(self) -> SentinelCluster:
        self.master.start()
        for replica in self.replicas:
            replica.start()
        self._wait_for(lambda: self.master.client().info("replication").get(
            "min_slaves_good_slaves") == len(self.replicas), "the replicas to be in sync")
        for n, port in enumerate(self.sentinel_ports):
            work = self.directory / f"sentinel{n}"
            work.mkdir(parents=True, exist_ok=True)
            conf = work / "sentinel.conf"
            shipped = (SHIPPED / "sentinel.conf").read_text()
            conf.write_text(
                shipped.replace("port 26379", f"port {port}\nbind 127.0.0.1\ndir {work}")
                .replace("redis-1 6379", f"127.0.0.1 {self.master.port}")
                .replace("down-after-milliseconds eventflow 5000",
                         f"down-after-milliseconds eventflow {DOWN_AFTER_MS}")
                .replace("failover-timeout eventflow 60000", "failover-timeout eventflow 5000")
            )
            with open(work / "sentinel.log", "ab") as log:
                self._sentinels.append(subprocess.Popen(
                    [find_redis_server(), str(conf), "--sentinel"], stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))
        self._wait_for(lambda: all(self._sentinels_known(port) for port in self.sentinel_ports),
                       "every Sentinel to know the others")
        return self

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers sees it."""
        for port in self.sentinel_ports:
            try:
                address = self._sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def wait_for_new_master(self, old_port: int, timeout: float = 30) -> float:
        """Wait until the Sentinels name another master; seconds it took."""
        started = time.monotonic()
        self._wait_for(lambda: self.master_port() not in (None, old_port), "a failover",
                       timeout)
        return time.monotonic() - started

    def describe(self, event_id: str) -> str:
        """What every node holds of one event: for a failure's message."""
        lines = []
        for server in [self.master, *self.replicas]:
            try:
                client = server.client()
                role = client.info("replication").get("role")
                lines.append(f"port {server.port} ({role}): "
                             f"record {client.hgetall(f'ef:ev:{event_id}')}, "
                             f"history {client.lrange(f'ef:hist:{event_id}', 0, -1)}, "
                             f"lease ttl {client.ttl(f'ef:lease:{event_id}')}, "
                             f"watched {client.zscore('ef:watch', event_id)}")
            except redis.RedisError as error:
                lines.append(f"port {server.port}: {error}")
        return "\n".join(lines)

    def freeze_master(self) -> None:
        assert self.master.process is not None
        self.master.process.send_signal(signal.SIGSTOP)

    def thaw_master(self) -> None:
        assert self.master.process is not None
        self.master.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for sentinel in self._sentinels:
            sentinel.kill()
            sentinel.wait(timeout=10)
        if self.master.process is not None:
            self.master.process.send_signal(signal.SIGCONT)
        for server in [self.master, *self.replicas]:
            server.kill()

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5,
                           decode_responses=True)

    def _sentinels_known(self, port: int) -> bool:
        try:
            return len(self._sentinel(port).sentinel_sentinels(MASTER_NAME)) == 2
        except redis.RedisError:
            return False

    @staticmethod
    def _wait_for(condition: object, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
