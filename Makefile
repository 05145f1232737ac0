# Two commands on a fresh machine: `make run` (environment, install, main pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: run test install home system lint lock samples ui

install: $(STAMP)

# Reinstalls only when pyproject.toml changes; the first install builds llama-cpp-python (about 10 minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# Debian packages the tests need: PostgreSQL (instance storage test), Chromium (UI browser test) and Prometheus
# (the GPU-utilisation sensor's test scrapes a DCGM-format exporter with a real server).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The pool limit is also set explicitly: Dagster creates a pool from `default_limit` only after the run queue has
# first read the limits, so on a fresh instance its first pass would admit every waiting run of the pool.
home: install
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster instance concurrency set llm-endpoints 1 >/dev/null

run: install home
	$(BIN)/grace run $(ARGS)

test: install home system
	$(BIN)/python -m pytest $(ARGS)

# The Dagster UI on http://127.0.0.1:3000, reading the same instance as `make run`.
ui: install home
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

lint: install
	$(BIN)/ruff check grace_dagster tests benchmarks
	$(BIN)/ruff format --check grace_dagster tests benchmarks

# The image's exact versions (deploy/requirements.lock) from pyproject.toml; commit the result.
lock: install
	$(BIN)/python deploy/lock.py

samples: install
	$(BIN)/python -m grace_dagster.studies.samples
