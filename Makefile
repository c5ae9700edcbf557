# Everything runs from a project-local virtual environment, so nothing depends on what the machine has.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LMDEPLOY_STAMP := $(VENV)/.lmdeploy
LMDEPLOY_VERSION := 0.18.0

.PHONY: install serve test unit lint clean demo demo-drift

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# LMDeploy's CLI on CPU for the contract tests: the extra's CPU torch and pure-Python imports, then lmdeploy
# without its own requirements (they pull CUDA wheels)
$(LMDEPLOY_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,lmdeploy-contract]'
	$(BIN)/pip install --quiet --no-deps lmdeploy==$(LMDEPLOY_VERSION)
	touch $(LMDEPLOY_STAMP)

## serve: install and start the gateway on the embedded default (simulated engines)
serve: $(STAMP)
	$(BIN)/tpgate serve $(if $(CONFIG),--config $(CONFIG))

## test: install and run the whole suite, integration tests included (and the LMDeploy contract tests)
test: $(LMDEPLOY_STAMP)
	REQUIRE_LMDEPLOY_CONTRACT=1 $(BIN)/python -m pytest

## unit: the fast tests only (no Ray, no subprocesses)
unit: $(STAMP)
	$(BIN)/python -m pytest -m 'not integration'

## demo: online tuning and staged promotion of both classes on simulated engines, under load (a few minutes)
demo: $(STAMP)
	$(BIN)/python benchmarks/demo/online_tuning.py

## demo-drift: class batch drifts from a few long prompts to many short ones; detected, re-tuned, promoted (~6 min)
demo-drift: $(STAMP)
	$(BIN)/python benchmarks/demo/drift_retune.py

lint: $(STAMP)
	$(BIN)/ruff check gateway tuner loadtests tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
