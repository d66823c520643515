# `make train` and `make test` first install whatever is missing into .venv (once; redone when
# pyproject.toml changes). TORCH picks the torch wheel: the default is the CPU build this
# template is tested with; on a GPU machine use `make install TORCH=torch`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
# test files run in this many processes at once (pytest-xdist; a file's tests stay in one
# process, so a file's shared runs are made once, a session-wide one once in each process that
# uses it); 0 runs them in this process, one after another
TEST_JOBS ?= 2

.PHONY: install train test lint clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,sweeps,eval,loggers]'
	touch $(STAMP)

install: $(STAMP)

train: install  ## train the default model on the embedded Shakespeare corpus (CPU, offline after first build)
	$(PY) train.py $(ARGS)

test: lint  ## lint, then the test suite (what CI runs)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

# every Python file git does not ignore (ruff finds them: the entry scripts, src, scripts, tests
# and any other), so a new file cannot slip past it; under a second, so `make test` runs it first.
# `ruff format .` fixes what the format check finds.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-outputs:
	rm -rf outputs
