"""A test bench for the vhostni backend: an in-process ``Daemon`` stepped by the test
thread, with simulated virtio-net drivers (tests/vdriver.py) attached to its NIs.

Used by test_backend.py and test_hostile_driver.py.

Why stepped, not threaded: the real ``Daemon`` object serves the NIs (its listeners, its
``_Reader``, ``VhostUserDevice`` and the C switch), but nothing runs behind the test's back.
A request the frontend sends is handled before ``send`` returns (``SteppedFrontend``), and
the data plane moves only in :meth:`Bench.step` (one ``Switch.run`` of a millisecond: kicks
read from their eventfds, rings serviced, interrupts sent).  So interrupt and kick counts
are exact, and a test can look at the rings between two passes.  ``Switch.service()`` is
a single pass with no kicks read, for the few tests that need exactly one.

For the things only a separate process shows (the daemon survives, its /proc/PID/fd, the
stats file), ``DaemonProcess`` runs ``vhostni run`` and drivers talk to it over its sockets.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from typing import Iterable, Optional

from vhostni.daemon import Daemon
from vhostni.vhost_user import proto as vu
from vhostni.vhost_user.proto import Request

from vdriver import (  # tests/ is on sys.path
    DEFAULT_FEATURES, MiB, VhostUserFrontend, VirtioNetDriver, VirtioNetHdr,
)

A_MAC = bytes.fromhex("020000000a0a")
B_MAC = bytes.fromhex("020000000b0b")
C_MAC = bytes.fromhex("020000000c0c")
BCAST = b"\xff" * 6


def ether(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (default ethertype: IEEE local experimental, nobody parses it)."""
    return dst + src + struct.pack("!H", ethertype) + payload


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes nobody would produce by accident (so byte-exact comparisons mean something)."""
    return bytes((i * 131 + seed * 17 + (i >> 8) * 7 + 1) & 0xFF for i in range(n))


def fd_count(pid: Optional[int] = None) -> int:
    """Open fds of this process (after a GC pass: an earlier test's unreferenced socket
    closing in the middle of a count would look like a leak) or of process ``pid``."""
    if pid is None:
        gc.collect()
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def map_count(pid: Optional[int] = None) -> int:
    """Memory mappings of this process or of process ``pid``.  Under the sanitizer build
    (VHOSTNI_SANITIZE=1) only those of a file (guest memory is a memfd's): ASan's allocator
    maps and unmaps anonymous memory as it pleases."""
    if pid is None:
        gc.collect()
    with open(f"/proc/{pid or 'self'}/maps") as f:
        if os.environ.get("VHOSTNI_SANITIZE") == "1":
            return sum(1 for line in f if len(line.split(None, 5)) == 6)
        return sum(1 for _ in f)


class SteppedFrontend(VhostUserFrontend):
    """A vhost-user frontend whose every request is served by the bench before send returns."""

    def __init__(self, sock: socket.socket, bench: "Bench", timeout: float = 2.0):
        super().__init__(sock, timeout)
        self.bench = bench

    def send_raw(self, data: bytes, fds=()) -> None:
        super().send_raw(data, fds)
        self.bench.control()


class Bench:
    """One daemon (``names``: its NIs) and the drivers connected to it."""

    def __init__(self, names: Iterable[str] = ("a", "b"), **daemon_kwargs):
        self.dir = tempfile.mkdtemp(prefix="vni-", dir="/tmp")   # unix socket paths stay short
        self.stats_file = os.path.join(self.dir, "stats.json")
        self.daemon = Daemon([(n, self.sock_path(n)) for n in names], stats_file=self.stats_file,
                             **daemon_kwargs)
        self.drivers: list[VirtioNetDriver] = []
        self.frontends: list[VhostUserFrontend] = []

    def sock_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.sock")

    def port(self, name: str):
        return self.daemon.nis[name].port

    def device(self, name: str):
        return self.daemon.nis[name].device

    def stats(self, name: str) -> dict:
        return self.port(name).stats()

    def broken(self, name: str) -> Optional[str]:
        return self.port(name).broken_reason()

    def stats_json(self) -> dict:
        """What the daemon's stats file says now (written by its housekeeping)."""
        self.daemon._housekeeping()
        with open(self.stats_file) as f:
            return json.load(f)

    # ---- running the daemon
    def control(self) -> None:
        """Serve every pending control event (connections, vhost-user messages)."""
        for _ in range(10000):
            events = self.daemon.ep.poll(0)
            if not events:
                return
            for fd, _ in events:
                self.daemon._control_event(fd)
        raise AssertionError("the control plane never went idle")

    def step(self, n: int = 1, ms: int = 1) -> None:
        """Run the data plane n times for ``ms`` milliseconds each (kicks, rings, calls)."""
        for _ in range(n):
            self.control()
            self.daemon.switch.run(ms, self.daemon.poll)
            self.control()

    def service(self) -> int:
        """Exactly one pass over the rings (no kicks read)."""
        self.control()
        return self.daemon.switch.service()

    # ---- drivers
    def raw_socket(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.sock_path(name))
        self.control()   # accept
        return sock

    def frontend(self, name: str) -> SteppedFrontend:
        fe = SteppedFrontend(self.raw_socket(name), self)
        self.frontends.append(fe)
        return fe

    def connect(self, name: str, setup: bool = True, **kwargs) -> VirtioNetDriver:
        drv = VirtioNetDriver(self.frontend(name), **kwargs)
        drv.tx_wait = 0          # never wait for a backend that only moves when stepped
        self.drivers.append(drv)
        if setup:
            drv.setup()
        return drv

    def recv(self, drv: VirtioNetDriver, count: int = 1, steps: int = 100, queue: int = 0):
        """Step until ``drv`` has received ``count`` frames (or ``steps`` run out)."""
        frames = []
        for _ in range(steps):
            frames += drv.recv_frames(timeout=0, count=count - len(frames), queue=queue)
            if len(frames) >= count:
                break
            self.step()
        return frames

    def send_recv(self, src: VirtioNetDriver, dst: VirtioNetDriver, frame: bytes, **send_kw):
        """src sends ``frame``; returns what dst received (header, frame)."""
        src.send_frame(frame, **send_kw)
        got = self.recv(dst, 1)
        src.reclaim_tx(send_kw.get("queue", 1))
        assert len(got) == 1, f"frame not delivered (got {len(got)})"
        return got[0]

    def close(self) -> None:
        for drv in self.drivers:
            drv.close(graceful=False)
        for fe in self.frontends:
            fe.close()
        self.daemon.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def check_pair_works(bench: Bench, a: VirtioNetDriver, b: VirtioNetDriver,
                     a_mac: bytes = A_MAC, b_mac: bytes = B_MAC, seed: int = 0) -> None:
    """a -> b and b -> a, byte-exact (posting receive buffers as needed)."""
    for src, dst, s_mac, d_mac in ((a, b, a_mac, b_mac), (b, a, b_mac, a_mac)):
        if len(dst.queues[0].outstanding) < 4:
            dst.post_rx_buffers(16, 2048)
        frame = ether(d_mac, s_mac, pattern(300 + seed, seed))
        hdr, got = bench.send_recv(src, dst, frame)
        assert got == frame


def setup_features(*, exclude: Iterable[int] = (), include: Iterable[int] = ()) -> int:
    f = DEFAULT_FEATURES
    for bit in exclude:
        f &= ~(1 << bit)
    for bit in include:
        f |= 1 << bit
    return f


# ---------------------------------------------------------------------------
# vhostni run as a separate process
# ---------------------------------------------------------------------------

class DaemonProcess:
    """``vhostni run --ni NAME=SOCK ... --stats-file F`` and blocking drivers on its sockets."""

    def __init__(self, names: Iterable[str] = ("a", "b"), extra_args: Iterable[str] = ()):
        from vhostni.testing.daemon import VhostniDaemon
        self.dir = tempfile.mkdtemp(prefix="vnp-", dir="/tmp")
        self.stats_file = os.path.join(self.dir, "stats.json")
        self.names = list(names)
        self.proc = VhostniDaemon({n: os.path.join(self.dir, f"{n}.sock") for n in self.names},
                                  extra_args=["--stats-file", self.stats_file, *extra_args],
                                  log_path=os.path.join(self.dir, "vhostni.log"))
        self.proc.start(timeout=20)
        self.drivers: list[VirtioNetDriver] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sock_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.sock")

    def stats(self, fresh_after: float = 0.0, timeout: float = 3.0) -> dict:
        """The stats file, once it was written after ``fresh_after`` (a time.time())."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.stats_file) as f:
                    data = json.load(f)
                if data["time"] >= fresh_after:
                    return data
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no fresh stats file\n{self.proc.log_tail()}")
            time.sleep(0.05)

    def close(self) -> None:
        for drv in self.drivers:
            drv.close(graceful=False)
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def vring_file(index: int, fd: Optional[int]) -> vu.VringFile:
    return vu.VringFile(index, fd is None, fd)


__all__ = [
    "A_MAC", "B_MAC", "C_MAC", "BCAST", "Bench", "DaemonProcess", "SteppedFrontend", "MiB",
    "Request", "VirtioNetHdr", "check_pair_works", "ether", "fd_count", "map_count", "pattern",
    "setup_features", "vring_file", "vu",
]
