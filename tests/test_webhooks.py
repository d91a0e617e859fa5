"""Status webhooks: a real worker POSTs each final status to a real HTTP receiver on
loopback, which checks the Standard Webhooks signature with the ``standardwebhooks``
library."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from eventflow.devstack.webhooks import WebhookReceiver
from eventflow.settings import ConfigError, Settings
from tests.conftest import ADMIN_KEY, EXAMPLE_EVENT, OTHER_PRODUCER_KEY, PRODUCER_KEY, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: The name EventFlow gives a key listed as the secret itself.
PRODUCER = f"key-{hashlib.sha256(PRODUCER_KEY.encode()).hexdigest()[:8]}"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver on loopback that verifies every signature."""
    server = WebhookReceiver(SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def app(make_app: Callable[..., Flask], receiver: WebhookReceiver) -> Flask:
    """The app with a webhook for the producer key (on loopback: allowed)."""
    return make_app(EVENTFLOW_WEBHOOKS=f"{PRODUCER}={receiver.url}",
                    EVENTFLOW_WEBHOOK_SECRETS=f"{PRODUCER}={SECRET}",
                    EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE="true",
                    EVENTFLOW_RATE_LIMIT="1/day")


def post_event(client: FlaskClient, user_id: str, key: str = PRODUCER_KEY) -> str:
    event = {**EXAMPLE_EVENT, "user_id": user_id,
             "payload": {**EXAMPLE_EVENT["payload"], "to_email": f"{user_id}@example.com"}}
    response = client.post("/api/v1/events", json=event, headers=auth(key))
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def history_steps(client: FlaskClient, event_id: str, step: str) -> list[dict[str, Any]]:
    body = client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY)).get_json()
    return [entry for entry in body["history"] if entry["step"] == step]


def test_every_final_status_reaches_the_receiver_once(
    client: FlaskClient, worker: Any, receiver: WebhookReceiver,
    smtp_server: ScriptedSMTPServer,
) -> None:
    # Given a producer with a webhook, and a limit of one email per user per day
    delivered = post_event(client, "alice")
    wait_for(lambda: history_steps(client, delivered, "webhook_sent"), message="delivered")
    rate_limited = post_event(client, "alice")
    wait_for(lambda: history_steps(client, rate_limited, "webhook_sent"), message="rate limited")
    # When the server refuses the next address for good
    smtp_server.reply_always("550 5.1.1 No such user", stage="RCPT")
    dead = post_event(client, "bob")
    wait_for(lambda: history_steps(client, dead, "webhook_sent"), message="dead letter")
    # (which puts bob's address on the suppression list: his next event is not sent)
    suppressed = post_event(client, "bob")
    wait_for(lambda: history_steps(client, suppressed, "webhook_sent"), message="suppressed")
    # ... and another producer's event, without a webhook, is delivered
    smtp_server.reply_always(None, stage="RCPT")
    other = post_event(client, "carol", OTHER_PRODUCER_KEY)
    wait_for(lambda: client.get(f"/api/v1/events/{other}", headers=auth(ADMIN_KEY))
             .get_json()["status"] == "delivered", message="other producer's event")

    # Then each status arrived once, signed, shaped as the contract says
    arrived = receiver.verified()
    assert [(d.body["type"], d.body["data"]["id"]) for d in arrived] == [  # type: ignore[index]
        ("event.delivered", delivered), ("event.rate_limited", rate_limited),
        ("event.dead_lettered", dead), ("event.suppressed", suppressed)]
    assert len({d.webhook_id for d in arrived}) == 4
    assert all(not d.verified for d in receiver.deliveries[4:])
    first = arrived[0].body
    assert first is not None and set(first) == {"type", "timestamp", "data"}
    shown = client.get(f"/api/v1/events/{delivered}", headers=auth(PRODUCER_KEY)).get_json()
    del shown["history"]
    assert first["data"] == shown
    assert arrived[2].body["data"]["status"] == "dead_lettered"  # type: ignore[index]


