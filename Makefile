# The two commands of the README: `make demo` and `make test`. Each installs everything it needs first.
#   make test       the whole suite, as CI runs it: installs the system packages the tests need (PostgreSQL),
#                   starts a throwaway PostgreSQL on 127.0.0.1, runs every test (slow ones included), stops it.
#                   A case that cannot run on this machine is skipped, and the summary says why and what to
#                   install. GRACEFUL_TEST_NO_POSTGRES=1 starts no PostgreSQL (its cases then skip).
#                   Then the library-backbone tests (--arch timm:NAME) in their own venv, .venv-backbones
#                   (torch 2.14.1 + torchvision 0.29.1 + timm; about 6 GB, 3 min to build; make test-backbones).
#   make test-fast  the quick loop while editing: no slow tests, no PostgreSQL cases, no servers started.
# Both pass PYTEST_ARGS on to pytest, e.g. make test PYTEST_ARGS="tests/index -k migration".
#   make lint       ruff check, ruff format --check and mypy (index/, service/), as CI runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-backbones lint bench clean
BACKBONES_VENV ?= .venv-backbones

$(STAMP): pyproject.toml
	bash scripts/install-system.sh
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel (an open range would pull a multi-GB CUDA build)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/graceful demo

test: install
	bash scripts/install-system.sh --tests
	PY=$(PY) bash scripts/run-tests.sh -m "not backbones" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-backbones PYTEST_ARGS=

test-fast: install
	$(PY) -m pytest -m "not slow and not postgres and not backbones" $(PYTEST_ARGS)

# Library backbones (--arch timm:NAME) need torchvision, which imports only beside its own torch: their tests
# run in a second venv (scripts/install-backbones.sh; a stamp makes a rerun free).
test-backbones:
	bash scripts/install-backbones.sh $(BACKBONES_VENV)
	$(BACKBONES_VENV)/bin/python -m pytest -m backbones $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(BACKBONES_VENV) demo-state .pytest_cache
