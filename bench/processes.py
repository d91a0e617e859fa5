"""The benchmark's processes: the project's one runner (:mod:`eventflow.devstack.processes`),
named and started only when the harness asks for them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from eventflow.devstack.processes import Process, ProcessError

ServiceError = ProcessError


class Service:
    """One process of the benchmark: its command line until :meth:`start`, then a
    :class:`~eventflow.devstack.processes.Process`."""

    def __init__(
        self, name: str, line: str, env: Mapping[str, str], cwd: Path, log_dir: Path
    ) -> None:
        self.name = name
        self.line = line
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.process: Process | None = None

    def start(self) -> Service:
        self.process = Process(self.line, self.env, self.log_path, self.cwd)
        return self

    @property
    def running(self) -> Process:
        if self.process is None:
            raise ServiceError(f"{self.name} is not started")
        return self.process

    @property
    def pid(self) -> int:
        return self.running.pid

    def check_alive(self) -> None:
        try:
            self.running.check_alive()
        except ProcessError as error:
            raise ServiceError(f"{self.name} {error}") from None

    def wait_for_port(self, port: int, timeout: float = 30.0) -> Service:
        self.running.wait_for_port(port, timeout)
        return self

    def rss_mb(self) -> dict[str, float]:
        return self.running.rss_mb()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)
