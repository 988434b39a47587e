# The two commands of the README: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make test runs test files side by side: the suite waits on processes as much as it computes.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help prereqs install browser lint checkov test demo bench bench-peers up down status package deploy clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

prereqs: ## check for gcloud with the pubsub-emulator component, and Java
	@scripts/check-prereqs

# pip compiles every module (50 of the 75 s): kept, because where PYTHONDONTWRITEBYTECODE is
# set (as here) the suite's hundreds of processes would each compile what they import.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the pinned requirements and the project

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

checkov: ## static checks of infra/terraform (in its own venv, .venv-checkov)
	scripts/checkov

browser: ## Debian's chromium for the dashboard's browser test (installed when run as root)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "NOTE: the dashboard's browser test needs Chromium: sudo apt-get install chromium"; \
	  fi; }

# The steps before the tests run two at a time: the two venvs install side by side, and
# checkov runs beside lint (each is one process: the two cores are used).
test: ## run every test tier but benchmarks (the tests start the emulators)
	@$(MAKE) --no-print-directory --jobs=2 --output-sync=target install prereqs browser lint checkov
	$(BIN)/python -m pytest -m "not bench" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: install prereqs ## the main job on the local stack
	$(BIN)/retrain demo

bench: install prereqs bench-peers ## benchmarks: print the figures (not part of make test)
	$(BIN)/python -m pytest -m bench -s -p no:cacheprovider bench $(PYTEST_ARGS)

bench-peers: ## the peers' venv for make bench (.venv-peers: MLServer, mlserver-sklearn)
	scripts/bench-peers

up: install prereqs ## start the local stack in the background
	$(BIN)/retrain up --detach

down: install ## stop the local stack
	$(BIN)/retrain down

status: install ## health of each part of the local stack
	$(BIN)/retrain status

package: install ## build/functions.zip and build/pipelines/<model>.yaml, what deploy uploads
	$(BIN)/retrain package --out build

deploy: install ## deploy to Google Cloud (docs/deploy-gcp.md); DRY_RUN=1 prints every step, runs none
	@if [ -z "$(DRY_RUN)" ] || [ "$(DRY_RUN)" = 0 ]; then $(MAKE) --no-print-directory package; fi
	DRY_RUN="$(DRY_RUN)" scripts/deploy

clean: ## remove the local stack state and caches (not .venv)
	rm -rf .retrain .pytest_cache .mypy_cache .ruff_cache build *.egg-info .venv-checkov .venv-peers
