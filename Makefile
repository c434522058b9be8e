# The two commands: `make demo` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench-accuracy fixtures clean

setup: $(STAMP)

# torch==2.13.0 first: on the dev/CI machines it is a CPU wheel already on disk; any other
# version would pull several GB of CUDA packages. The worker image installs the CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev,service]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

demo: setup
	@echo "make demo: the service (API + worker + Redis) is not built yet; running the core CLI on the fixture instead."
	$(PY) -m quant_core quantize tests/fixtures/models/llama-outlier --method spinquant \
		--w-bits 4 --a-bits 4 --kv-bits 4 --seq-len 256 \
		--calib-text tests/fixtures/text/train.txt --eval-text tests/fixtures/text/test.txt \
		--calib-samples 32 --train-samples 200 --steps 50 --report-json runs/demo/report.json
	@cat runs/demo/report.json | $(PY) -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in ('method','scheme','fp_ppl','quant_ppl','timings_s')}, indent=2))"

bench-accuracy: setup
	$(PY) bench/accuracy.py --json runs/bench/accuracy.json

fixtures: setup
	$(PY) -m tests.fixtures.build_all

clean:
	rm -rf $(VENV) runs .pytest_cache
