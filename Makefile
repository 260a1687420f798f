# mailrelay — the commands people run: `make run`, `make unit` and `make test`.
# Each bootstraps .venv itself; nothing has to be installed by hand first.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/mailrelay.toml
# Compat editable install: a default editable install hides twisted/plugins from twistd's
# plugin scan (it walks sys.path), see docs/architecture.rst "Packaging".
COMPAT := --config-settings editable_mode=compat
PYTEST_ARGS ?= --durations=10
BENCH_ARGS ?=

.PHONY: help run unit test lint typecheck pytest deps docs bench soak clean distclean

help:
	@echo "make run      run mailrelay in the foreground with $(CONFIG) (Ctrl-C stops it)"
	@echo "make unit     the unit tests (tests/unit: in memory, no root, no peers; under a minute)"
	@echo "make test     install what the tests need (root: Debian packages), then ruff, mypy and"
	@echo "              the whole pytest suite (tests/unit and tests/integration)"
	@echo "make docs     build the Sphinx docs (warnings are errors) into docs/_build/html"
	@echo "make bench    end-to-end benchmark: mailrelay vs Postfix vs aiosmtpd (bench/README.md)"
	@echo "make soak     long-running tests (pytest -m soak) and a fresh-seed fuzz run (bench/soak.py)"
	@echo "make clean    remove build output, spool and caches (distclean: the venv too)"

# --- the virtualenv: redone only when the packaging metadata changes ---------------------------

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e . $(COMPAT)
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]' $(COMPAT)
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: setup.cfg pyproject.toml $(VENV)/.installed-test
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,bench]' $(COMPAT)
	touch $@

# --- make run -------------------------------------------------------------------------------

run: $(VENV)/.installed
	mkdir -p var
	$(BIN)/twistd -n --pidfile= mailrelay --config $(CONFIG)

# --- make unit: no root, no Debian packages, no peers ----------------------------------------
# Hypothesis keeps its example database and pytest its cache in the (possibly read-only) tree
# otherwise: both go to a temporary directory, so any user can run it from any checkout.

UNIT_TMP ?= $(or $(TMPDIR),/tmp)/mailrelay-unit-$(shell id -u)

unit: $(VENV)/.installed-test
	HYPOTHESIS_STORAGE_DIRECTORY=$(UNIT_TMP)/hypothesis \
	$(BIN)/pytest -o cache_dir=$(UNIT_TMP)/pytest-cache -m "not soak" $(PYTEST_ARGS) tests/unit

# --- make test ------------------------------------------------------------------------------

deps:
	scripts/install-test-deps.sh

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test deps
	$(BIN)/pytest -m "not soak" $(PYTEST_ARGS)

test: $(VENV)/.installed-test deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not soak" $(PYTEST_ARGS)

# --- the rest -------------------------------------------------------------------------------

docs: $(VENV)/.installed-test
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

bench: $(VENV)/.installed-bench deps
	$(BIN)/python bench/relay.py $(BENCH_ARGS)

# Long runs: soak-marked tests (exit 5 = none collected yet is not a failure here), then a
# fresh-seed fuzz run of the SMTP input side (bench/soak.py; SOAK_ARGS="--cases N --sessions M").
SOAK_ARGS ?=
soak: $(VENV)/.installed-test deps
	$(BIN)/pytest -m soak $(PYTEST_ARGS); rc=$$?; [ $$rc = 5 ] && echo "no soak tests yet" && rc=0; exit $$rc
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf docs/_build build dist var .pytest_cache .ruff_cache .mypy_cache .hypothesis _trial_temp*
	rm -rf *.egg-info twisted/plugins/dropin.cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
