# kvmpy: `make run` boots the minimal Linux guest, `make test` runs the suite.
# Both set up everything first (Debian packages, a venv, the guest kernel).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KVMPY  := $(VENV)/bin/kvmpy

.PHONY: all deps venv guest run test test-unit lint fuzz soak bench clean

all: venv

deps:
	@sh scripts/install-deps.sh

# The editable install compiles the cffi bindings against this machine's
# <linux/kvm.h>; re-run when the build scripts change.
$(VENV)/.installed: pyproject.toml setup.py kvmpy/_build_kvm.py kvmpy/boot/_build_bootparam.py
	@$(MAKE) --no-print-directory deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

guest: venv
	$(KVMPY) build-guest

run: guest
	$(KVMPY) run

test: guest
	$(PY) -m pytest -q -ra

# ruff (style, import order, bugbear, no private-member access) and mypy
# (strict on the fd layer); configured in pyproject.toml.
lint: venv
	$(PY) -m ruff check kvmpy tests scripts examples
	$(PY) -m mypy

test-unit: venv
	$(PY) -m pytest -q tests/unit

# The long virtio fuzz run (docs/reliability.md): 10,000 hostile programs per device through the
# MMIO transport; the suite runs the same test with 100. Case counts go to fuzz-report.txt.
fuzz: venv
	rm -f fuzz-report.txt
	KVMPY_FUZZ_PROFILE=fuzz KVMPY_FUZZ_REPORT=fuzz-report.txt $(PY) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/unit/test_virtio_fuzz.py
	@cat fuzz-report.txt

bench: venv
	$(PY) scripts/bench_exits.py

# 50 VMs created and destroyed concurrently for 10 minutes; fails on any leak (docs/reliability.md)
soak: venv
	$(PY) scripts/soak.py --seconds 600

clean:
	rm -rf $(VENV) build *.egg-info kvmpy/*.so kvmpy/_kvm.c kvmpy/boot/*.so kvmpy/boot/_bootparam.c
