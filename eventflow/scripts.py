"""Lua scripts run on a Redis connection of the calling thread's own.

redis-py's ``Script.__call__`` takes a connection from the pool for every call: a lock, a
poll of the socket for stray data, the retry wrapper and a lock again to give it back. On
the hot paths (accepting an event, a worker's take and delivered steps) that bookkeeping
cost more than the script's own round trip, and more than the same EVALSHA sent on a
connection held by the thread (figures in ``bench/README.md``). So each
thread keeps one connection, made by the client's pool with the pool's settings
(timeouts, TLS, credentials, database, health checks), and reads the replies with
redis-py's own parser, so errors are redis-py's errors.

On a plain TCP or Unix socket the round trip itself is two system calls: the socket is
left blocking and the client's ``socket_timeout`` is set in the kernel (``SO_RCVTIMEO``,
``SO_SNDTIMEO``). Python's own timeouts poll the socket before each send and receive,
which doubles the system calls, and each is a moment the thread gives up the GIL to
another and then waits to get it back.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis._parsers import hiredis as _redis_hiredis
from redis.commands.core import Script
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


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
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        connection, fresh = self._connection()
        try:
            return self._run(connection, command)
        except RedisConnectionError:
            connection.disconnect()
            if fresh:
                raise
            # A connection that broke while it sat idle (Redis restarted, say): sent
            # once more on a new connection, as redis-py's own retry would. Had the
            # script run before the break, the second run finds the same ids (chosen
            # before the call): an event stored twice is one record with two messages,
            # and the worker's claim and ledger send it once.
            return self._run(connection, command)
        except BaseException:
            # A timeout or an interruption leaves the connection's state unknown.
            connection.disconnect()
            raise

    def _run(self, connection: ConnectionInterface, command: tuple[Any, ...]) -> Any:
        # hiredis packs the command in C; redis-py's packer walks the arguments in Python.
        packed = hiredis.pack_command(command)
        try:
            sock = _kernel_timed_socket(connection)
            if sock is None:
                connection.send_packed_command([packed])
                return connection.read_response()
            return _round_trip(sock, connection._parser, packed)  # type: ignore[attr-defined]
        except NoScriptError:
            # Redis lost its script cache (a restart, SCRIPT FLUSH): load it and go on.
            self._script.sha = self._client.script_load(self._script.script)
            return self._run(connection, ("EVALSHA", self._script.sha, *command[2:]))

    def _connection(self) -> tuple[ConnectionInterface, bool]:
        """This thread's connection, and whether it is new (not yet connected)."""
        held: tuple[int, ConnectionInterface] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            connection = held[1]
            return connection, not getattr(connection, "is_connected", False)
        # None yet, or one inherited through fork(): its socket is the parent's.
        connection = self._client.connection_pool.make_connection()
        self._local.held = (os.getpid(), connection)
        return connection, True


#: What the parser's hiredis reader returns while a reply is incomplete.
_NOT_ENOUGH_DATA = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", False)


def _kernel_timed_socket(connection: Any) -> socket.socket | None:
    """The connection's socket, made blocking with its timeout kept by the kernel; None
    when the connection is not a plain socket read by hiredis."""
    if getattr(connection, "_sock", None) is None:
        connection.connect()
    sock = getattr(connection, "_sock", None)
    parser = getattr(connection, "_parser", None)
    # Anything else (TLS, another parser, a redis-py whose internals moved) goes the
    # slower way, through redis-py's own calls.
    if type(sock) is not socket.socket or getattr(parser, "_reader", None) is None \
            or not isinstance(getattr(parser, "_buffer", None), bytearray):
        return None
    timeout = sock.gettimeout()
    if timeout is not None:  # a socket not yet switched: each new connection once
        seconds, fraction = divmod(timeout, 1)
        interval = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
    return sock


def _round_trip(sock: socket.socket, parser: Any, packed: bytes) -> Any:
    """Send one packed command and read its reply as redis-py's hiredis parser would."""
    reader, buffer = parser._reader, parser._buffer
    try:
        sock.sendall(packed)
        while True:
            received = sock.recv_into(buffer)
            if not received:
                raise RedisConnectionError("Connection closed by server.")
            reader.feed(buffer, 0, received)
            reply = reader.gets()
            if reply is not _NOT_ENOUGH_DATA:
                break
    except OSError as exc:  # the kernel's timeout ends a blocking call with EAGAIN
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise RedisTimeoutError("Timeout reading from socket") from None
        raise RedisConnectionError(f"Error on the Redis socket: {exc}") from None
    if isinstance(reply, ResponseError):  # NoScriptError among them
        raise reply
    if isinstance(reply, RedisConnectionError):
        raise reply
    return reply
