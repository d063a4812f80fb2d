# marketflow: `make run` starts everything, `make test` checks everything.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
CONFIG ?= config.toml
# The suite mostly waits (minute boundaries, restarts): more workers than cores pay off.
TEST_WORKERS ?= 4

.PHONY: lock run test lint typecheck unit server-binaries kafka-jars bench-tools bench bench-fix bench-api mutation clean

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	bash scripts/ensure-venv.sh $(PY) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## run: three exchange simulators on 40101-40103, a FIX venue on 40111, the daemon on $(PORT)
run: $(STAMP)
	@$(BIN)/python -m marketflow.devstack --port $(PORT) --config $(CONFIG)

## lock: constraints.txt from the newest versions pyproject.toml allows (run make test after)
lock:
	rm -rf .lock-venv && bash scripts/ensure-venv.sh $(PY) .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip && .lock-venv/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

## server-binaries: PostgreSQL, Redis and systemd-analyze for the tests (apt-get if missing)
server-binaries:
	@bash scripts/ensure-servers.sh

## kafka-jars: Apache Kafka's broker as Maven artifacts, cached (the Kafka tests start it)
kafka-jars:
	@bash scripts/ensure-kafka.sh >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check marketflow tests bench
	$(BIN)/ruff format --check marketflow tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) server-binaries kafka-jars lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal

## mutation: mutmut over the core modules against the unit tests, one module at a time, each
## run capped at MUTATION_TIMEOUT s (results are kept in mutants/: a rerun resumes). Not in test.
MUTATE ?= marketflow.domain.window marketflow.domain.aggregates marketflow.app.aggregator \
	marketflow.app.minute_writer marketflow.app.queries marketflow.adapters.feeds.json_lines
MUTATION_TIMEOUT ?= 600
mutation: $(STAMP)
	@for m in $(MUTATE); do \
		timeout $(MUTATION_TIMEOUT) $(BIN)/mutmut run "$$m.*" >/dev/null 2>&1 \
			|| echo "$$m: stopped after $(MUTATION_TIMEOUT) s (rerun to resume)"; \
	done
	@$(BIN)/python scripts/mutation-summary.py

bench: $(STAMP) server-binaries
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.parse

bench-fix: $(STAMP) server-binaries
	$(BIN)/python -m bench.fix

## bench-tools: wrk, the HTTP load generator of bench-api (apt-get if missing)
bench-tools:
	@bash scripts/ensure-bench-tools.sh

## bench-api: API latency and req/s idle, at saturated ingest and beside ~100,000 ticks/s
bench-api: $(STAMP) server-binaries bench-tools
	$(BIN)/python -m bench.api

clean:
	rm -rf $(VENV) var mutants .mypy_cache .ruff_cache .pytest_cache
