# pyvmm: `make demo` and `make test` set everything up on a fresh machine.
# `make build` is idempotent: a venv, the cffi modules, and the toy guests.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: build deps pyc guests test demo bench clean

# Debian packages the tests and the demo use: QEMU (the cross-check and the
# baseline), iproute2/ping (network namespaces, taps), file (the labs), clang (the fuzzer).
DEB_PKGS := qemu-system-x86:qemu-system-x86_64 iproute2:ip iputils-ping:ping \
            file:file clang:clang libclang-rt-14-dev:/usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a

build: deps $(STAMP) pyc guests

deps:
	@missing=""; for pair in $(DEB_PKGS); do pkg=$${pair%%:*}; probe=$${pair#*:}; \
	  if ! command -v $$probe >/dev/null 2>&1 && [ ! -e $$probe ]; then missing="$$missing $$pkg"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: these Debian packages are missing (some tests will skip):$$missing"; fi; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h vmm/*/_build*.py vmm/*/*/_build*.py) vmm/cffi_header.py
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Byte-compile pyvmm up front: a cpr-exec'd image imports it on the critical path, and
# with PYTHONDONTWRITEBYTECODE set (as on this project's machines) nothing would cache it.
pyc: $(STAMP)
	@$(PY) -m compileall -q vmm

guests:
	$(MAKE) -s -C guest

test: build
	$(PY) -m pytest -q

demo: build
	$(PY) -m vmm demo

clean:
	rm -rf $(VENV) build *.egg-info guest/build vmm/*.so vmm/*/*.so vmm/*/*/*.so vmm/kvm/pyvmm-cpr-exec
