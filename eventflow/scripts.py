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
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError


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
        connection = self.connection()
        proven = getattr(self._local, "proven", False)
        try:
            reply = self._run(connection, keys, args)
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
            reply = self._run(connection, keys, args)
        except BaseException:
            # A timeout or an interruption leaves the connection's state unknown.
            connection.disconnect()
            self._local.proven = False
            raise
        self._local.proven = True
        return reply

    def _run(self, connection: ConnectionInterface, keys: Sequence[Any],
             args: Sequence[Any], *, loaded: bool = False) -> Any:
        try:
            # connect() first, as the pool's get_connection does: send_packed_command alone
            # connects to the connection's own host, past a Sentinel connection's lookup
            # of the master (redis-py 8), so the script would run on another server.
            connection.connect()
            connection.send_packed_command([hiredis.pack_command(
                ("EVALSHA", self._script.sha, len(keys), *keys, *args))])
            return connection.read_response()
        except NoScriptError:
            if loaded:
                raise  # loaded through the client, yet unknown here: another server
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load it and go on.
            self._script.sha = self._client.script_load(self._script.script)
            return self._run(connection, keys, args, loaded=True)

    def connection(self) -> ConnectionInterface:
        """This thread's connection (made on first use, and again after a fork)."""
        held: tuple[int, ConnectionInterface] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        # None yet, or one inherited through fork(): its socket is the parent's.
        connection = self._client.connection_pool.make_connection()
        self._local.held = (os.getpid(), connection)
        self._local.proven = False
        return connection


def lua_source(package: str, *names: str) -> str:
    """The Lua files ``names`` of ``package`` (beside its code), one after the other: a
    script is its own file, after the files of the functions it calls."""
    return "".join(files(package).joinpath(name).read_text() for name in names)
