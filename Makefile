# Two commands on a fresh machine: `make demo` and `make test`. Every target but `clean` creates .venv from
# requirements.txt first.
# `make study`: Taylor against random masks over seeds and prune rates (demo/study.py, 12 minutes measured on
# 2 CPU cores, 36 on a host about 3 times slower).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: demo study test test-slow mutants venv clean

venv: $(STAMP)

# PyPI's torch for Linux is the CUDA build: about 6 GB in .venv. --no-cache-dir keeps pip from holding a second copy
# of the downloads in its cache, so the install needs little more disk than the venv itself.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-cache-dir -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/run_demo.py

study: $(STAMP)
	$(PY) demo/study.py

# The test files run in parallel, one worker per core (pytest-xdist); a file's tests stay in one worker, so that its
# module fixtures (the demo's and the study's runs) run once.
XDIST := -n auto --dist loadfile

# `test` leaves out the end-to-end runs marked slow (pytest.ini); `test-slow` runs only those. CI (.ci/run) runs both.
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m slow tests

# Plants small bugs one at a time in a scratch copy and checks that the tests catch each (not part of `test`).
mutants: $(STAMP)
	$(PY) tests/mutants.py

clean:
	rm -rf runs/demo runs/study .pytest_cache
