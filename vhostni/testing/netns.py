"""Private network namespaces for tests (``ip netns``): every test address lives inside one of these."""
from __future__ import annotations

import itertools
import os
import subprocess
import time
from typing import Sequence

_counter = itertools.count(1)


class NetNamespace:
    """A named network namespace, deleted (with every interface in it) by ``delete()``."""

    def __init__(self, prefix: str = "vni"):
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        """``ip -n NS ARGS`` (raises CalledProcessError with ip's message on failure)."""
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if r.returncode:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r.stdout

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.exec_argv(argv), **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(argv), **kw)

    def has_link(self, ifname: str) -> bool:
        return subprocess.run(["ip", "-n", self.name, "link", "show", ifname],
                              capture_output=True).returncode == 0

    def wait_link(self, ifname: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.has_link(ifname):
            if time.monotonic() > deadline:
                raise TimeoutError(f"interface {ifname} did not appear in namespace {self.name} "
                                   f"within {timeout:g} s")
            time.sleep(0.05)

    def add_bridge(self, name: str, *ports: str) -> None:
        self.ip("link", "add", name, "type", "bridge")
        for p in ports:
            self.ip("link", "set", p, "master", name)
        self.ip("link", "set", name, "up")

    def add_tap(self, name: str) -> None:
        """A persistent tap in the namespace (QEMU or vhostni attach to it by name)."""
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("link", "set", name, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def __enter__(self) -> "NetNamespace":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"<NetNamespace {self.name}>"
