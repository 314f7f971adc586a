# vhostni: developer and CI entry points.  `make help` lists them.
PYTHON ?= python3
IMAGES ?= images/out

.PHONY: help deps build images test test-unit test-guest bench demo clean

help:
	@echo "deps    install system and Python dependencies (apt-get + pip; needs root)"
	@echo "build   compile the C fast path (csrc/) into vhostni._fastpath"
	@echo "images  build the guest kernel + initramfs from Debian packages into $(IMAGES)/"
	@echo "test    run all tests (unit, simulated-driver, DPDK and real-guest)"
	@echo "bench   run the benchmarks; writes bench/out/results.json"
	@echo "demo    boot two guests behind vhostni and show them talking"

deps:
	bash .ci/deps.sh

build:
	$(PYTHON) -m pip install --no-build-isolation -q -e '.[test]'

images:
	$(PYTHON) images/build.py --out $(IMAGES)

test: build images
	$(PYTHON) -m pytest -ra tests

test-unit: build
	$(PYTHON) -m pytest -ra -m "not guest and not dpdk" tests

bench: build images
	$(PYTHON) -m vhostni.bench --out bench/out/results.json

demo: build images
	$(PYTHON) -m vhostni.demo

clean:
	rm -rf build *.egg-info vhostni/_fastpath*.so vhostni/_fastpath.c $(IMAGES) bench/out test-logs
