#!/usr/bin/env bash
# Installs everything vhostni needs on a machine that has only Python, gcc and git (Debian 12).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils dpdk-dev iproute2 iperf3 busybox-static cpio kmod \
    syslinux syslinux-common mtools dosfstools \
    gcc libc6-dev make ca-certificates python3 python3-venv python3-dev
# the sanitizer runtimes of `make test-sanitize` (gcc pulls them in; named, as they are used)
$SUDO apt-get install -y -q --no-install-recommends libasan8 libubsan1
# bubblewrap confines each scanner process (vhostni/sandbox.py): namespaces, a read-only
# view, the launcher's seccomp filter loaded before the scanner's first instruction
$SUDO apt-get install -y -q --no-install-recommends bubblewrap
# libvirt, to test attaching a libvirt domain (tests/test_libvirt.py starts libvirtd by hand:
# no systemd here); libxml2-utils has the xmllint that virt-xml-validate runs
$SUDO apt-get install -y -q --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libxml2-utils
# ClamAV's clamd, the real engine behind the e-mail scanner (tests/test_email_scanner.py
# starts its own clamd offline with a signature database it writes: no freshclam needed)
$SUDO apt-get install -y -q --no-install-recommends clamav-daemon
# Hyperscan and PCRE2: the signature matcher (csrc/sig.c, the payload stage) links -lhs -lpcre2-8
$SUDO apt-get install -y -q --no-install-recommends libhyperscan-dev libpcre2-dev zlib1g-dev
# Mozilla's public suffix list: the worm scanner's per-domain DNS budgets tell registrants apart by it
$SUDO apt-get install -y -q --no-install-recommends publicsuffix
# Python packages go into the project's own venv (`make venv`, run by `make deps`), never into the
# system interpreter: Debian's python3 refuses that (PEP 668).
