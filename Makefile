# steadyrl: `make demo` and `make test` work from a fresh clone with only Python (>= 3.11) installed.
#
# `make setup` installs the exact versions in requirements/lock.txt (a constraints file written by uv; see
# README "Development"), so an upstream release cannot change what a fresh clone runs. torch is the one
# package the lock leaves out: the venv keeps a torch that is already in it (a user's GPU build), and
# otherwise gets TORCH_SPEC, the CPU build that lies on disk on our machines.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# trl: SteadyGRPOTrainer's equivalence tests and the TRL parity tests run in `make test` (locked). verl cannot
# share the lock (pyproject [tool.steadyrl] unlocked-extras): its tests run in a venv of their own, `make test-verl`.
EXTRAS ?= dev,tasks,data,lora,trl
LOCK   ?= requirements/lock.txt
PIP     = $(BIN)/python -m pip -q --disable-pip-version-check
# verl's plug-in tests in a venv of their own, resolved by pip from pyproject's `verl` extra (transformers < 5.11).
VERL_VENV ?= .venv-verl
# The newest versions pyproject.toml allows, for `make test-latest` (a separate venv; the lock is untouched).
LATEST ?= .venv-latest

.PHONY: setup demo test test-all test-verl test-latest lock lint bench-stability clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -c $(LOCK) "$(TORCH_SPEC)"
	$(PIP) install -c $(LOCK) -e ".[$(EXTRAS)]"
	@touch $@
	@echo "steadyrl is installed in $(VENV) (activate it with: source $(BIN)/activate)"

demo: setup
	$(BIN)/steadyrl quickstart

test: setup
	$(BIN)/python -m pytest -q

# Everything CPU can run: the default suite with the `slow` tests, then the verl tests in their own venv.
test-all: setup test-verl
	$(BIN)/python -m pytest -q -m "not gpu or gpu"

# The verl tests (tests/integrations/test_verl_plugin.py, tests/ops/test_parity_verl.py) in a venv of their own:
# pip resolves pyproject's `verl` extra without the lock (verl 0.9.1 pins transformers < 5.11, so this venv gets
# transformers 5.10, as `pip install 'steadyrl[verl]'` gives a user), and without the tasks extra, whose
# math-verify needs an antlr4 that verl's omegaconf cannot import.
VERL_TESTS = tests/integrations/test_verl_plugin.py tests/ops/test_parity_verl.py
test-verl: $(VERL_VENV)/.installed
	$(VERL_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(verl|transformers|torch)=='
	$(VERL_VENV)/bin/python -m pytest -q $(VERL_TESTS)

$(VERL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -c "import torch" 2>/dev/null || \
		$(VERL_VENV)/bin/python -m pip -q --disable-pip-version-check install "$(TORCH_SPEC)"
	$(VERL_VENV)/bin/python -m pip -q --disable-pip-version-check install -e ".[dev,verl]" "$(TORCH_SPEC)"
	@touch $@

# Refresh the lock: newest versions within pyproject.toml's bounds, resolved for every platform and Python
# the project supports, against TORCH_SPEC, for every extra but pyproject's [tool.steadyrl] unlocked-extras.
# Then run `make test` and commit requirements/lock.txt.
LOCKED_EXTRA_FLAGS = $(shell $(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
	skip = p['tool']['steadyrl']['unlocked-extras']; \
	print(' '.join('--extra ' + e for e in p['project']['optional-dependencies'] if e not in skip))")
lock: setup
	$(PIP) install -c $(LOCK) uv
	@printf '%s\n' "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in $(LOCKED_EXTRA_FLAGS) --universal --upgrade \
		--constraint $(VENV)/torch-constraint.txt --no-emit-package torch \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

# The suite against the newest releases the bounds allow (torch stays the installed build), so an upgrade
# is a deliberate, tested step: if this passes, `make lock` and commit.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || \
		$(LATEST)/bin/python -m pip -q --disable-pip-version-check install "$(TORCH_SPEC)"
	@$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip -q --disable-pip-version-check install --upgrade --upgrade-strategy eager \
		-c $(LATEST)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|tokenizers|numpy)=='
	$(LATEST)/bin/python -m pytest -q

bench-stability: setup
	$(BIN)/steadyrl bench stability --quick

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST) $(VERL_VENV) runs .pytest_cache
