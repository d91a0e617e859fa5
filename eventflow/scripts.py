"""Lua scripts run on a Redis connection of the calling thread's own.

redis-py's ``Script.__call__`` takes a connection from the pool for every call: a lock, a
poll of the socket for stray data, the retry wrapper and a lock again to give it back. On
the hot paths (accepting an event, a worker's take and delivered steps) that bookkeeping
costs more CPU than the same EVALSHA sent on a connection held by the thread (figures in
``bench/README.md``). So each thread keeps one connection, made by the client's pool with
the pool's settings (timeouts, TLS, credentials, database, health checks), and talks to
it through redis-py's public connection calls only (``make_connection``,
``send_packed_command``, ``read_response``, ``disconnect``), so that any redis-py the
project accepts runs it the same way and errors are redis-py's errors. The command is
packed by hiredis's ``pack_command`` in C: redis-py's own packer first walks every
argument in Python.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any, TypeVar

import hiredis
import redis
from redis.commands.core import Script
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

T = TypeVar("T")


class ThreadScript:
    """A Lua script called through a connection that belongs to the calling thread."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self._client = client
        self._script = client.register_script(source)
        self._local = threading.local()

    @property
    def script(self) -> Script:
        """The same script as redis-py's own, to run in a pipeline."""
        return self._script

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._call(keys, args, None)

    def replicated(self, keys: Sequence[Any], args: Sequence[Any], replicas: int,
                   timeout_ms: int) -> tuple[Any, int, tuple[str, int]]:
        """Run the script and ``WAIT replicas timeout_ms`` in one round trip: the script's
        reply, how many replicas confirmed it, and the address of the server that ran it
        (with Sentinels, the caller checks that it is still the master)."""
        return self._call(keys, args, (replicas, timeout_ms))  # type: ignore[no-any-return]

    def _call(self, keys: Sequence[Any], args: Sequence[Any],
              wait: Sequence[Any] | None) -> Any:
        connection = self.connection()
        proven = getattr(self._local, "proven", False)
        try:
            reply = self._run(connection, keys, args, wait)
        except RedisConnectionError:
            connection.disconnect()
            self._local.proven = False
            if not proven:
                raise
            # A connection that broke while it sat idle (Redis restarted, say): sent
            # once more on a new connection, as redis-py's own retry would. Had the
            # script run before the break, the second run finds the same ids (chosen
            # before the call): an event stored twice is one record with two messages,
            # and the worker's claim and ledger send it once.
            reply = self._run(connection, keys, args, wait)
        except BaseException:
            # A timeout or an interruption leaves the connection's state unknown.
            connection.disconnect()
            self._local.proven = False
            raise
        self._local.proven = True
        return reply

    def _run(self, connection: ConnectionInterface, keys: Sequence[Any],
             args: Sequence[Any], wait: Sequence[Any] | None, *,
             loaded: bool = False) -> Any:
        try:
            # connect() first, as the pool's get_connection does: send_packed_command alone
            # connects to the connection's own host, past a Sentinel connection's lookup
            # of the master (redis-py 8), so the script would run on another server.
            connection.connect()
            commands = [hiredis.pack_command(
                ("EVALSHA", self._script.sha, len(keys), *keys, *args))]
            if wait is not None:
                commands.append(hiredis.pack_command(("WAIT", *wait)))
            connection.send_packed_command(commands)
            try:
                reply = connection.read_response()
            except ResponseError:
                if wait is not None:
                    # The WAIT's reply is still to come: a new connection is simpler
                    # than reading it (an error here is rare: NOSCRIPT, NOREPLICAS).
                    connection.disconnect()
                raise
            if wait is None:
                return reply
            acknowledged = int(connection.read_response())
            address = (str(getattr(connection, "host", "")), int(getattr(connection, "port", 0)))
            return reply, acknowledged, address
        except NoScriptError:
            if loaded:
                raise  # loaded through the client, yet unknown here: another server
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load it and go on.
            self._script.sha = self._client.script_load(self._script.script)
            return self._run(connection, keys, args, wait, loaded=True)

    def connection(self) -> ConnectionInterface:
        """This thread's connection (made on first use, and again after a fork)."""
        return thread_own(self._local, self._new_connection)

    def _new_connection(self) -> ConnectionInterface:
        self._local.proven = False
        return self._client.connection_pool.make_connection()


def thread_own(local: threading.local, make: Callable[[], T]) -> T:
    """What ``make()`` made for the calling thread, kept in ``local``: made on first use,
    and again after a fork (what a child inherits holds the parent's sockets)."""
    held: tuple[int, T] | None = getattr(local, "held", None)
    if held is not None and held[0] == os.getpid():
        return held[1]
    value = make()
    local.held = (os.getpid(), value)
    return value


def lua_source(package: str, *names: str) -> str:
    """The Lua files ``names`` of ``package`` (beside its code), one after the other: a
    script is its own file, after the files of the functions it calls."""
    return "".join(files(package).joinpath(name).read_text() for name in names)
