# Two commands on a fresh machine: `make demo` (set up + train, evaluate, plot, sample) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Which torch build `make setup` installs (README, Set-up): cpu = PyTorch's CPU wheel index, or the default
# index where that one cannot be reached; cuda = the default index (on Linux its torch is the multi-GB CUDA
# build); a URL = that index; auto = cuda when nvidia-smi finds a GPU, else cpu.
TORCH_INDEX ?= auto
TORCH_CPU_URL ?= https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch before dsmoe: `pip install -e .` alone would resolve torch from the default index (the CUDA build)
	@index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
		if nvidia-smi -L >/dev/null 2>&1; then index=cuda; else index=cpu; fi; \
	fi; \
	if [ "$$index" = cpu ]; then \
		if $(PY) -c "import urllib.request as r; r.urlopen('$(TORCH_CPU_URL)/', timeout=10)" >/dev/null 2>&1; then \
			index="$(TORCH_CPU_URL)"; \
		else \
			echo "setup: $(TORCH_CPU_URL) cannot be reached; $(TORCH) from the default index instead" \
			     "(on Linux the CUDA build, several GB)"; index=cuda; \
		fi; \
	fi; \
	case "$$index" in \
		cuda) echo "setup: $(TORCH) from the default index"; $(PY) -m pip install -q "$(TORCH)" ;; \
		http*|file*) echo "setup: $(TORCH) from $$index"; $(PY) -m pip install -q --index-url "$$index" "$(TORCH)" ;; \
		*) echo "setup: TORCH_INDEX=$(TORCH_INDEX) is invalid: choose auto, cpu, cuda or an index URL"; exit 2 ;; \
	esac
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
