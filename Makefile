# steadyrl: `make demo` and `make test` work from a fresh clone with only Python installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build that lies on disk on our machines; a user's own torch (already in the venv) is kept.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,tasks

.PHONY: setup demo test test-all lint bench-stability clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/steadyrl quickstart

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu or gpu"

bench-stability: setup
	$(BIN)/steadyrl bench stability --quick

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
