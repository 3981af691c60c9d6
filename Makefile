# The two front-door commands: `make demo` and `make test`. Both create (or reuse) a local virtualenv.
PYTHON ?= python3
VENV ?= .venv
# This machine's CPU build of torch; on a GPU machine set TORCH="torch==2.13.0" from the CUDA index, or
# TORCH=torch. Plain `torch` from PyPI pulls several GB of CUDA packages. Never install torchvision here.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_OUTPUT ?= demo_output

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jobs demo --output $(DEMO_OUTPUT)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest

bench: install
	$(PY) bench/runner_overhead.py

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT) .pytest_cache .ruff_cache
