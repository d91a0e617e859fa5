"""Lua scripts on the thread's own connection: they survive what a pooled call survives."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from eventflow.scripts import ThreadScript
from eventflow.services import redis_client
from eventflow.settings import Settings
from tests.sentinel_cluster import MASTER_NAME, SentinelCluster

COUNT = "return redis.call('INCR', KEYS[1])"


def local_address(script: ThreadScript) -> str:
    """Redis's id of the connection the calling thread's calls use."""
    connection = script.connection()  # Lua may not ask CLIENT ID
    connection.send_command("CLIENT", "ID")
    return str(connection.read_response())


def test_a_script_runs_again_on_a_new_connection_after_redis_dropped_the_idle_one(
    redis_client: redis.Redis,
) -> None:
    # Given a script that has run once on this thread's connection
    script = ThreadScript(redis_client, COUNT)
    assert script(keys=["t:count"], args=[]) == 1
    first = local_address(script)
    # When Redis closes that connection (as a restart would)
    redis_client.client_kill_filter(_id=first)
    # Then the next call reconnects and runs once
    assert script(keys=["t:count"], args=[]) == 2
    assert local_address(script) != first
    assert int(redis_client.get("t:count")) == 2


def test_a_script_is_loaded_again_when_redis_forgot_it(redis_client: redis.Redis) -> None:
    # Given a script that has run, and Redis's script cache emptied
    script = ThreadScript(redis_client, COUNT)
    script(keys=["t:count"], args=[])
    redis_client.script_flush()
    # Then the next call still runs it, once
    assert script(keys=["t:count"], args=[]) == 2


def test_each_thread_and_each_forked_process_uses_a_connection_of_its_own(
    redis_client: redis.Redis,
) -> None:
    # Given a script called twice from the main thread: the same connection each time
    script = ThreadScript(redis_client, COUNT)
    script(keys=["t:count"], args=[])
    main = local_address(script)
    script(keys=["t:count"], args=[])
    assert local_address(script) == main
    # When another thread calls it, it gets a connection of its own
    other: list[str] = []

    def call() -> None:
        script(keys=["t:count"], args=[])
        other.append(local_address(script))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)
    assert other and other[0] != main
    # And so does a forked child, rather than the parent's socket
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection, then leave at once
        try:
            script(keys=["t:count"], args=[])
            os.write(write, local_address(script).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child and child not in (main, other[0])
    # And every call ran once
    script(keys=["t:count"], args=[])
    assert local_address(script) == main
    assert int(redis_client.get("t:count")) == 5


class StallingProxy:
    """A TCP proxy on loopback in front of Redis that stops passing replies on demand."""

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return  # closed
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for source, sink, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(source, sink, replies),
                                 daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.stalled.is_set():
                    continue  # swallowed: the client waits for a reply that never comes
                sink.sendall(data)
        except OSError:
            pass  # either side closed
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        for sock in self.sockets:
            with suppress(OSError):  # shutdown wakes a thread blocked reading it
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[StallingProxy]:
    proxy = StallingProxy(redis_url)
    yield proxy
    proxy.close()


def test_a_reply_that_never_comes_ends_in_a_timeout_after_the_socket_timeout(
    redis_url: str, proxy: StallingProxy,
) -> None:
    # Given a script that has run through a proxy, with a client timeout of half a second
    database = urlsplit(redis_url).path.lstrip("/") or "0"
    client = redis.Redis(port=proxy.port, db=int(database), socket_timeout=0.5)
    script = ThreadScript(client, COUNT)
    assert script(keys=["t:count"], args=[]) == 1
    # When Redis's replies stop arriving
    proxy.stalled.set()
    started = time.monotonic()
    # Then the call fails with redis-py's timeout error (answered 503 by the API) once the
    # timeout has passed, rather than waiting for ever
    with pytest.raises(redis.TimeoutError):
        script(keys=["t:count"], args=[])
    assert 0.4 < time.monotonic() - started < 3
    client.close()


def test_an_error_reply_is_raised_as_redis_pys_error(redis_client: redis.Redis) -> None:
    script = ThreadScript(redis_client, "return redis.error_reply('not this one')")
    with pytest.raises(redis.ResponseError, match="not this one"):
        script(keys=[], args=[])
    # And the connection stays usable
    assert ThreadScript(redis_client, COUNT)(keys=["t:count"], args=[]) == 1


def test_a_script_through_a_sentinel_client_runs_on_the_master(tmp_path: Path) -> None:
    # Given a client that finds the master through Sentinels (as with a sentinel:// URL)
    cluster = SentinelCluster(tmp_path / "redis").start()
    try:
        settings = Settings.from_env({"REDIS_URL": cluster.url,
                                      "EVENTFLOW_SENTINEL_MASTER": MASTER_NAME})
        client = redis_client(settings, decode_responses=True)
        # When a script runs on the thread's own connection
        script = ThreadScript(client, COUNT)
        assert script(keys=["t:count"], args=[]) == 1
        # Then it ran on the master, where the client's own commands go
        assert cluster.master.client().get("t:count") == "1"
        assert client.get("t:count") == "1"
    finally:
        cluster.stop()
