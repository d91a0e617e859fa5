"""The shipped Grafana dashboard and Prometheus alert rules: valid, unit-tested by promtool,
and over metric names that a real EventFlow web process exports.

promtool comes from Debian's ``prometheus`` package; ``make test`` installs it if missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLE_EVENT, PRODUCER_KEY
from tests.processes import ROOT, Process, procfile_command
from tests.redis_server import RedisServer
from tests.smtp_server import free_port
from tests.waiting import wait_for

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "eventflow.json"

#: Series that Prometheus makes itself, not the app.
PROMETHEUS_OWN = {"up"}
#: Alerted on or charted, but not exported by this code yet (none today: keep it empty).
NOT_YET_EXPORTED: set[str] = set()
#: The web process's Redis has a maxmemory, as a production one should: without one,
#: ``eventflow_redis_maxmemory_bytes`` (charted next to the used memory) is not exported.
MAXMEMORY = 256 * 1024 * 1024

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}
#: Grafana's variables, given values so that promtool can parse the queries.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$job": "eventflow"}


def promtool(*args: str, cwd: Path) -> None:
    """Run promtool; fail the test with its output if it refuses."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs it (apt-get install prometheus)")
    done = subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, which may hold anything
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert match, f"unexpected variable query {query['query']!r}"
            queries.append(match.group(1))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)
    promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules()} <= firing


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule files: each query becomes a recording rule
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in _GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [
        {"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", "queries.yml", cwd=tmp_path)


def test_the_dashboard_and_the_alerts_read_only_what_the_web_process_exports(
    environment: dict[str, str], tmp_path: Path,
) -> None:
    # Given the Procfile's web process (granian, multiprocess metrics) that has answered
    # an event, as in production: on a Redis configured as shipped, with a maxmemory
    redis_server = RedisServer(free_port(), tmp_path / "redis", "--maxmemory",
                               str(MAXMEMORY)).start()
    port = free_port()
    (tmp_path / "metrics").mkdir()
    env = {**environment, "REDIS_URL": redis_server.url, "PORT": str(port),
           "WEB_CONCURRENCY": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    web = Process(procfile_command("web"), env, tmp_path / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _post_event(base), timeout=30, message="the web process to accept")
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            exposition = response.read().decode()
    finally:
        web.stop()
        redis_server.kill()
    exported = {sample.name for family in text_string_to_metric_families(exposition)
                for sample in family.samples}
    # When the names read by the dashboard's queries and the alert rules are listed
    dashboard = set().union(*map(metric_names, dashboard_queries()))
    alerts = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    # Then each is exported (the lists are not empty: the parsing found them)
    assert {"eventflow_queue_depth", "flask_http_request_total",
            "eventflow_redis_used_memory_bytes", "eventflow_redis_maxmemory_bytes"} <= dashboard
    assert dashboard - exported - PROMETHEUS_OWN == set()
    assert alerts - exported - PROMETHEUS_OWN - NOT_YET_EXPORTED == set()


def _post_event(base: str) -> bool:
    request = urllib.request.Request(
        f"{base}/api/v1/events", data=json.dumps(EXAMPLE_EVENT).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {PRODUCER_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return bool(response.status == 202)
    except OSError:
        return False
