# Two commands on a fresh machine: `make demo` (set up + train, evaluate, plot, sample) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build first: an unpinned torch resolved from nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dsmoe demo

# lint, then the fast tier (unit tests, ~1.5 min), then the slow tier (multi-process, end to end, training)
test: lint
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/dsmoe bench layer

.PHONY: setup demo test lint bench
