"""Lua scripts on the thread's own connection: they survive what a pooled call survives."""

from __future__ import annotations

import os
import threading

import redis

from eventflow.scripts import ThreadScript

COUNT = "return redis.call('INCR', KEYS[1])"


def local_address(script: ThreadScript) -> str:
    """``host:port`` of the connection the calling thread's last call used."""
    connection = script._local.held[1]  # Lua may not ask CLIENT ID
    host, port = connection._sock.getsockname()[:2]
    return f"{host}:{port}"


def test_a_script_runs_again_on_a_new_connection_after_redis_dropped_the_idle_one(
    redis_client: redis.Redis,
) -> None:
    # Given a script that has run once on this thread's connection
    script = ThreadScript(redis_client, COUNT)
    assert script(keys=["t:count"], args=[]) == 1
    first = local_address(script)
    # When Redis closes that connection (as a restart would)
    redis_client.client_kill(first)
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