def test_a_receiver_that_fails_twice_gets_the_webhook_on_the_third_try(
    client: FlaskClient, worker: Any, receiver: WebhookReceiver,
) -> None:
    # Given a receiver that answers 503, then 429, then takes it
    receiver.answer_next(503, 429)
    # When an event is delivered
    event_id = post_event(client, "dave")
    sent = wait_for(lambda: history_steps(client, event_id, "webhook_sent"), message="third try")

    # Then it arrived on the third try, with the same webhook-id each time
    assert [d.answered for d in receiver.deliveries] == [503, 429, 204]
    assert all(d.verified for d in receiver.deliveries)
    assert len({d.webhook_id for d in receiver.deliveries}) == 1
    failed = history_steps(client, event_id, "webhook_failed")
    assert [entry["http_status"] for entry in failed] == [503, 429]
    assert all("retry_in_s" in entry for entry in failed)
    assert sent[0]["attempt"] == 3 and sent[0]["http_status"] == 204


def test_a_receiver_that_refuses_for_good_is_not_tried_again(
    client: FlaskClient, worker: Any, receiver: WebhookReceiver,
) -> None:
    receiver.answer_next(400)
    event_id = post_event(client, "erin")
    failed = wait_for(lambda: history_steps(client, event_id, "webhook_failed"),
                      message="the refused webhook")
    assert failed[0]["final"] is True and failed[0]["http_status"] == 400
    assert len(receiver.deliveries) == 1


def test_a_host_name_that_resolves_to_loopback_is_refused_at_send_time(
    make_app: Callable[..., Flask], receiver: WebhookReceiver,
) -> None:
    # Given a URL whose host is a name (not checked at start-up) resolving to 127.0.0.1
    port = receiver.server.server_address[1]
    app = make_app(EVENTFLOW_WEBHOOKS=f"{PRODUCER}=http://localhost:{port}/hooks",
                   EVENTFLOW_WEBHOOK_SECRETS=f"{PRODUCER}={SECRET}")
    client = app.test_client()
    from celery.contrib.testing.worker import start_worker

    with start_worker(app.extensions["celery"], pool="threads", concurrency=2,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        # When an event is delivered
        event_id = post_event(client, "frank")
        failed = wait_for(lambda: history_steps(client, event_id, "webhook_failed"),
                          message="the refused webhook")
    # Then nothing reached the receiver, and the history says why
    assert receiver.deliveries == []
    assert failed[0]["final"] is True and "private or loopback" in failed[0]["error"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hooks", "https://10.1.2.3/hooks",
                                 "http://[::1]/hooks", "http://[::ffff:127.0.0.1]/hooks",
                                 "https://169.254.169.254/latest"])
def test_private_urls_are_refused_at_start_up_unless_allowed(url: str) -> None:
    env = {"EVENTFLOW_API_KEYS": f"shop:sha256:{'a' * 64}",
           "EVENTFLOW_WEBHOOKS": f"shop={url}", "EVENTFLOW_WEBHOOK_SECRETS": f"shop={SECRET}"}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert refused.value.variable == "EVENTFLOW_WEBHOOKS"
    allowed = Settings.from_env({**env, "EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE": "true"})
    assert allowed.webhook_for("shop") is not None


@pytest.mark.parametrize(("env", "variable"), [
    ({"EVENTFLOW_WEBHOOKS": "shop=https://93.184.216.34/h"}, "EVENTFLOW_WEBHOOK_SECRETS"),
    ({"EVENTFLOW_WEBHOOKS": "nobody=https://93.184.216.34/h",
      "EVENTFLOW_WEBHOOK_SECRETS": f"nobody={SECRET}"}, "EVENTFLOW_WEBHOOKS"),
    ({"EVENTFLOW_WEBHOOKS": "shop=ftp://example.com/h",
      "EVENTFLOW_WEBHOOK_SECRETS": f"shop={SECRET}"}, "EVENTFLOW_WEBHOOKS"),
    ({"EVENTFLOW_WEBHOOKS": "shop", "EVENTFLOW_WEBHOOK_SECRETS": f"shop={SECRET}"},
     "EVENTFLOW_WEBHOOKS"),
    ({"EVENTFLOW_WEBHOOKS": "shop=https://93.184.216.34/h",
      "EVENTFLOW_WEBHOOK_SECRETS": "shop=whsec_"}, "EVENTFLOW_WEBHOOK_SECRETS"),
    ({"EVENTFLOW_WEBHOOK_SECRETS": f"shop={SECRET}"}, "EVENTFLOW_WEBHOOK_SECRETS"),
    ({"EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE": "maybe"}, "EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE"),
])
def test_a_bad_webhook_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"EVENTFLOW_API_KEYS": f"shop:sha256:{'a' * 64}", **env})
    assert refused.value.variable == variable
    assert SECRET not in str(refused.value)


