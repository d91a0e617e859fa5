"""The Procfile's process types, turned into the commands the benchmark runs.

The baselines run under the very command of the ``web`` and ``worker`` lines with only the
application module swapped, so when the Procfile changes, the baselines follow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from eventflow.devstack.processes import read_procfile

__all__ = ["ProcessCommand", "read_procfile", "with_app"]

#: ``module:attribute`` as gunicorn and ``celery -A`` take it (a bind address has a digit
#: before its colon, so it does not match).
_APP_SPEC_RE = re.compile(r"(?<=\s)[A-Za-z_][\w.]*:[A-Za-z_]\w*(?=\s|$)")
_CONFIG_FLAG_RE = re.compile(r"\s(?:--config|-c)[=\s](\S+)")


@dataclass(frozen=True)
class ProcessCommand:
    """A shell command line, and what the harness had to change to run it here."""

    line: str
    notes: tuple[str, ...] = ()


def with_app(line: str, app_spec: str | None, root: Path) -> ProcessCommand:
    """``line`` with its ``module:attr`` replaced by ``app_spec`` and bound to loopback only.

    A ``--config`` file that does not exist yet is dropped (and said so in the notes)
    rather than failing the run: the lead may not have written it yet.
    """
    notes: list[str] = []
    if app_spec is not None:
        line, count = _APP_SPEC_RE.subn(app_spec, line, count=1)
        if count == 0:
            raise ValueError(f"no module:attribute to replace in {line!r}")
    # Benchmark traffic stays on the loopback interface.
    line = line.replace("0.0.0.0", "127.0.0.1")
    match = _CONFIG_FLAG_RE.search(line)
    if match and not (root / match.group(1)).exists():
        line = line.replace(match.group(0), "", 1)
        notes.append(f"{match.group(1)} does not exist: run without it")
    return ProcessCommand(line, tuple(notes))
