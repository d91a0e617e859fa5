"""Flower's configuration: it loads ``./flowerconfig.py`` by itself at start-up.

Flower shows every task, and can revoke them or shut workers down: it never starts open to
the network by accident. ``FLOWER_BASIC_AUTH`` (``user:password``, read by Flower itself)
protects it; only ``EVENTFLOW_FLOWER_NO_AUTH=true`` starts it without, for local use.
"""

from __future__ import annotations

import os


def check_flower_auth(environ: os._Environ[str] | dict[str, str]) -> None:
    """Refuse to start (``SystemExit``) without authentication unless told so explicitly."""
    basic_auth = environ.get("FLOWER_BASIC_AUTH", "").strip()
    no_auth = environ.get("EVENTFLOW_FLOWER_NO_AUTH", "").strip().lower() == "true"
    if basic_auth:
        for entry in basic_auth.split(","):
            user, _, password = entry.partition(":")
            if not user or not password:
                raise SystemExit("FLOWER_BASIC_AUTH: expected user:password (comma-separated "
                                 "for several users); Flower was not started.")
        return
    if not no_auth:
        raise SystemExit(
            "Flower refuses to start without authentication: set FLOWER_BASIC_AUTH=user:password "
            "(or EVENTFLOW_FLOWER_NO_AUTH=true for local use only)."
        )


check_flower_auth(os.environ)
