"""Polling with a deadline, instead of sleeping and hoping."""

from __future__ import annotations

import time
from typing import Any


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
