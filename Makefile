# eAC: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench install fuzz

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

## Fuzz the REST API for longer than the suite does (tests/test_api_fuzz.py): schemathesis' command line, with
## every phase (examples, coverage, fuzzing, stateful), against daphne on a throwaway database made and seeded
## for it by tests/api_fuzz_support.py: FUZZ_DATABASE=sqlite (a temporary file, the default) or postgresql
## (<name>_apifuzz on the server of DATABASE_URL, dropped afterwards). The token and the seeded ids come in a
## schemathesis.toml it writes. Every check runs but the two that judge the API's validation by the schema
## alone (an unknown pool id is a valid integer, and a 400). The JUnit report and the server's log go to
## artifacts/fuzz/. Longer still: make fuzz FUZZ_EXAMPLES=1000.
FUZZ_DATABASE ?= sqlite
FUZZ_EXAMPLES ?= 100
FUZZ_SEED ?= 1
fuzz: $(VENV)/.installed
	$(PY) -m tests.api_fuzz_support --database $(FUZZ_DATABASE) -- sh -c '$(VENV)/bin/schemathesis \
	  --config-file "$$EAC_FUZZ_CONFIG" run "$$EAC_FUZZ_URL/api/schema/" --checks all \
	  --exclude-checks positive_data_acceptance,negative_data_rejection \
	  --max-examples $(FUZZ_EXAMPLES) --seed $(FUZZ_SEED) --workers 1 \
	  --report junit --report-dir artifacts/fuzz'
