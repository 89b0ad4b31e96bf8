# pyvmm: `make demo` and `make test` set everything up on a fresh machine.
# `make build` is idempotent: a venv, the cffi modules, and the toy guests.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: build guests test demo bench clean

build: $(STAMP) guests

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h vmm/*/_build*.py vmm/*/*/_build*.py)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

guests:
	$(MAKE) -s -C guest

test: build
	$(PY) -m pytest -q

demo: build
	$(PY) -m vmm demo

clean:
	rm -rf $(VENV) build *.egg-info guest/build vmm/*.so vmm/*/*.so vmm/*/*/*.so
