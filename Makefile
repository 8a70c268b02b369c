# IoT platform: common tasks. `make` alone lists them.
SHELL := /bin/bash
UV ?= uv
PYTEST := $(UV) run --frozen pytest

.DEFAULT_GOAL := help
.PHONY: help install run clean-local compose-env up down image-test test test-unit test-integration test-e2e lint fmt migrate bench bench-e2e chaos scale-test clean
# Compose reads its secrets from the environment or deploy/.env (git-ignored; `make compose-env`).
COMPOSE := docker compose -p iot-platform -f deploy/compose.yml $(if $(wildcard deploy/.env),--env-file deploy/.env)

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

install: ## Install every package, console script and dev tool into .venv (uv.lock), build the dashboard
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	cd dashboard && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent

run: ## Run the whole platform locally until Ctrl-C (embedded PostgreSQL/Redis/MQTT for any not running)
	$(UV) run --frozen python scripts/run_local.py

clean-local: ## Delete the data of make run's embedded servers (.local/, or IOT_LOCAL_DIR)
	$(UV) run --frozen python scripts/local_backends.py clean "$${IOT_LOCAL_DIR:-.local}"

compose-env: ## Write random secrets for Docker Compose into deploy/.env (keeps those already set)
	@python3 scripts/compose_env.py

up: ## Run the whole platform in Docker Compose (needs a Docker engine and the secrets: make compose-env)
	@python3 scripts/compose_env.py --check
	$(COMPOSE) up -d --build --wait

down: ## Stop the Compose stack
	$(COMPOSE) down

image-test: ## As root: build the image and run the Compose stack on a private dockerd, smoke-test it (docs/deploy.md)
	$(UV) run --frozen python scripts/image_test.py

# make test runs the tests on this many pytest-xdist workers (most of a test's time is spent waiting on
# processes, brokers and databases, so more workers than cores); 0 runs them in this one process.
TEST_WORKERS ?= 3

test: ## Run every test suite (unit, integration, end-to-end, deploy, image, scale) on TEST_WORKERS workers
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15

test-unit: ## Fast tests, no network
	$(PYTEST) tests/unit

test-integration: ## Tests against real PostgreSQL, Redis and Mosquitto
	$(PYTEST) tests/integration

test-e2e: ## The services as processes, driven by real clients
	$(PYTEST) tests/e2e

lint: ## ruff check, ruff format --check, mypy
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy

fmt: ## Format and fix what ruff can
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

migrate: ## Apply the database schema (IOT_DATABASE_URL)
	$(UV) run --frozen iot-migrate

bench: ## Run the per-service benchmarks under bench/ (the end-to-end one has its own target)
	@ls bench/*.py >/dev/null 2>&1 || { echo "no benchmark yet under bench/"; exit 0; }; \
	for b in bench/bench_*.py; do [ $$b = bench/bench_e2e.py ] && continue; \
	echo "== $$b"; $(UV) run --frozen python $$b || exit 1; done

bench-e2e: ## End-to-end sweep publish -> WebSocket, baselines, plots (~4 min; ARGS="--soak 600" etc.)
	$(UV) run --frozen python bench/bench_e2e.py $(ARGS)

chaos: ## Kill, restart and cut each part under load; check exactly-once storage and WebSocket resumption
	$(UV) run --frozen python bench/chaos.py $(ARGS)

scale-test: ## The platform over network namespaces (root, HAProxy): hosts cut, killed, scaled in under load
	$(PYTEST) tests/scale -s -p no:cacheprovider

clean: ## Remove caches, build output and test artifacts (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache artifacts build dist
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
