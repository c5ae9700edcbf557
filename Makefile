# Everything runs from a project-local virtual environment, so nothing depends on what the machine has.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test unit lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## serve: install and start the gateway on the embedded default (simulated engines)
serve: $(STAMP)
	$(BIN)/tpgate plan --model internvl2_5-38b --gpu h100-80gb --gpus 8

## test: install and run the whole suite, integration tests included
test: $(STAMP)
	$(BIN)/python -m pytest

## unit: the fast tests only (no Ray, no subprocesses)
unit: $(STAMP)
	$(BIN)/python -m pytest -m 'not integration'

lint: $(STAMP)
	$(BIN)/ruff check gateway tuner loadtests tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
