# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test test-fast mutants venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Plants small bugs one at a time in a scratch copy and checks that the tests catch each (not part of `test`).
mutants: $(STAMP)
	$(PY) tests/mutants.py

clean:
	rm -rf runs/demo .pytest_cache
