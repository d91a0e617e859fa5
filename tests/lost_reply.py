"""A TCP proxy in front of a real Redis that can lose a reply after Redis ran the command.

It forwards every command to Redis and every reply back, reading both streams as RESP
to tell one command (and its reply) from the next. Armed with :meth:`LostReplyProxy.cut`,
it waits for Redis's whole reply to a chosen command (so the command did run), drops it
and closes that client's connection: what a client sees when the network breaks at the
worst moment. The client's own retry then sends the command again, through the proxy,
to the same Redis.

    with LostReplyProxy(redis_url) as proxy:
        client = redis_client(proxy.url)           # the app's client and retry settings
        proxy.cut(("EVALSHA", "EXEC"))             # the next script or transaction
        store.mark_delivered(...)                  # runs, loses its reply, runs again
        assert proxy.cuts == 1

Only request/reply traffic (RESP2 or RESP3): no pub/sub, client-side caching or
MONITOR on a proxied connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit


def resp_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """Where the RESP value (RESP2 or RESP3) that begins at ``start`` ends; None if not
    all there yet."""
    if start >= len(buffer):
        return None
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, head = bytes(buffer[start:start + 1]), bytes(buffer[start + 1:line_end])
    after = line_end + 2
    if kind in _LINES:
        return after
    if kind in _BLOBS:
        size = int(head)
        if size < 0:
            return after
        end = after + size + 2
        return end if end <= len(buffer) else None
    if kind in _AGGREGATES:
        count = max(int(head), 0) * _AGGREGATES[kind]
        position: int | None = after
        for _ in range(count):
            position = resp_end(buffer, position)  # type: ignore[arg-type]
            if position is None:
                return None
        if kind == b"|":  # attributes come before the value they describe
            return resp_end(buffer, position)  # type: ignore[arg-type]
        return position
    raise ValueError(f"not RESP: {bytes(buffer[start:start + 20])!r}")


_LINES = (b"+", b"-", b":", b"_", b"#", b",", b"(")
_BLOBS = (b"$", b"=", b"!")
#: Aggregate types and how many values each of their elements has.
_AGGREGATES = {b"*": 1, b"~": 1, b">": 1, b"%": 2, b"|": 2}


def command_words(command: bytes) -> list[bytes]:
    """The words of one command as a client sends it (an array of bulk strings)."""
    words: list[bytes] = []
    if not command.startswith(b"*"):  # an inline command
        return command.split()
    position = command.index(b"\r\n") + 2
    while position < len(command):
        line_end = command.index(b"\r\n", position)
        size = int(command[position + 1:line_end])
        words.append(command[line_end + 2:line_end + 2 + size])
        position = line_end + 2 + size + 2
    return words


Match = Callable[[list[bytes]], bool]


class LostReplyProxy:
    """Forwards clients to the Redis of ``redis_url``; loses chosen replies on request."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._redis_url = parts
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: list[tuple[Match, int, Callable[[], object] | None]] = []
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._running = True
        #: How many replies were lost so far.
        self.cuts = 0
        #: The names of the commands forwarded, in order (upper case).
        self.commands: list[str] = []

    @property
    def url(self) -> str:
        """The same Redis URL (database, credentials), through the proxy."""
        netloc = self._redis_url.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc_text = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit(self._redis_url._replace(netloc=netloc_text))

    def cut(
        self, commands: Iterable[str] = ("EVAL", "EVALSHA", "EXEC"), nth: int = 1,
        match: Match | None = None, before_cut: Callable[[], object] | None = None,
    ) -> None:
        """Lose the reply to the ``nth`` command from now whose name is in ``commands``
        (and that ``match`` accepts, given its words), then close its connection.

        ``before_cut`` runs once Redis has answered and before the client's connection is
        closed: what others do while the client waits for its reply.
        """
        names = {name.upper().encode() for name in commands}

        def wanted(words: list[bytes]) -> bool:
            if not words or words[0].upper() not in names:
                return False
            try:
                return match is None or match(words)
            except IndexError:  # a command shorter than ``match`` expects
                return False

        with self._lock:
            self._armed.append((wanted, nth, before_cut))

    def start(self) -> Self:
        threading.Thread(target=self._accept, daemon=True, name="lost-reply-proxy").start()
        return self

    def stop(self) -> None:
        self._running = False
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- the forwarding ----------------------------------------------------------------

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            # Per connection: the replies still awaited, each marked True if it is lost.
            pending: list[bool] = []
            condition = threading.Lock()  # guards pending
            threading.Thread(target=self._requests, args=(client, upstream, pending, condition),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(client, upstream, pending, condition),
                             daemon=True).start()

    def _lose(self, words: list[bytes]) -> tuple[Match, Callable[[], object] | None] | None:
        """The cut armed for this command, if its reply is to be lost."""
        with self._lock:
            self.commands.append(words[0].decode(errors="replace").upper() if words else "")
            for index, (wanted, nth, before_cut) in enumerate(self._armed):
                if wanted(words):
                    if nth > 1:
                        self._armed[index] = (wanted, nth - 1, before_cut)
                        return None
                    del self._armed[index]
                    return wanted, before_cut
        return None

    def _requests(self, client: socket.socket, upstream: socket.socket, pending: list[Any],
                  condition: threading.Lock) -> None:
        buffer = bytearray()
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                position = 0
                while (end := resp_end(buffer, position)) is not None:
                    command = bytes(buffer[position:end])
                    with condition:
                        pending.append(self._lose(command_words(command)))
                    upstream.sendall(command)
                    position = end
                del buffer[:position]
        except (OSError, ValueError):
            pass
        _close(upstream)

    def _replies(self, client: socket.socket, upstream: socket.socket, pending: list[Any],
                 condition: threading.Lock) -> None:
        buffer = bytearray()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                buffer += data
                position = 0
                while (end := resp_end(buffer, position)) is not None:
                    with condition:
                        lose = pending.pop(0) if pending else None
                    if lose is not None and buffer.startswith(b"-NOSCRIPT", position):
                        # Not run: the client loads the script and sends it again.
                        with self._lock:
                            self._armed.insert(0, (lose[0], 1, lose[1]))
                        lose = None
                    if lose is not None:
                        # Redis ran the command and answered: the answer never arrives.
                        if lose[1] is not None:
                            lose[1]()
                        with self._lock:
                            self.cuts += 1
                        _close(client)
                        _close(upstream)
                        return
                    client.sendall(buffer[position:end])
                    position = end
                del buffer[:position]
        except (OSError, ValueError):
            pass
        _close(client)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
