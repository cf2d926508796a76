# Two commands do all the set-up on a fresh machine:
#   make demo   - record, replay and query on the embedded default (local Ray, local store)
#   make test   - the whole test suite (what CI runs)
#   make test-quick - the suite without the tests marked slow (benchmarks' quick modes, cluster, demo, browser)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/flor-ray-demo

.PHONY: venv demo test test-quick bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m flor_ray.cli demo $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q

test-quick: venv
	$(PY) -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) .pytest_cache
