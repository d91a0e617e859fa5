"""Real EventFlow processes for tests: Celery workers (and web servers) as subprocesses.

They run the Procfile's own command lines with the test's environment, write their output
to a log file, and can be killed for real (SIGKILL, SIGTERM) by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def procfile_command(name: str) -> str:
    """The command line of process type ``name`` in the Procfile."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        kind, _, command = line.partition(":")
        if kind.strip() == name:
            return command.strip()
    raise KeyError(name)


class Process:
    """A subprocess in its own process group, with its output in ``log``."""

    def __init__(self, command: str, env: Mapping[str, str], log: Path) -> None:
        self.log = log
        bin_dir = str(Path(sys.executable).parent)
        full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command}"], cwd=ROOT, env=full_env,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the output; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}):\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def children(self) -> list[int]:
        """Pids of the direct children (a prefork worker's pool processes)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except FileNotFoundError:
            return []

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL what is left after ``timeout``."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        self._log_file.close()


def worker_command(concurrency: int = 1, extra: str = "") -> str:
    """The Procfile's ``worker`` line, with the concurrency given."""
    command = procfile_command("worker").replace("${WORKER_CONCURRENCY:-2}", str(concurrency))
    return f"{command} {extra}".strip()


@contextmanager
def worker_processes(
    env: Mapping[str, str], tmp_path: Path, count: int = 1, concurrency: int = 1,
    extra: str = "",
) -> Iterator[list[Process]]:
    """``count`` real worker processes (the Procfile's command), ready to consume."""
    workers = []
    try:
        for n in range(count):
            command = worker_command(concurrency, f"-n worker{n}-{os.getpid()}@%h {extra}")
            workers.append(Process(command, env, tmp_path / f"worker{n}.log"))
        for process in workers:
            process.wait_for_output("ready.", timeout=45)
        yield workers
    finally:
        for process in workers:
            process.stop()

