"""What an operator sees: /stats and /metrics count what the workers did."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLE_EVENT, auth
from tests.smtp_server import ScriptedSMTPServer
from tests.waiting import wait_for


def samples(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_metrics_and_stats_show_the_pipeline_after_a_delivery_and_a_failure(
    client: FlaskClient, smtp_server: ScriptedSMTPServer, worker: Any
) -> None:
    # Given one event refused for good and one delivered after a 451
    smtp_server.reply_next("550 5.7.1 Rejected", "451 4.3.0 Busy")
    for _ in range(2):
        client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth())
    wait_for(lambda: client.get("/stats").json["events"]["delivered"] == 1
             and client.get("/stats").json["events"]["dead_lettered"] == 1,
             message="one delivery and one dead letter")
    # Then /stats counts them
    stats = client.get("/stats").json
    assert stats == {
        "events": {"accepted": 2, "delivered": 1, "retried": 1, "rate_limited": 0,
                   "dead_lettered": 1, "suppressed": 0, "bounced": 0},
        "queue_depth": 0,
        "dead_letters": 1,
    }
    # And /metrics has the pipeline's figures next to the HTTP ones
    metrics = samples(client)
    assert metrics["eventflow_events_accepted_total"] == 2
    assert metrics["eventflow_emails_sent_total"] == 1
    assert metrics["eventflow_email_failures_total{kind=permanent}"] == 1
    assert metrics["eventflow_email_failures_total{kind=transient}"] == 1
    assert metrics["eventflow_retries_total"] == 1
    assert metrics["eventflow_dead_letters"] == 1
    assert metrics["eventflow_queue_depth"] == 0
    assert metrics["eventflow_send_duration_seconds_count"] == 3
    assert metrics["eventflow_ambiguous_sends_total"] == 0
    assert any(name.startswith("flask_http_request_total") for name in metrics)


def test_http_metrics_count_each_answer_by_method_route_and_status(client: FlaskClient) -> None:
    # Given two accepted events, one refused event and one unknown path
    for _ in range(2):
        assert client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).status_code == 202
    assert client.post("/api/v1/events", json={}, headers=auth()).status_code == 422
    assert client.get("/no-such-page").status_code == 404
    # Then each answer is counted once, under its status, with its route's duration
    metrics = samples(client)
    assert metrics["flask_http_request_total{method=POST,status=202}"] == 2
    assert metrics["flask_http_request_total{method=POST,status=422}"] == 1
    assert metrics["flask_http_request_total{method=GET,status=404}"] == 1
    duration = "flask_http_request_duration_seconds_count{method=POST,status=202,url_rule=%s}"
    assert metrics[duration % "/api/v1/events"] == 2
    assert metrics[f"flask_exporter_info{{version={metrics_version(metrics)}}}"] == 1
    # And scraping /metrics is not counted itself
    assert not any("/metrics" in name for name in samples(client))


def metrics_version(metrics: dict[str, float]) -> str:
    (name,) = [name for name in metrics if name.startswith("flask_exporter_info")]
    return name.partition("version=")[2].rstrip("}")


def test_metrics_show_the_memory_redis_uses(client: FlaskClient) -> None:
    metrics = samples(client)
    assert metrics["eventflow_redis_used_memory_bytes"] > 0


def test_a_delivered_event_is_kept_for_the_configured_retention(
    make_app: Any, smtp_server: ScriptedSMTPServer, redis_client: Any
) -> None:
    from celery.contrib.testing.worker import start_worker

    # Given a retention of two hours
    app = make_app(EVENTFLOW_EVENT_RETENTION="2h")
    client = app.test_client()
    with start_worker(app.extensions["celery"], pool="threads", concurrency=1,
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        event_id = client.post("/api/v1/events", json=EXAMPLE_EVENT, headers=auth()).json["id"]
        wait_for(lambda: client.get(f"/api/v1/events/{event_id}", headers=auth())
                 .json["status"] == "delivered", message="the delivery")
    # Then its record and its history expire after two hours, not the default eight days
    for key in (f"ef:ev:{event_id}", f"ef:hist:{event_id}"):
        assert 7000 < redis_client.ttl(key) <= 7200
