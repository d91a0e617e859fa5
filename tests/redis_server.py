"""A redis-server of a test's own, configured like the shipped one, that the test can kill.

It runs ``redis-server`` with ``deploy/redis.conf``'s durability settings (append-only
file, fsync every second, ``noeviction``) on its own port, with its data in a directory
of the test's ``tmp_path``, so that stopping it, SIGKILLing it and starting it again on
the same data touches nothing else on the machine.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from eventflow.devstack.redis import find_redis_server

#: What ``deploy/redis.conf`` sets for durability, as command-line options.
DEPLOY_LIKE = ("--appendonly", "yes", "--appendfsync", "everysec",
               "--maxmemory-policy", "noeviction", "--save", "")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port`` keeping its data in ``data_dir``."""

    def __init__(self, port: int, data_dir: Path, *extra: str, conf: Path | None = None) -> None:
        self.port = port
        self.conf = conf
        self.data_dir = data_dir
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2,
                           decode_responses=True)

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server on its data directory and wait until it answers."""
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 (inherited, then closed)
        try:
            self.process = subprocess.Popen(
                [find_redis_server(), *([str(self.conf)] if self.conf else []), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.data_dir), "--daemonize", "no", *DEPLOY_LIKE, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                try:
                    # PING answers while the AOF is still loading; a read does not.
                    client.dbsize()
                    return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(
                            f"redis-server on {self.port} did not start: "
                            + (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash or an out-of-memory kill."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: the server shuts down cleanly (it flushes its append-only file)."""
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
