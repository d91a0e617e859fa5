"""Which server the Sentinels name as master, asked of all of them at once.

A replicated write (``StoreBase._replicated``) is confirmed only when the newest
configuration the Sentinels hold (the highest config epoch among those that answer, as
Sentinel itself settles disagreements) names as master the server that took it: the
Sentinel that leads a failover holds the new configuration first, and one that has not
heard of it yet (cut off from the Redis nodes, say) must not be able to hold back every
write. Asked one after the other through redis-py's Sentinel clients, three Sentinels
cost three round trips and three trips through a connection pool per write (measured in
``bench/README.md``); here the question goes out to every Sentinel before any answer is
read, on connections of the calling thread's own (made by each Sentinel client's pool,
with its timeouts), the way ``ThreadScript`` talks to Redis.
"""

from __future__ import annotations

import threading
from typing import Any

import hiredis
import redis
from redis.connection import ConnectionInterface
from redis.sentinel import SentinelConnectionPool

from eventflow.scripts import thread_own


class SentinelView:
    """Asks the Sentinels of a Sentinel-managed pool which server is its master."""

    def __init__(self, pool: SentinelConnectionPool) -> None:
        # A copy: the manager reorders its list when it looks the master up.
        self.sentinels = list(pool.sentinel_manager.sentinels)
        # The address as get-master-addr-by-name gives it (the Sentinel that leads a
        # failover gives the new master's as soon as it has seen it promoted, while its
        # SENTINEL MASTER shows the old address until the failover ends), and the config
        # epoch from SENTINEL MASTER; one after the other, so they agree.
        address: tuple[Any, ...] = ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", pool.service_name)
        master: tuple[Any, ...] = ("SENTINEL", "MASTER", pool.service_name)
        self._questions = [hiredis.pack_command(address), hiredis.pack_command(master)]
        self._local = threading.local()

    def masters(self) -> list[tuple[int, str, int]]:
        """``(config epoch, host, port)`` of the master, as each Sentinel that answered
        names it."""
        asked = []
        for connection in self._connections():
            try:
                connection.connect()
                connection.send_packed_command(self._questions)
                asked.append(connection)
            except redis.exceptions.RedisError:
                connection.disconnect()
        named = []
        for connection in asked:
            try:
                address, master = connection.read_response(), connection.read_response()
            except redis.exceptions.RedisError:
                connection.disconnect()
                continue
            pairs = (master.items() if isinstance(master, dict)  # RESP3: a map
                     else zip(master[::2], master[1::2], strict=False))
            fields = {_text(key): _text(value) for key, value in pairs}
            if address:
                named.append((int(fields.get("config-epoch") or 0), _text(address[0]),
                              int(address[1])))
        return named

    def _connections(self) -> list[ConnectionInterface]:
        return thread_own(self._local, lambda: [
            sentinel.connection_pool.make_connection() for sentinel in self.sentinels])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
