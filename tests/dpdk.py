"""DPDK's testpmd as an independent virtio-net frontend (and DPDK's vhost PMD as a reference backend) for tests.

Nobody here wrote DPDK's virtio-user PMD, so frames it exchanges with a backend are a check of that backend
that does not share our own bugs.  The process driving lives in :mod:`vhostni.bench.testpmd` (also used by
the benchmark); this module adds what the tests need:

* :class:`Endpoint` -- one testpmd with ONE virtio-user port on a backend socket, like one VM's NIC.  It
  polls its port all the time (``rxonly``) and sends exactly ``n x burst`` frames on demand
  (``start tx_first n``), so a test counts frames per direction exactly.
* :func:`dpdk_vhost_backend` -- DPDK's own backend: a testpmd with ``net_vhost`` ports on the given sockets,
  forwarding port i <-> port i^1 (io).  Used to prove :class:`Endpoint` and the tests themselves right,
  independently of vhostni.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from vhostni.bench.testpmd import PortStats, TestPmd, TestPmdError, is_socket, testpmd_binary

__all__ = ["BURST", "Endpoint", "TestPmdError", "dpdk_vhost_backend", "exchange", "mac", "skip_reason"]

BURST = 32          # testpmd's default burst: `start tx_first n` sends n bursts of BURST frames


def skip_reason() -> str | None:
    """Why DPDK tests cannot run here, or None."""
    if testpmd_binary() is None:
        return "dpdk-testpmd not installed (apt-get install dpdk-dev)"
    return None


class Endpoint:
    """A virtio-user frontend with one port on ``socket`` (the backend must be listening there).

    ``mac``: the port's MAC (the frames' source); ``peer``: the destination MAC of the frames it sends.
    """

    def __init__(self, socket: str | os.PathLike, *, name: str, mac: str, peer: str | None = None,
                 logdir: str | os.PathLike = "test-logs", cpus: str | None = None, vdev_args: str = ""):
        self.socket = os.fspath(socket)
        self.name = name
        self.mac = mac
        self.peer = peer
        vdev = f"net_virtio_user0,path={self.socket},mac={mac}{vdev_args}"
        self.pmd = TestPmd([vdev], cpus=cpus, name=name, mem_mb=256, nb_mbufs=8192,
                           log_path=Path(logdir) / f"{name}.testpmd.log")

    def start(self, timeout: float = 60.0) -> "Endpoint":
        if not is_socket(self.socket):
            raise TestPmdError(f"{self.name}: no backend socket at {self.socket}")
        self.pmd.start(timeout)
        if self.pmd.nb_ports() != 1:
            self.pmd.close()
            raise TestPmdError(f"{self.name}: virtio-user did not come up on {self.socket} "
                               f"(see {self.pmd.log_path})")
        if self.peer:
            self.pmd.cmd(f"set eth-peer 0 {self.peer}")
        self.pmd.start_fwd("rxonly")
        return self

    def close(self) -> None:
        self.pmd.close()

    def __enter__(self) -> "Endpoint":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> PortStats:
        return self.pmd.port_stats()[0]

    def send(self, bursts: int, size: int = 64) -> int:
        """Send ``bursts`` x BURST frames of ``size`` bytes (UDP/IPv4, testpmd's txonly); keep receiving.

        Returns how many the port transmitted (TX-packets delta)."""
        before = self.stats().tx_packets
        self.pmd.cmd("stop")
        self.pmd.cmd(f"set txpkts {size}")
        out = self.pmd.cmd(f"start tx_first {bursts}")
        if "forwarding" not in out:
            raise TestPmdError(f"{self.name}: start tx_first {bursts}: {out!r}")
        return self.stats().tx_packets - before

    def wait_rx(self, expected: int, timeout: float = 20.0, settle: float = 0.5) -> int:
        """RX-packets once it reached ``expected`` and stopped changing for ``settle`` s (or at timeout)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while True:
            n = self.stats().rx_packets
            now = time.monotonic()
            if n != last:
                last, since = n, now
            if n >= expected and now - since >= settle:
                return n
            if now > deadline:
                return n
            time.sleep(0.1)


@contextlib.contextmanager
def dpdk_vhost_backend(sockets: Sequence[str | os.PathLike], *, logdir: str | os.PathLike = "test-logs",
                       cpus: str | None = None, name: str = "dpdk-vhost") -> Iterator[TestPmd]:
    """DPDK's vhost PMD listening on ``sockets`` (io forwarding port 0 <-> 1, 2 <-> 3, ...)."""
    vdevs = [f"net_vhost{i},iface={os.fspath(s)}" for i, s in enumerate(sockets)]
    pmd = TestPmd(vdevs, cpus=cpus, name=name, mem_mb=512, nb_mbufs=8192,
                  log_path=Path(logdir) / f"{name}.testpmd.log")
    try:
        pmd.start()
        pmd.start_fwd("io")
        missing = [os.fspath(s) for s in sockets if not is_socket(s)]
        if missing:
            raise TestPmdError(f"net_vhost did not create {missing}")
        yield pmd
    finally:
        pmd.close()


def exchange(a: Endpoint, b: Endpoint, *, bursts: int = 4, size: int = 64) -> dict:
    """a sends bursts x BURST frames, then b does; returns the counts seen on both sides.

    {"a_sent", "b_rx", "b_sent", "a_rx"}: with a backend that joins a and b and nothing else on the link,
    b_rx == a_sent and a_rx == b_sent."""
    base_a, base_b = a.stats().rx_packets, b.stats().rx_packets
    a_sent = a.send(bursts, size)
    b_rx = b.wait_rx(base_b + a_sent) - base_b
    a_echo = a.stats().rx_packets - base_a
    b_sent = b.send(bursts, size)
    a_rx = a.wait_rx(base_a + b_sent) - base_a
    return {"a_sent": a_sent, "b_rx": b_rx, "a_rx_during_a_to_b": a_echo, "b_sent": b_sent, "a_rx": a_rx}


def mac(i: int) -> str:
    return "52:54:00:d0:d0:%02x" % i

