"""The Procfile, and its processes run for real: one reader and one runner for the tests,
the benchmark and ``make run``.

A process runs its command line through ``sh -c 'exec <line>'``, so the shell expands
``${PORT:-8000}`` and friends as a Procfile runner would; it has a process group of its
own (a test can SIGKILL it and everything it started) and writes its output to a log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from honcho.environ import parse_procfile

#: The repository: where the Procfile is and where processes start.
ROOT = Path(__file__).resolve().parents[2]


class ProcessError(AssertionError):
    """A process did not start, did not answer, or died."""


def read_procfile(path: Path = ROOT / "Procfile") -> dict[str, str]:
    """Each process type of the Procfile at ``path``, and its command line."""
    return dict(parse_procfile(path.read_text()).processes)


def procfile_command(name: str, path: Path = ROOT / "Procfile") -> str:
    """The command line of process type ``name``."""
    return read_procfile(path)[name]


class Process:
    """A command line running in its own process group, with its output in ``log``."""

    def __init__(self, command: str, env: Mapping[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.command = command
        self.log = log
        bin_dir = str(Path(sys.executable).parent)
        full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{env.get('PATH', os.defpath)}",
                    "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as output:
            output.write(f"$ {command}\n".encode())
            output.flush()
            self.popen = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"], cwd=cwd, env=full_env,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the output, on one line."""
        return " | ".join(self.output().strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise with the end of the output if the process has exited."""
        if self.popen.poll() is not None:
            raise ProcessError(f"exited with {self.popen.returncode}: {self.log_tail(40)}")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the output; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ProcessError(f"timed out waiting for {text!r}: {self.log_tail(40)}")
            time.sleep(0.05)

    def wait_for_port(self, port: int, timeout: float = 30) -> Process:
        """Wait until something accepts connections on 127.0.0.1:``port``."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise ProcessError(f"nothing listens on {port} after {timeout}s: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)

    def children(self) -> list[int]:
        """Pids of the direct children (the web server's workers, a prefork worker's pool)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except FileNotFoundError:
            return []

    def rss_mb(self) -> dict[str, float]:
        """Resident memory in MB of the process and of each of its children."""
        sizes = {}
        for kind, pid in [("main", self.pid), *(("child", pid) for pid in self.children())]:
            try:
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            sizes[f"{kind}:{pid}"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        return sizes

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
