# Two commands for a fresh machine (see README):
#   make demo   install everything and run the main job on the embedded model
#   make test   install everything and run the default test suite
# Both install into $(VENV) from the lock file (requirements/lock.txt, docs/compatibility.md),
# once: the stamp $(VENV)/.installed is rebuilt only when an install input changes.
#   make compat   the CI compatibility stage: compat tests on each transformers release listed
#                 in requirements/compat-versions.txt, each in a fresh venv
#   make lock     re-resolve requirements/lock.txt in a fresh venv (then test and commit it)
PY ?= python3
# pytest-xdist workers of `make test` (CI has 2 cores; tests/conftest.py gives each worker cores/N torch
# threads; 2026-12-08 on 2 cores: 534 s with 2 workers, 924 s before that when each took 2 threads)
TEST_WORKERS ?= 2
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml requirements/lock.txt scripts/install.sh
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: install demo test test-slow compat lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Order-only on the venv: recreating the interpreter alone does not force a reinstall, and a
# failed install leaves no stamp, so the next make retries it.
$(STAMP): $(INSTALL_INPUTS) | $(BIN)/python
	bash scripts/install.sh $(BIN)/python
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tca demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

compat:
	PY=$(PY) bash scripts/compat.sh

lock:
	PY=$(PY) bash scripts/lock.sh

clean:
	rm -rf $(VENV) .compat .ci-work build *.egg-info
