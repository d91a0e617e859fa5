"""Start, watch and stop the processes under test, and read their memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import psutil


class ServiceError(RuntimeError):
    """A process under test did not start, or died."""


class Service:
    """One process type run through ``bash -c 'exec <line>'`` in its own process group.

    The shell expands ``${PORT:-8000}`` and friends exactly as a Procfile runner would.
    """

    def __init__(
        self, name: str, line: str, env: Mapping[str, str], cwd: Path, log_dir: Path
    ) -> None:
        self.name = name
        self.line = line
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        """Start the process; its output goes to ``log_path``."""
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {self.line}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                ["bash", "-c", f"exec {self.line}"],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The pid of the process's main process (the web server's or celery's master)."""
        if self.process is None:
            raise ServiceError(f"{self.name} is not started")
        return self.process.pid

    def check_alive(self) -> None:
        """Raise with the end of the log if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with {self.process.returncode}: {self.log_tail()}"
            )

    def wait_for_port(self, port: int, timeout: float = 30.0) -> Service:
        """Wait until something accepts connections on 127.0.0.1:``port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise ServiceError(f"{self.name} did not listen on {port} in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def rss_mb(self) -> dict[str, float]:
        """Resident memory in MB of the main process and of each of its children."""
        main = psutil.Process(self.pid)
        sizes = {f"main:{main.pid}": main.memory_info().rss / 2**20}
        for child in main.children(recursive=True):
            try:
                sizes[f"child:{child.pid}"] = child.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                continue
        return sizes

    def children(self) -> list[int]:
        """Pids of the process's children (web server workers, Celery pool processes)."""
        return [child.pid for child in psutil.Process(self.pid).children(recursive=True)]

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process group gracefully (SIGTERM), then for good (SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session: the group is the one we created
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(5)
        # Pool processes may outlive their master by a moment.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
