"""A TCP proxy in front of Redis that cuts a connection at a chosen command.

Every byte is forwarded as is, until a client sends a command that contains one of the
proxy's patterns: then, in ``drop`` mode, the connection is closed before the command
reaches Redis (Redis unreachable at that moment); in ``lose_reply`` mode the command is
forwarded, Redis runs it, and the connection is closed before the reply reaches the
client (a reply lost after Redis ran the command).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Cut:
    """Cut connections that send ``pattern``: ``times`` of them (None: until disarmed)."""

    pattern: bytes
    mode: str = "drop"
    times: int | None = None
    seen: int = 0


class CuttingProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to ``upstream``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._cuts: list[Cut] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self, pattern: bytes, mode: str = "drop", times: int | None = None) -> Cut:
        cut = Cut(pattern, mode, times)
        with self._lock:
            self._cuts.append(cut)
        return cut

    def disarm(self) -> None:
        with self._lock:
            self._cuts.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _match(self, chunk: bytes) -> Cut | None:
        with self._lock:
            for cut in self._cuts:
                if cut.pattern in chunk:
                    cut.seen += 1
                    if cut.times is not None and cut.seen >= cut.times:
                        self._cuts.remove(cut)
                    return cut
        return None

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            swallow = threading.Event()
            threading.Thread(target=self._requests, args=(client, server, swallow),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, swallow),
                             daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket,
                  swallow: threading.Event) -> None:
        try:
            while chunk := client.recv(65536):
                cut = self._match(chunk)
                if cut is not None and cut.mode == "lose_reply":
                    swallow.set()
                    server.sendall(chunk)
                    time.sleep(0.2)  # Redis runs it; its reply goes nowhere
                if cut is not None:
                    break
                server.sendall(chunk)
        except OSError:
            pass
        _close(client, server)

    def _replies(self, server: socket.socket, client: socket.socket,
                 swallow: threading.Event) -> None:
        try:
            while chunk := server.recv(65536):
                if swallow.is_set():
                    break
                client.sendall(chunk)
        except OSError:
            pass
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
