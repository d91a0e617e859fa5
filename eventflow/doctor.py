"""The configuration doctor: checks at start-up that the deployment can keep its promises.

Run by :func:`eventflow.create_app`, so by every ``web``, ``worker`` and ``flower``
process. It looks at what the settings alone cannot tell: how the Redis server behind
``REDIS_URL`` keeps (or drops) what it has acknowledged.

- An eviction policy other than ``noeviction`` with a memory limit set: Redis would drop
  queued events, leases and quota logs when full. Refused: the process does not start.
- No persistence (neither append-only file nor snapshots), snapshots only, or
  ``appendfsync no``: a Redis crash loses accepted events. A warning; refused when
  ``EVENTFLOW_STRICT_REDIS=true``.
- The longest retry wait not below the visibility timeout: refused
  (:meth:`Settings.check`).
- ``EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS=true``: said, since recipients at ``.test``,
  ``.local``, ``.internal`` and ``.localhost`` are then accepted.

The doctor never makes start-up slow or fail because Redis is away for a moment: it gives
Redis one second, and if it does not answer it says so and lets the process start (the
web process then answers 503 until Redis is back; workers reconnect by themselves).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisError

from eventflow.schemas import SPECIAL_USE_DOMAINS
from eventflow.services import redis_client
from eventflow.settings import ConfigError, Settings

log = logging.getLogger(__name__)

STRICT_VARIABLE = "EVENTFLOW_STRICT_REDIS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass
class Diagnosis:
    """What the doctor found: ``refusals`` stop the process, ``warnings`` are logged."""

    warnings: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    redis_checked: bool = False


def strict_redis(environ: Mapping[str, str] | None = None) -> bool:
    """``EVENTFLOW_STRICT_REDIS``: refuse to start on a Redis that does not persist."""
    raw = (os.environ if environ is None else environ).get(STRICT_VARIABLE, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(STRICT_VARIABLE, f"expected true or false, got {raw!r}")


def diagnose(settings: Settings, client: redis.Redis, *, strict: bool = False) -> Diagnosis:
    """Check ``settings`` and the Redis server ``client`` talks to."""
    diagnosis = Diagnosis()
    settings.check()  # raises ConfigError: a retry could outlive the visibility timeout
    if settings.allow_special_use_domains:
        diagnosis.warnings.append(
            "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS=true: recipients at special-use domains ("
            + ", ".join(f".{name}" for name in SPECIAL_USE_DOMAINS)
            + ") are accepted; only a relay that knows them can deliver there."
        )
    if settings.webhooks and settings.webhooks_allow_private:
        diagnosis.warnings.append(
            "EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE=true: status webhooks may go to private and "
            "loopback addresses (" + ", ".join(hook.key_name for hook in settings.webhooks)
            + " have a webhook); keep it off in production."
        )
    try:
        pipe = client.pipeline(transaction=False)
        pipe.info("memory")
        pipe.info("persistence")
        # CONFIG is often disabled on managed Redis; then only INFO is known.
        pipe.config_get("save")
        pipe.config_get("appendfsync")
        memory, persistence, save, fsync = pipe.execute(raise_on_error=False)
    except RedisError as exc:
        diagnosis.warnings.append(
            f"Redis did not answer at start-up ({type(exc).__name__}); its configuration "
            "was not checked. Requests are answered 503 until it is back."
        )
        return diagnosis
    diagnosis.redis_checked = True
    if isinstance(memory, dict):
        _check_eviction(memory, diagnosis)
    if isinstance(persistence, dict):
        _check_persistence(persistence, _config_value(save, "save"),
                           _config_value(fsync, "appendfsync"), diagnosis, strict)
    return diagnosis


def _config_value(reply: Any, name: str) -> str | None:
    if isinstance(reply, dict) and name in reply:
        return str(reply[name])
    return None


def _check_eviction(memory: Mapping[str, Any], diagnosis: Diagnosis) -> None:
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        return
    if int(memory.get("maxmemory", 0) or 0) > 0:
        diagnosis.refusals.append(
            f"Redis has maxmemory-policy {policy} with a memory limit: when full it would "
            "delete queued events, leases and rate-limit logs. Set maxmemory-policy "
            "noeviction (deploy/redis.conf does)."
        )
    else:
        diagnosis.warnings.append(
            f"Redis has maxmemory-policy {policy}; harmless without a memory limit, but "
            "set noeviction before setting maxmemory."
        )


def _check_persistence(
    persistence: Mapping[str, Any], save: str | None, fsync: str | None,
    diagnosis: Diagnosis, strict: bool,
) -> None:
    problem = None
    if str(persistence.get("aof_enabled", "0")) != "1":
        if save is None:
            problem = ("Redis's append-only file is off (snapshot settings unknown): a Redis "
                       "crash loses the events accepted since the last snapshot")
        elif not save.strip():
            problem = ("Redis has no persistence (appendonly no, save \"\"): a Redis "
                       "restart loses every queued event")
        else:
            problem = ("Redis keeps only snapshots (appendonly no): a Redis crash loses the "
                       "events accepted since the last snapshot")
    elif fsync == "no":
        problem = ("Redis has appendfsync no: a machine crash can lose the last ~30 s of "
                   "accepted events")
    if problem is None:
        return
    advice = "Turn on appendonly yes with appendfsync everysec (deploy/redis.conf does)."
    if strict:
        diagnosis.refusals.append(f"{problem}. {advice} ({STRICT_VARIABLE}=true)")
    else:
        diagnosis.warnings.append(
            f"{problem}. {advice} Set {STRICT_VARIABLE}=true to refuse to start instead."
        )


def check_deployment(settings: Settings, environ: Mapping[str, str] | None = None) -> Diagnosis:
    """Run the doctor for this process: log the warnings, raise on a refusal."""
    client = redis_client(settings, socket_connect_timeout=1, socket_timeout=1)
    try:
        strict = settings.strict_redis if environ is None else strict_redis(environ)
        diagnosis = diagnose(settings, client, strict=strict)
    finally:
        client.close()
    for warning in diagnosis.warnings:
        log.warning("doctor: %s", warning)
    if diagnosis.refusals:
        for refusal in diagnosis.refusals:
            log.error("doctor: %s", refusal)
        raise ConfigError("REDIS_URL", " ".join(diagnosis.refusals))
    return diagnosis
