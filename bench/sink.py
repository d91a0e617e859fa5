"""A fast SMTP sink for the benchmark, run in its own process (``python -m bench.sink``).

It answers 250 to every message, counts them, and records when each one arrived, keyed by
its ``X-EventFlow-Event-Id`` header. A one-line TCP control port reports and resets that
record, so the harness never shares a GIL with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_EVENT_ID_RE = re.compile(rb"^X-EventFlow-Event-Id:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


class CountingHandler:
    """Accept every message and remember when it arrived."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything received so far."""
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.arrivals: dict[str, float] = {}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.time()
        self.count += 1
        if self.first is None:
            self.first = now
        self.last = now
        content = envelope.original_content or b""
        match = _EVENT_ID_RE.search(content[:4096])
        if match:
            self.arrivals[match.group(1).decode("ascii", "replace")] = now
        return "250 2.0.0 OK queued"

    def stats(self) -> dict[str, Any]:
        """Count and first/last arrival time (epoch seconds) since the last reset."""
        return {"count": self.count, "first": self.first, "last": self.last}


async def _serve_control(
    handler: CountingHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while line := await reader.readline():
        command = line.decode().strip()
        if command == "reset":
            handler.reset()
            reply: Any = {"ok": True}
        elif command == "stats":
            reply = handler.stats()
        elif command == "arrivals":
            reply = handler.arrivals
        else:
            reply = {"error": f"unknown command {command!r}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
    writer.close()


async def serve(host: str, port: int, control_port: int) -> None:
    """Serve SMTP on ``port`` and the control protocol on ``control_port`` until killed."""
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    smtp_server = await loop.create_server(
        # A fixed hostname: aiosmtpd would otherwise resolve the FQDN on every connection.
        lambda: SMTP(handler, hostname="bench-sink", ident="EventFlow bench sink"),
        host=host,
        port=port,
        reuse_address=True,
    )
    control = await asyncio.start_server(
        lambda r, w: _serve_control(handler, r, w), host=host, port=control_port
    )
    async with smtp_server, control:
        await asyncio.gather(smtp_server.serve_forever(), control.serve_forever())


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


def main() -> None:
    """Run the sink in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    server = serve(args.host, args.port, args.control_port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(server)
    else:
        uvloop.run(server)


if __name__ == "__main__":
    main()
