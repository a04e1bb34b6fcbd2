# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv lint protos bench-smoke mutate clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/remote-autograd demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check remote_autograd tests benchmarks scripts
	$(VENV)/bin/ruff format --check remote_autograd tests benchmarks scripts
	$(VENV)/bin/mypy remote_autograd

protos: venv
	$(PY) scripts/gen_protos.py

# Not part of `make test`: applies one-line mutations to a copy of the tree and checks that the
# tests named for each fail (scripts/mutation_check.py --list).
mutate: venv
	$(PY) scripts/mutation_check.py

bench-smoke: venv
	$(PY) -m benchmarks.run_all --preset smoke

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
