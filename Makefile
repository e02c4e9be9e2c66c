# Two commands for a fresh machine (see README):
#   make demo   install everything and run the main job on the embedded model
#   make test   install everything and run the default test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: install demo test test-slow clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	bash scripts/install.sh $(BIN)/pip

demo: install
	$(BIN)/tca demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
