"""The objects a process shares: settings, Redis, the event store, the sender."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from eventflow.clock import Clock, SystemClock
from eventflow.delivery import Delivery
from eventflow.mailer import Sender, SmtpSender
from eventflow.rendering import Templates
from eventflow.settings import Settings
from eventflow.store import EventStore


@dataclass
class Services:
    """Everything a request or a task needs, built once per process."""

    settings: Settings
    redis: redis.Redis
    store: EventStore
    delivery: Delivery
    templates: Templates

    @classmethod
    def build(
        cls, settings: Settings, clock: Clock | None = None, sender: Sender | None = None
    ) -> Services:
        client = redis_client(settings.redis_url)
        store = EventStore(client, clock or SystemClock())
        sender = sender or SmtpSender(settings.smtp, settings.smtp_timeout)
        templates = Templates.from_settings(settings.templates_dir)
        return cls(settings, client, store, Delivery(store, sender, settings, templates),
                   templates)


def redis_client(url: str) -> redis.Redis:
    """A client that gives up quickly when Redis is away, so callers can answer 503."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.5,
        socket_timeout=3,
        health_check_interval=30,
        retry_on_timeout=False,
    )
