"""Development credentials: made once with :mod:`secrets`, kept in ``var/dev.env``.

The file is shell-sourceable (``set -a; . var/dev.env``) and readable by its owner only.
Deleting it makes the next ``make run`` generate new ones.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

#: File under the state directory that keeps the development credentials.
FILENAME = "dev.env"
#: User name of Flower's development basic auth.
FLOWER_USER = "dev"


@dataclass(frozen=True)
class DevCredentials:
    """The development API key (producer and admin) and Flower's ``user:password``."""

    api_key: str
    flower_basic_auth: str

    @property
    def key_name(self) -> str:
        """The name EventFlow gives the development key (a key listed as itself)."""
        return f"key-{hashlib.sha256(self.api_key.encode()).hexdigest()[:8]}"

    @property
    def webhook_secret(self) -> str:
        """The Standard Webhooks secret of the development key's webhook: derived from the
        key, so that ``var/dev.env`` made before webhooks existed still serves."""
        digest = hashlib.sha256(f"eventflow-dev-webhook:{self.api_key}".encode()).digest()
        return "whsec_" + base64.b64encode(digest).decode()

    @property
    def flower_user(self) -> str:
        """Flower's development user name."""
        return self.flower_basic_auth.partition(":")[0]

    @property
    def flower_password(self) -> str:
        """Flower's development password."""
        return self.flower_basic_auth.partition(":")[2]


def generate() -> DevCredentials:
    """New random credentials; neither contains ``:`` or ``,`` (the variables' separators)."""
    return DevCredentials(
        api_key=f"evf_dev_{secrets.token_urlsafe(24)}",
        flower_basic_auth=f"{FLOWER_USER}:{secrets.token_urlsafe(12)}",
    )


def load_or_create(var_dir: Path) -> DevCredentials:
    """The credentials kept under ``var_dir``, generated and written there the first time."""
    path = var_dir / FILENAME
    values = read_env_file(path) if path.exists() else {}
    key, auth = values.get("EVENTFLOW_DEV_API_KEY"), values.get("FLOWER_BASIC_AUTH")
    if key and auth:
        return DevCredentials(key, auth)
    credentials = generate()
    var_dir.mkdir(parents=True, exist_ok=True)
    # Created with 0600 from the start: the key is an admin key of the dev stack.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            "# Development credentials of `make run`; delete this file for new ones.\n"
            f"EVENTFLOW_DEV_API_KEY={credentials.api_key}\n"
            f"FLOWER_BASIC_AUTH={credentials.flower_basic_auth}\n"
        )
    return credentials


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of ``path``; comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values