def test_a_webhook_left_pending_by_a_worker_killed_before_enqueueing_it_is_sent_by_the_sweep(
    app: Flask, client: FlaskClient, worker: Any, receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker that dies right after recording the status, before enqueueing the
    # webhook (its notify_final never runs)
    webhooks = app.extensions["eventflow"].webhooks
    monkeypatch.setattr(webhooks, "notify_final", lambda *args: None)
    event_id = post_event(client, "gina")
    wait_for(lambda: client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY))
             .get_json()["status"] == "delivered", message="delivered")
    assert receiver.deliveries == []
    monkeypatch.undo()
    # ... and a webhook noted for a status that was never recorded (killed before it)
    never = webhooks.expect(post_event(client, "hana", OTHER_PRODUCER_KEY), "dead_lettered",
                            PRODUCER)
    assert never is not None

    # When the sweep runs
    enqueued = webhooks.sweep_pending(older_than=0)

    # Then the first is sent, once, and the second forgotten
    assert enqueued == 1
    arrived = wait_for(receiver.verified, message="the swept webhook")
    assert arrived[0].webhook_id == f"msg_{event_id}_delivered"
    assert webhooks.store.redis.zcard("ef:webhooks:pending") == 0


@pytest.mark.timeout(60)
def test_a_hanging_receiver_holds_one_worker_slot_and_the_emails_go_on(
    client: FlaskClient, worker: Any, receiver: WebhookReceiver,
) -> None:
    # Given a receiver that answers only after 8 s (its attempts time out after 5 s)
    receiver.delay = 8.0
    # When 12 events are posted over 3 seconds
    posted = []
    for n in range(12):
        posted.append(post_event(client, f"user-{n}"))
        time.sleep(0.25)  # a steady stream, not a burst
    views: dict[str, dict[str, Any]] = {}

    def all_delivered() -> bool:
        for event_id in set(posted) - set(views):
            body = client.get(f"/api/v1/events/{event_id}", headers=auth(ADMIN_KEY)).get_json()
            if body["status"] == "delivered":
                views[event_id] = body
        return len(views) == len(posted)

    wait_for(all_delivered, timeout=40, message="every email")

    # Then the receiver was tried once, not once per event (the other webhooks wait
    # untried, in no worker slot), and the emails went out meanwhile, each well before
    # the 5 s that a slot held by the hanging attempt waits
    latencies = sorted(
        (datetime.fromisoformat(view["delivered_at"])
         - datetime.fromisoformat(view["created_at"])).total_seconds()
        for view in views.values())
    print(f"email latency with a hanging receiver: median {latencies[6]:.2f}s, "
          f"max {latencies[-1]:.2f}s; POSTs that reached it: {receiver.arrivals}")
    assert receiver.arrivals == 1
    assert latencies[6] < 1.0 and latencies[-1] < 3.0


def test_the_doctor_warns_while_private_webhook_addresses_are_allowed(
    app: Flask, redis_client: Any,
) -> None:
    from eventflow.doctor import diagnose

    warnings = diagnose(app.extensions["eventflow"].settings, redis_client).warnings
    assert any("EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE=true" in line and PRODUCER in line
               for line in warnings)



@pytest.mark.parametrize("status", ["suppressed", "bounced"])
def test_a_status_recorded_elsewhere_reaches_the_receiver_through_the_same_hook(
    app: Flask, client: FlaskClient, worker: Any, receiver: WebhookReceiver,
    redis_client: Any, status: str,
) -> None:
    # Given a delivered event (its webhook handled)
    event_id = post_event(client, "ivan")
    wait_for(lambda: history_steps(client, event_id, "webhook_sent"), message="delivered")
    # When another part records a new final status the way the bounce endpoint and the
    # suppression list do: noted, written, then notified
    webhooks = app.extensions["eventflow"].webhooks
    pending = webhooks.expect(event_id, status)
    redis_client.hset(f"ef:ev:{event_id}", "status", status)
    webhooks.notify_final(event_id, status, pending)

    # Then the receiver gets it, with its own webhook-id
    arrived = wait_for(lambda: receiver.verified()[1:], message=f"event.{status}")
    assert arrived[0].body["type"] == f"event.{status}"  # type: ignore[index]
    assert arrived[0].webhook_id == f"msg_{event_id}_{status}"
