# Two commands on a fresh machine: `make run` (environment, install, main pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: run test install home lint samples ui

install: $(STAMP)

# Reinstalls only when pyproject.toml changes; the first install builds llama-cpp-python (about 10 minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

home:
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

run: install home
	$(BIN)/grace run $(ARGS)

test: install home
	$(BIN)/python -m pytest $(ARGS)

# The Dagster UI on http://127.0.0.1:3000, reading the same instance as `make run`.
ui: install home
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: install
	$(BIN)/ruff check grace_dagster tests benchmarks
	$(BIN)/ruff format --check grace_dagster tests benchmarks

samples: install
	$(BIN)/python -m grace_dagster.studies.samples
