# Two entry points (see README): `make demo` and `make test`.
# Each creates .venv on first use and installs the project with its lab and test extras.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[lab,test]"
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(PY) -m gsgd_jax.lab.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench.py --quick
