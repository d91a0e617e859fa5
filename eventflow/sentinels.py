"""Which server the Sentinels name as master, asked of all of them at once.

A replicated write (``StoreBase._replicated``) is confirmed only when every Sentinel that
answers names as master the server that took it. Asked one after the other through
redis-py's Sentinel clients, three Sentinels cost three round trips and three trips
through a connection pool per write (measured in ``bench/README.md``); here the question
goes out to every Sentinel before any answer is read, on connections of the calling
thread's own (made by each Sentinel client's pool, with its timeouts), the way
``ThreadScript`` talks to Redis.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import hiredis
import redis
from redis.connection import ConnectionInterface
from redis.sentinel import SentinelConnectionPool


class SentinelView:
    """Asks the Sentinels of a Sentinel-managed pool which server is its master."""

    def __init__(self, pool: SentinelConnectionPool) -> None:
        # A copy: the manager reorders its list when it looks the master up.
        self.sentinels = list(pool.sentinel_manager.sentinels)
        question: tuple[Any, ...] = ("SENTINEL", "get-master-addr-by-name", pool.service_name)
        self._question = hiredis.pack_command(question)
        self._local = threading.local()

    def masters(self) -> list[tuple[str, int]]:
        """The master's address as each Sentinel that answered names it."""
        asked = []
        for connection in self._connections():
            try:
                connection.connect()
                connection.send_packed_command([self._question])
                asked.append(connection)
            except redis.exceptions.RedisError:
                connection.disconnect()
        named = []
        for connection in asked:
            try:
                reply = connection.read_response()
            except redis.exceptions.RedisError:
                connection.disconnect()
                continue
            if reply:
                host = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                named.append((host, int(reply[1])))
        return named

    def _connections(self) -> list[ConnectionInterface]:
        held: tuple[int, list[ConnectionInterface]] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        # None yet in this thread, or inherited through fork(): the parent's sockets.
        connections = [sentinel.connection_pool.make_connection() for sentinel in self.sentinels]
        self._local.held = (os.getpid(), connections)
        return connections
