"""The benchmark's side of its SMTP sink: the project's one SMTP server
(:mod:`eventflow.devstack.smtp`) run in a process of its own with ``--control-port``, so
that the harness never shares a GIL with the server it measures. It answers 250 to every
message and records when each arrived, by its ``X-EventFlow-Event-Id``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any


def command(port: int, control_port: int) -> str:
    """The sink's command line."""
    return (f"{sys.executable} -m eventflow.devstack.smtp --port {port} "
            f"--control-port {control_port}")


class SinkClient:
    """The harness's side of the control port."""

    def __init__(self, host: str, control_port: int) -> None:
        self.address = (host, control_port)

    def _ask(self, command: str) -> Any:
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(command.encode() + b"\n")
            with sock.makefile("rb") as stream:
                return json.loads(stream.readline())

    def reset(self) -> None:
        """Forget every message received so far."""
        self._ask("reset")

    def stats(self) -> dict[str, Any]:
        """``{"count", "first", "last"}`` since the last reset."""
        return self._ask("stats")

    def arrivals(self) -> dict[str, float]:
        """Arrival time of each message, keyed by its event id."""
        return self._ask("arrivals")
