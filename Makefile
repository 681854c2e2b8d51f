# hueyserve: `make run` starts the whole stack, `make test` installs and runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# make load: bounded headless locust run against the running stack
USERS ?= 20
SPAWN_RATE ?= 10
DURATION ?= 30s

.PHONY: install install-dev browser run test screenshot bench load lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install
	$(PY) -m hueyserve.dev.stack --host $(HOST) --port $(PORT)

test: install-dev browser
	$(PY) -m pytest

# The dashboard's tests drive a real headless Chromium (Debian's package). Installed when
# missing and running as root (CI); otherwise those tests are skipped and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the dashboard's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no chromium and not root: the browser tests will be skipped (apt-get install chromium)"; fi

# The README's picture of the dashboard, taken by its browser test.
screenshot: install-dev browser
	UPDATE_SCREENSHOT=1 $(PY) -m pytest -q tests/test_dashboard.py -k administers

bench: install-dev
	$(PY) -m bench.run

load: install-dev
	mkdir -p reports
	$(PY) -m locust -f locustfile.py --headless --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--run-time $(DURATION) --stop-timeout 10 --host http://$(HOST):$(PORT) \
		--csv reports/load --html reports/load.html --only-summary

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy core.py main.py hueyserve

clean:
	rm -rf $(VENV) .pytest_cache reports
