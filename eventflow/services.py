"""The objects a process shares: settings, Redis, the event store, the sender."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.sentinel import Sentinel

from eventflow.clock import Clock, SystemClock
from eventflow.delivery import Delivery
from eventflow.mailer import Sender, SmtpSender
from eventflow.rendering import Templates
from eventflow.settings import Settings, sentinel_addresses
from eventflow.store import EventStore
from eventflow.suppressions import Suppressions
from eventflow.webhooks import Webhooks


@dataclass
class Services:
    """Everything a request or a task needs, built once per process."""

    settings: Settings
    redis: redis.Redis
    store: EventStore
    delivery: Delivery
    templates: Templates
    suppressions: Suppressions
    webhooks: Webhooks

    @classmethod
    def build(
        cls, settings: Settings, clock: Clock | None = None, sender: Sender | None = None
    ) -> Services:
        client = redis_client(settings)
        store = EventStore(client, clock or SystemClock(), settings.event_retention,
                           settings.redis_min_replicas)
        sender = sender or SmtpSender(settings.smtp, settings.smtp_timeout)
        templates = Templates.from_settings(settings.templates_dir)
        suppressions = Suppressions(client, store.clock, settings.suppression_ttl)
        webhooks = Webhooks(store, settings)
        delivery = Delivery(store, sender, settings, templates, suppressions, webhooks)
        return cls(settings, client, store, delivery, templates, suppressions, webhooks)


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of EventFlow's Redis that gives up quickly when Redis is away, so that
    callers can answer 503. With a ``sentinel://`` URL, it asks the Sentinels where the
    master is, and asks again after a failover."""
    options = {"socket_connect_timeout": 1.5, "socket_timeout": 3, "health_check_interval": 30,
               "retry_on_timeout": False, **options}
    if not settings.redis_url.startswith("sentinel://"):
        return redis.Redis.from_url(settings.redis_url, **options)
    address = sentinel_addresses(settings.redis_url)
    sentinel = Sentinel(
        address.sentinels,
        sentinel_kwargs={"socket_connect_timeout": options["socket_connect_timeout"],
                         "socket_timeout": options["socket_timeout"]},
    )
    return sentinel.master_for(settings.sentinel_master, db=address.db,
                               password=address.password, **options)
