# eAC: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench install

$(VENV)/.installed: requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "eAC needs Python 3.11: '$(PYTHON)' was not found"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --requirement requirements.lock
	touch $@

install: $(VENV)/.installed

## Start the embedded demo: SQLite, the simulated demo pool, watcher, worker, beat and web.
demo: $(VENV)/.installed
	DEBUG=0 EAC_HTTPS=0 EAC_LOCAL_SECRETS=1 $(PY) manage.py demo

## Run the whole test suite (installs Chromium and the test tools it needs, checks PostgreSQL and Redis).
test: $(VENV)/.installed
	scripts/test-prereqs
	$(PY) -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

## Print the benchmark figures (each script prints its own numbers and budget).
bench: $(VENV)/.installed
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
