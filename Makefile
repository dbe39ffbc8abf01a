# pipeline-ops: `make run` (the demo on embedded SQLite) and `make test` (the suite on SQLite and PostgreSQL).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
PYTEST_ARGS ?=

.PHONY: setup browser run test test-sqlite test-postgres bench chaos clean

## setup: create .venv and install the pinned dependencies (requirements/lock.txt)
setup: $(STAMP)
$(STAMP): requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	@touch $@

## browser: Debian's Chromium for the admin's browser tests (Playwright cannot download one here) and
## libfaketime for the clock-skew tests (a child process whose clock runs ahead of the database's)
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); } || { echo "chromium is missing and could not be installed"; exit 1; }
	@command -v faketime >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq faketime >/dev/null); } || { echo "faketime is missing and could not be installed"; exit 1; }

## run: set up, migrate the embedded SQLite database and run the demo
run: setup
	DEBUG=1 $(PY) manage.py demo

## test: set up, then run the whole suite on SQLite and again on PostgreSQL
test: setup browser
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) PYTEST_ARGS="$(PYTEST_ARGS)" bash tests/run_suite.sh

test-sqlite: setup
	DATABASE_URL=sqlite:///$(CURDIR)/var/test-unused.sqlite3 $(PY) -m pytest $(PYTEST_ARGS)

test-postgres: setup
	DATABASE_URL=$(TEST_DATABASE_URL) $(PY) -m pytest $(PYTEST_ARGS)

## bench: the benchmarks (not tests); each runs its baselines interleaved with the candidate in the
## same run and ends with one `RATIO <name> <value>` line per figure
bench: setup
	$(PY) bench/guard.py --database-url $(TEST_DATABASE_URL)
	$(PY) bench/guard.py --clients 4 --only pg --database-url $(TEST_DATABASE_URL)
	$(PY) bench/pipeline_throughput.py --pg-url $(TEST_DATABASE_URL)
	$(PY) bench/api.py --database-url $(TEST_DATABASE_URL)
	$(PY) bench/submit.py --database-url $(TEST_DATABASE_URL)

## chaos: the incident replayed on real workers (PostgreSQL, 2 clusters), guarded vs the naive control group
CHAOS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/pipeline_ops_chaos
CHAOS_ARGS ?= --inputs 100 --naive
chaos: setup
	DEBUG=1 $(PY) manage.py chaos --database $(CHAOS_DATABASE_URL) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) var/*.sqlite3*
