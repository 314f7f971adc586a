# vhostni: developer and CI entry points.  `make help` lists them.
#
# Everything Python runs from a virtual environment the project owns ($(VENV), made by `make deps`
# from the system's python3 with Debian's python3-venv): a stock Debian 12 python3 refuses
# `pip install` outside one (PEP 668), and nothing here is installed into the system interpreter.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
IMAGES ?= images/out
PREFIX ?= /opt/vhostni
BINDIR ?= /usr/local/bin

.PHONY: help deps venv build images test test-unit bench soak demo install clean

help:
	@echo "deps    install system packages (apt-get; needs root) and the Python ones into $(VENV)/"
	@echo "build   compile the C fast path (csrc/) into vhostni._fastpath, install vhostni into $(VENV)/"
	@echo "images  build the guest kernel + initramfs from Debian packages into $(IMAGES)/"
	@echo "test    run all tests (unit, simulated-driver, DPDK and real-guest)"
	@echo "bench   run the benchmarks; writes bench/out/results.json"
	@echo "soak    run the daemon under checked traffic for SOAK_SECONDS (default 600), sampling its RSS and fds;"
	@echo "        writes bench/out/soak.json and soak.csv"
	@echo "demo    boot two guests behind vhostni and show a worm contained"
	@echo "install install for production: a venv in PREFIX=$(PREFIX), the command in BINDIR=$(BINDIR)"

deps:
	bash .ci/deps.sh
	$(MAKE) venv

# The project's virtual environment, with the build tools the editable install needs.
venv: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel 'cffi>=1.15'
	touch $@

build: venv
	$(PYTHON) -m pip install --no-build-isolation -q -e '.[test]'

images: venv
	$(PYTHON) images/build.py --out $(IMAGES)

test: build images
	$(PYTHON) -m pytest -ra tests

test-unit: build
	$(PYTHON) -m pytest -ra -m "not guest and not dpdk" tests

bench: build images
	$(PYTHON) -m vhostni.bench --out bench/out/results.json

# Not part of `test`: a long run looking for growth (memory, fds) that does not level off.
SOAK_SECONDS ?= 600
soak: build
	$(PYTHON) -m vhostni.bench.soak --seconds $(SOAK_SECONDS) --out bench/out/soak.json

demo: build images
	$(PYTHON) -m vhostni.demo

# A production install: its own venv under PREFIX (not editable: the checkout can go away),
# and `vhostni` on the PATH as a symlink into it.
install:
	$(SYSTEM_PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --upgrade pip setuptools wheel 'cffi>=1.15'
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --no-build-isolation .
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(PREFIX)/bin/vhostni $(DESTDIR)$(BINDIR)/vhostni

clean:
	rm -rf build *.egg-info vhostni/_fastpath*.so vhostni/_fastpath.c $(IMAGES) bench/out test-logs
