"""Real EventFlow processes for tests: Celery workers (and web servers) as subprocesses.

They run the Procfile's own command lines with the test's environment through the
project's one runner (:mod:`eventflow.devstack.processes`), write their output to a log
file, and can be killed for real (SIGKILL, SIGTERM) by the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from eventflow.devstack.processes import ROOT, Process, procfile_command

__all__ = ["ROOT", "Process", "procfile_command", "worker_command", "worker_processes"]


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

