# Two entry points (see README): `make demo` and `make test`.
# Each creates .venv on first use and installs the project with its lab and test extras.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[lab,test]"
	touch $@

.PHONY: demo test quick bench notebooks fashion-mnist
demo: $(VENV)/.installed
	$(PY) -m gsgd_jax.lab.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The edit loop (under 2 minutes on 2 cores): the surface, the maths against brute force, the
# optax chains, the README's code. `make test` (what CI runs) is the full suite.
quick: $(VENV)/.installed
	$(PY) -m pytest -q tests/test_surface.py tests/test_skeleton.py tests/test_readme.py \
	  tests/test_first_hour.py tests/test_architecture.py tests/test_core_math.py \
	  -k "not page_is_the_script_output and not inverse_chain_rule and not low_precision and not mixed"

bench: $(VENV)/.installed
	$(PY) bench/bench.py --quick

# Re-executes the notebooks and stores them with their outputs and figures.
notebooks: $(VENV)/.installed
	$(PY) notebooks/execute.py

# Real Fashion-MNIST, offline, from Debian's dataset-fashion-mnist package (as root; the tests
# never need it). The lab finds it under /usr/share/datasets/fashion-mnist/ without --data-dir.
fashion-mnist:
	apt-get update && apt-get install -y dataset-fashion-mnist
