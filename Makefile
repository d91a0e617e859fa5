# EventFlow developer commands. `make run`: the whole stack in the foreground (Ctrl-C
# stops it); `make test`: the suite, against a real Redis.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
#: Where an already running Redis is looked for, and where the embedded one listens.
REDIS_PORT ?= $(or $(EVENTFLOW_DEV_REDIS_PORT),6379)

.PHONY: run test lint fuzz redis redis-stop venv promtool

# One stamp per extra, remade only when pyproject.toml changes: a second `make run`
# installs nothing and starts in seconds. [test] includes [dev], so it stamps both.
$(VENV)/.dev.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(VENV)/.test.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.dev.stamp

venv: $(VENV)/.dev.stamp

# Redis, the SMTP inbox (var/outbox/), the API, one worker and Flower; see
# eventflow/devstack/supervisor.py for the ports and their EVENTFLOW_DEV_* overrides.
run: $(VENV)/.dev.stamp
	$(PY) -m eventflow.devstack

# A Redis on 127.0.0.1:$(REDIS_PORT): the one running there, or an embedded one started
# in the background under var/redis/ (stop it with `make redis-stop`).
redis: $(VENV)/.dev.stamp
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)

redis-stop:
	$(PY) -m eventflow.devstack.redis stop --port $(REDIS_PORT)

test: $(VENV)/.test.stamp promtool
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	$(PY) -m pytest

# promtool checks and unit-tests the shipped alert rules (tests/test_dashboards.py); it
# comes from Debian's `prometheus` package (only the package is installed, no server runs).
promtool:
	@command -v promtool >/dev/null || { apt-get update -qq \
		&& apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version | head -n 1

$(VENV)/.lint.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $@

# ruff and mypy, clean on the whole tree.
lint: $(VENV)/.lint.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy eventflow tasks wsgi.py

# A long run of the API fuzzer and the schema's property tests (the suite runs a short one).
fuzz: $(VENV)/.test.stamp
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	EVENTFLOW_FUZZ_EXAMPLES=$${EVENTFLOW_FUZZ_EXAMPLES:-500} $(PY) -m pytest -p no:cacheprovider \
		tests/test_openapi.py tests/test_schema_properties.py

# Benchmark of issue 7 (bench/README.md): one table on stdout and bench/results.json.
# wrk comes from Debian's packages; the FastAPI peer and py-spy from the [bench] extra.
.PHONY: bench bench-quick bench-profile wrk

$(VENV)/.bench.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

bench: $(VENV)/.bench.stamp wrk
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	$(PY) -m bench --redis-port $(REDIS_PORT)

bench-quick: $(VENV)/.bench.stamp wrk
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	$(PY) -m bench --quick --redis-port $(REDIS_PORT)

bench-profile: $(VENV)/.bench.stamp wrk
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	$(PY) -m bench.profile --redis-port $(REDIS_PORT)

# What email templates cost (issue 15): rendering per message, and one worker's delivery
# rate with the shipped HTML template next to a text-only one and the raw smtplib loop.
.PHONY: bench-templates
bench-templates: $(VENV)/.bench.stamp
	$(PY) -m eventflow.devstack.redis ensure --port $(REDIS_PORT)
	BENCH_REDIS_URL=$${BENCH_REDIS_URL:-redis://127.0.0.1:$(REDIS_PORT)/14} $(PY) -m bench.templates
