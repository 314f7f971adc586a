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
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/vhostni

.PHONY: help deps venv build images dist test test-unit bench demo install clean

help:
	@echo "deps    install system packages (apt-get; needs root) and the Python ones into $(VENV)/"
	@echo "build   compile the C fast path (csrc/) into vhostni._fastpath, install vhostni into $(VENV)/"
	@echo "images  build the guest kernel + initramfs from Debian packages into $(IMAGES)/"
	@echo "dist    build the sdist and the wheel into dist/ (what other projects install for their CI)"
	@echo "test    run all tests (unit, simulated-driver, DPDK and real-guest)"
	@echo "bench   run the benchmarks; writes bench/out/results.json"
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

# The sdist and a wheel built from it, as pip would (they carry guests/, scanners/, examples/, init.sh).
dist: venv
	rm -rf dist/.sdist && mkdir -p dist/.sdist
	$(PYTHON) -c "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])" dist
	tar -xzf dist/vhostni-*.tar.gz -C dist/.sdist
	cd dist/.sdist/vhostni-* && $(abspath $(PYTHON)) -c \
		"import sys; from setuptools import build_meta as b; b.build_wheel(sys.argv[1])" $(abspath dist)
	rm -rf dist/.sdist
	@ls dist/

test: build images
	$(PYTHON) -m pytest -ra tests

test-unit: build
	$(PYTHON) -m pytest -ra -m "not guest and not dpdk" tests

bench: build images
	$(PYTHON) -m vhostni.bench --out bench/out/results.json

demo: build images
	$(PYTHON) -m vhostni.demo

# A production install: its own venv under PREFIX (not editable: the checkout can go away),
# `vhostni` on the PATH as a symlink into it, the systemd units and an example daemon config.
install:
	$(SYSTEM_PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --upgrade pip setuptools wheel 'cffi>=1.15'
	$(DESTDIR)$(PREFIX)/bin/python -m pip install -q --no-build-isolation .
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(PREFIX)/bin/vhostni $(DESTDIR)$(BINDIR)/vhostni
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	install -m 0644 examples/systemd/vhostni.service examples/systemd/vhostni@.service $(DESTDIR)$(UNITDIR)/
	install -m 0644 examples/systemd/vhostni.toml $(DESTDIR)$(CONFDIR)/vhostni.toml.example
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/README.md

clean:
	rm -rf build dist *.egg-info vhostni/_fastpath*.so vhostni/_fastpath.c $(IMAGES) bench/out test-logs
