# vhostni: developer and CI entry points.  `make help` lists them.
#
# Everything Python runs from a virtual environment the project owns ($(VENV), made by `make deps`
# from the system's python3 with Debian's python3-venv): a stock Debian 12 python3 refuses
# `pip install` outside one (PEP 668), and nothing here is installed into the system interpreter.
# Debian's own interpreter where there is one (not a private one that happens to be first on PATH)
SYSTEM_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
IMAGES ?= images/out
PREFIX ?= /opt/vhostni
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/vhostni

.PHONY: help deps venv build build-asan images dist test test-unit test-sanitize bench sv-verify soak demo demo-webdl demo-http install clean

help:
	@echo "deps    install system packages (apt-get; needs root) and the Python ones into $(VENV)/"
	@echo "build   compile the C fast path (csrc/) into vhostni._fastpath, install vhostni into $(VENV)/"
	@echo "build-asan  the fast path again with ASan and UBSan, as vhostni._fastpath_asan"
	@echo "images  build the guest kernel + initramfs from Debian packages into $(IMAGES)/"
	@echo "dist    build the sdist and the wheel into dist/ (what other projects install for their CI)"
	@echo "test    run all tests (test-sanitize first, then unit, simulated-driver, DPDK and real-guest)"
	@echo "test-sanitize  the tests that feed the fast path hostile input, under ASan and UBSan"
	@echo "bench   run the benchmarks; writes bench/out/results.json"
	@echo "sv-verify  SV=DIR: the signature stage against OISF suricata-verify's captures (a checkout)"
	@echo "soak    run the daemon under checked traffic for SOAK_SECONDS (default 600), sampling its RSS and fds;"
	@echo "        writes bench/out/soak.json and soak.csv"
	@echo "demo    boot two guests behind vhostni and show a worm and a SYN bomb contained"
	@echo "demo-webdl  two guests: infected web downloads stopped while normal browsing flows"
	@echo "demo-http   two guests: Code-Red's and other overflow requests stopped before a web server gets them"
	@echo "install install for production: a venv in PREFIX=$(PREFIX), the command in BINDIR=$(BINDIR)"

deps:
	bash .ci/deps.sh
	$(MAKE) venv

# The project's virtual environment, with the build tools the editable install needs.
venv: $(VENV)/.deps-stamp
$(VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(VENV)
$(VENV)/.deps-stamp: pyproject.toml | $(VENV)/bin/python
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel 'cffi>=1.15'
	touch $@

build: venv
	$(PYTHON) -m pip install --no-build-isolation -q -e '.[test]'

# The fast path with AddressSanitizer and UndefinedBehaviorSanitizer, beside the normal one;
# VHOSTNI_SANITIZE=1 makes `import vhostni` use it (see vhostni/_build_fastpath.py).
build-asan: build
	$(PYTHON) vhostni/_build_fastpath.py --sanitize

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

test: build images test-sanitize
	$(PYTHON) -m pytest -ra tests

# The tests that feed the fast path hostile input (hostile and simulated drivers, DPDK's
# frontend, TCP reassembly and editing, fragments, frame parsing and prevent rules, captures
# replayed through the switch) against the sanitizer build.  Python is not
# built with ASan, so its runtime is preloaded (and libstdc++ after it: Hyperscan's compiler throws
# C++ exceptions, which ASan's __cxa_throw interceptor can only forward to a libstdc++ loaded
# at start); Python's own allocations at exit are not leaks
# of ours (detect_leaks=0).  Reports go to files, not to the stderr pytest captures (and loses
# when the process aborts); any report fails the target, even one from a subprocess (the
# daemon some tests start) whose test passed.
SANITIZE_CC ?= gcc
SANITIZE_TESTS ?= tests/test_frontend_abuse.py tests/test_tenant_frames.py tests/test_parser.py tests/test_ring_ni.py tests/test_ring_kernel.py tests/test_ring_streams.py tests/test_hostile_driver.py tests/test_vdriver.py tests/test_backend.py tests/test_mq.py \
	tests/test_tcp_reassembly.py tests/test_stream_edit.py tests/test_policy.py tests/test_replay.py \
	tests/test_flows.py tests/test_flow_scanners.py tests/test_flow_new.py \
	tests/test_sigstage.py tests/test_stages_fuzz.py tests/test_sigstage_threshold.py tests/test_sighttp.py \
	tests/test_sighttp_encoding.py tests/test_sig_segment_positions.py
SANITIZE_LOGS ?= test-logs/sanitize
SANITIZE_ENV = VHOSTNI_SANITIZE=1 \
	LD_PRELOAD="$$($(SANITIZE_CC) -print-file-name=libasan.so) $$($(SANITIZE_CC) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:log_path=$(abspath $(SANITIZE_LOGS))/asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(abspath $(SANITIZE_LOGS))/ubsan
test-sanitize: build-asan
	rm -rf $(SANITIZE_LOGS) && mkdir -p $(SANITIZE_LOGS)
	$(SANITIZE_ENV) $(PYTHON) -m pytest -ra $(SANITIZE_TESTS) || { cat $(SANITIZE_LOGS)/* 2>/dev/null; exit 1; }
	@if [ -n "$$(ls -A $(SANITIZE_LOGS))" ]; then cat $(SANITIZE_LOGS)/*; echo "sanitizer reports above"; exit 1; fi

test-unit: build
	$(PYTHON) -m pytest -ra -m "not guest and not dpdk" tests

bench: build images
	$(PYTHON) -m vhostni.bench --out bench/out/results.json

# Not part of `test` (it needs a checkout of OISF's suricata-verify, SV=DIR): the signature stage
# against its captures and the alerts each test expects from Suricata; exits 1 on an unexplained one.
sv-verify: build
	$(PYTHON) -m vhostni.bench.svverify $(SV) --work bench/out/sv-verify

# Not part of `test`: a long run looking for growth (memory, fds) that does not level off.
SOAK_SECONDS ?= 600
soak: build
	$(PYTHON) -m vhostni.bench.soak --seconds $(SOAK_SECONDS) --out bench/out/soak.json

demo: build images
	$(PYTHON) -m vhostni.demo

demo-webdl: build images
	$(PYTHON) -m vhostni.demo_webdl

demo-http: build images
	$(PYTHON) -m vhostni.demo_http

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
