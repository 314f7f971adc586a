"""A kit for NI-kernel tests: a real ``Daemon`` with policies, stepped by the test thread,
simulated guests on its NIs (tests/vdriver.py), frame builders and policy writers.

Used by test_kernel.py and test_hostile_scanner.py (test_policy.py uses the frame builders).

The daemon runs in the test's own thread: :meth:`Kit.step` is one turn of ``Daemon.run``'s
loop (the C data plane for a few ms, then every ready control event: vhost-user messages,
the punt queue, scanner sockets and stderr, then the kernel's housekeeping: hold timeouts,
dead or hung scanners, restarts, the lockdown check).  Scanners are real sandboxed
processes started by the kernel from ``tests/scanners/``.  Nothing moves behind the test's
back, so counters read between steps are exact.

Guests: ``a`` is 02:00:00:00:0a:0a / 10.0.0.1 and fd00::1, ``b`` is 02:00:00:00:0b:0b /
10.0.0.2 and fd00::2.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from typing import Callable, Iterable, Optional

from vhostni.daemon import Daemon

from vdriver import VhostUserFrontend, VirtioNetDriver  # tests/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
SCANNERS = os.path.join(HERE, "scanners")

A_MAC = bytes.fromhex("020000000a0a")
B_MAC = bytes.fromhex("020000000b0b")
BCAST = b"\xff" * 6
A_IP, B_IP = "10.0.0.1", "10.0.0.2"
A_IP6, B_IP6 = "fd00::1", "fd00::2"
MACS = {"a": A_MAC, "b": B_MAC}
IPS = {"a": A_IP, "b": B_IP}
IP6S = {"a": A_IP6, "b": B_IP6}

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------

def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes, vlan: Optional[int] = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return dst + src + tag + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag_offset: int = 0, ttl: int = 64) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 1, frag_offset & 0x1FFF, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nh, hop_limit)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + payload)


def tcp(sport: int, dport: int, flags: int = TCP_ACK, payload: bytes = b"", seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + socket.inet_aton(spa)
            + tha + socket.inet_aton(tpa))


def bootp_request(chaddr: bytes, msg_type: int = 1) -> bytes:
    """A DHCP client message (DISCOVER by default): BOOTREQUEST, Ethernet, ``chaddr``."""
    return (struct.pack("!BBBBIHH", 1, 1, 6, 0, 0x1234, 0, 0) + b"\0" * 16 + chaddr.ljust(16, b"\0")
            + b"\0" * 192 + b"\x63\x82\x53\x63" + bytes([53, 1, msg_type, 255]))


def tcp_frame(src: str = "a", dst: str = "b", sport: int = 40000, dport: int = 80,
              flags: int = TCP_ACK, payload: bytes = b"", src_mac: Optional[bytes] = None,
              src_ip: Optional[str] = None) -> bytes:
    """A TCP/IPv4 frame from guest ``src`` to guest ``dst`` (the addresses overridable)."""
    return eth(MACS[dst], src_mac or MACS[src], 0x0800,
               ipv4(src_ip or IPS[src], IPS[dst], 6, tcp(sport, dport, flags, payload)))


def udp_frame(src: str = "a", dst: str = "b", sport: int = 40000, dport: int = 53,
              payload: bytes = b"", src_mac: Optional[bytes] = None, src_ip: Optional[str] = None,
              dst_mac: Optional[bytes] = None, dst_ip: Optional[str] = None) -> bytes:
    return eth(dst_mac or MACS[dst], src_mac or MACS[src], 0x0800,
               ipv4(src_ip or IPS[src], dst_ip or IPS[dst], 17, udp(sport, dport, payload)))


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------

def scanner_spec(name: str, program: str, allow: Iterable[dict] = (), **kw) -> dict:
    """A ``[[scanner]]`` table for a program in tests/scanners/ (or an absolute path)."""
    path = program if os.path.isabs(program) else os.path.join(SCANNERS, program)
    return {"name": name, "program": path, "allow": list(allow), **kw}


@contextlib.contextmanager
def tiny_tmpfs(kib: int = 64):
    """A private tmpfs of ``kib`` KiB (needs root), unmounted after."""
    import subprocess
    d = tempfile.mkdtemp(prefix="vntmpfs-", dir="/tmp")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode:
        os.rmdir(d)
        import pytest
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def fill_fs(d: str, leave_pages: int = 0) -> str:
    """Fills the file system of directory ``d`` with one file, then frees ``leave_pages``
    4 KiB pages of it; returns the file's path (unlink it to free the space)."""
    path = os.path.join(d, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    size = 0
    try:
        while True:
            size += os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(path, max(0, size - leave_pages * 4096))
    return path


def unsendable_configs() -> dict[str, dict]:
    """Scanner configs a policy file can hold that the scanner wire's hello cannot carry:
    over MAX_JSON bytes, or nested so the hello is one level deeper than MAX_DEPTH."""
    from vhostni.scanner import wire
    deep: dict = {}
    cur = deep
    for _ in range(wire.MAX_DEPTH - 1):
        cur["d"] = {}
        cur = cur["d"]
    return {"oversize": {"blob": "x" * (wire.MAX_JSON + 1)}, "deep": deep}


def policy(mac: Optional[bytes] = None, addresses: Iterable[str] = (), prevent: Iterable[dict] = (),
           scanners: Iterable[dict] = (), **ni) -> dict:
    """A policy document: ``ni`` keys (hold_timeout_ms=..., default_decision=...) as keywords."""
    n = dict(ni)
    if mac is not None:
        n["mac"] = mac_str(mac)
    if addresses:
        n["addresses"] = list(addresses)
    return {"ni": n, "prevent": list(prevent), "scanner": list(scanners)}


def write_policy(path: str, doc) -> str:
    """Writes a policy: a dict as JSON (path should end in .json), a str as it is."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# A guard against a daemon that never returns
# ---------------------------------------------------------------------------

class Stuck(AssertionError):
    pass


def wait_until(cond, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Polls ``cond()`` until it returns something true (returned), or fails after ``timeout`` s
    naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "the daemon"):
    """Raises Stuck in the main thread if the block runs longer than ``seconds`` (a daemon
    handler that spins forever is a test failure, not a hung test run)."""
    def alarm(*_):
        raise Stuck(f"{what} did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------
# The kit
# ---------------------------------------------------------------------------

class _SteppedFrontend(VhostUserFrontend):
    """A frontend whose requests the kit's daemon serves before ``send`` returns."""

    def __init__(self, sock: socket.socket, kit: "Kit"):
        super().__init__(sock, 2.0)
        self.kit = kit

    def send_raw(self, data: bytes, fds=()) -> None:
        super().send_raw(data, fds)
        self.kit.control()


class Kit:
    """A daemon with NIs ``names``, policy documents ``policies`` {ni: dict or TOML/JSON str},
    an alert log and a stats file in a private temporary directory; ``state_dir`` is the
    daemon's ``--state-dir`` (scanner checkpoints).  With ``queue_pairs`` > 1 each guest
    sends its frames round-robin over its transmit queues and receives on all its pairs."""

    def __init__(self, policies: Optional[dict] = None, names: Iterable[str] = ("a", "b"),
                 connect: bool = True, rx: int = 64, state_dir: Optional[str] = None,
                 clients: Iterable[str] = (), queue_pairs: int = 1):
        self.queue_pairs = queue_pairs
        self._next_tx: dict[str, int] = {}
        self.dir = tempfile.mkdtemp(prefix="vnk-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.names = list(names)
        self.alert_log = os.path.join(self.dir, "alerts.jsonl")
        self.stats_file = os.path.join(self.dir, "stats.json")
        self.policy_files = {}
        for ni, doc in (policies or {}).items():
            ext = ".json" if not isinstance(doc, str) or doc.lstrip().startswith("{") else ".toml"
            self.policy_files[ni] = write_policy(os.path.join(self.dir, f"{ni}-policy{ext}"), doc)
        self.daemon: Optional[Daemon] = None
        self.drivers: dict[str, VirtioNetDriver] = {}
        # NIs in vhost-user client mode: the test's frontend listens (as QEMU with server=on)
        self.listeners: dict[str, socket.socket] = {}
        for n in clients:
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ls.bind(self.sock_path(n))
            ls.listen(1)
            self.listeners[n] = ls
        self.daemon = Daemon([(n, ("client:" if n in self.listeners else "") + self.sock_path(n))
                              for n in self.names], policies=self.policy_files,
                             alert_log=self.alert_log, stats_file=self.stats_file,
                             state_dir=state_dir)
        if connect:
            for n in self.names:
                self.connect(n, rx=rx)

    def sock_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.sock")

    # ---- running the daemon
    def control(self) -> None:
        """Serves every ready control event (as ``Daemon.run`` does after each C run)."""
        d = self.daemon
        for _ in range(100000):
            events = d.ep.poll(0)
            if not events:
                return
            for fd, _ in events:
                d._control_event(fd)
        raise AssertionError("the control plane never went idle")

    def step(self, ms: int = 2) -> None:
        """One turn of the daemon loop: data plane, control events, kernel housekeeping."""
        d = self.daemon
        d.switch.run(ms, d.poll)
        self.control()
        if d._reload:
            d._reload = False
            d.reload_policies()
        d.kernel.housekeeping()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step()

    def until(self, cond: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
        """Steps the daemon until ``cond()`` is true; returns its value or fails."""
        end = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.step()

    # ---- guests
    def connect(self, name: str, rx: int = 64) -> VirtioNetDriver:
        if name in self.listeners:
            self.listeners[name].settimeout(10)
            sock, _ = self.listeners[name].accept()    # the daemon connected (client mode)
            sock.settimeout(None)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.sock_path(name))
        self.control()
        drv = VirtioNetDriver(_SteppedFrontend(sock, self), queue_pairs=self.queue_pairs)
        drv.tx_wait = 0
        drv.setup()
        if rx:
            for qp in range(self.queue_pairs):
                drv.post_rx_buffers(rx, 2048, queue=2 * qp)
        self.drivers[name] = drv
        self.step()
        return drv

    def send(self, name: str, *frames: bytes) -> None:
        drv = self.drivers[name]
        for f in frames:
            qp = self._next_tx.get(name, 0)
            self._next_tx[name] = (qp + 1) % self.queue_pairs
            drv.reclaim_tx(queue=2 * qp + 1)
            drv.send_frame(f, queue=2 * qp + 1)
        self.step()

    def recv(self, name: str, wait: float = 0.3, count: int = 1000) -> list[bytes]:
        """Frames guest ``name`` receives while the daemon runs for up to ``wait`` seconds
        (returns early once ``count`` arrived)."""
        drv = self.drivers[name]
        got: list[bytes] = []
        end = time.monotonic() + wait
        while True:
            for qp in range(self.queue_pairs):
                if len(got) < count:
                    got += [f for _, f in drv.recv_frames(timeout=0, count=count - len(got), queue=2 * qp)]
                if len(drv.queues[2 * qp].outstanding) < 16:
                    drv.post_rx_buffers(32, 2048, queue=2 * qp)
            if len(got) >= count or time.monotonic() > end:
                return got
            self.step()

    # ---- the NI kernel
    def nk(self, ni: str):
        return self.daemon.kernel.nis[self.daemon.nis[ni].port.index]

    def sp(self, ni: str, scanner: str):
        return self.nk(ni).scanners[scanner]

    def stats(self, ni: str) -> dict:
        return self.daemon.nis[ni].port.stats()

    def subscribed(self, ni: str, scanner: str) -> bool:
        """It subscribed and told the kernel it is done (ready): what its rights cover is
        no longer held back."""
        return any(s.scanner == scanner for s in self.nk(ni).subs) and self.sp(ni, scanner).ready

    def wait_subscribed(self, ni: str, scanner: str, timeout: float = 10.0) -> None:
        self.until(lambda: self.subscribed(ni, scanner) and self.sp(ni, scanner).running,
                   timeout, f"scanner {ni}/{scanner} to subscribe")

    def alerts(self) -> list[dict]:
        """The alert log, parsed (every line must be a JSON object); what was appended
        before is in it (the log is written by a thread of its own: wait for it)."""
        if self.daemon is not None:
            self.daemon.kernel.alerts.flush()
        try:
            with open(self.alert_log) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def alerts_matching(self, text: str, ni: Optional[str] = None,
                        scanner: Optional[str] = None) -> list[dict]:
        return [a for a in self.alerts() if text in a["message"]
                and (ni is None or a["ni"] == ni) and (scanner is None or a["scanner"] == scanner)]

    def wait_alert(self, text: str, ni: Optional[str] = None, scanner: Optional[str] = None,
                   timeout: float = 10.0) -> dict:
        return self.until(lambda: (self.alerts_matching(text, ni, scanner) or [None])[0], timeout,
                          f"an alert containing {text!r}")

    def report(self, ni: str, scanner: str, timeout: float = 10.0) -> dict:
        """The fields of a test scanner's ``report`` alert (see tests/scanners/)."""
        return self.wait_alert("report", ni, scanner, timeout).get("fields", {})

    def reload(self, ni: str, doc) -> None:
        write_policy(self.policy_files[ni], doc)
        self.daemon.reload_policies()

    def close(self) -> None:
        for drv in self.drivers.values():
            try:
                drv.close(graceful=False)
            except Exception:
                pass
        if self.daemon is not None:
            self.daemon.close()
        for ls in self.listeners.values():
            ls.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return proc_status(pid).get("State", "Z")[0] != "Z"
    except FileNotFoundError:
        return False
