"""Drive ``dpdk-testpmd`` (DPDK 22.11) non-interactively: one process per :class:`TestPmd`.

testpmd runs in its interactive mode (``-i``) under pexpect, so every command is sent and its output read up to
the next ``testpmd> `` prompt, with a timeout.  It runs without hugepages (``--no-huge``) and without PCI
devices; its ports are virtual devices given as ``--vdev`` strings:

* ``net_virtio_user0,path=SOCK`` -- a virtio-net *driver* (frontend) that connects to a vhost-user backend
  listening on SOCK, exactly as QEMU would.  This is the independent frontend the tests and the frame loop use.
* ``net_vhost0,iface=SOCK`` -- DPDK's own vhost-user *backend* (it listens on SOCK): the speed anchor.

Each process gets its own ``--file-prefix`` (so several testpmds coexist, also with other people's) and its
runtime directory ``/var/run/dpdk/<prefix>`` is removed when it ends.  Children die with the Python process
(``PR_SET_PDEATHSIG``) even if it is SIGKILLed, and :meth:`TestPmd.close` escalates ``quit`` -> SIGTERM ->
SIGKILL, so no testpmd outlives its owner.

testpmd needs two lcores (the main one reads commands, the other forwards); ``cpus="1"`` puts both on CPU 1
(``--lcores 0@1,1@1``) and also pins the process with ``taskset``; ``cpus=None`` lets them float.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import shlex
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pexpect

PROMPT = "testpmd> "
RUNTIME_DIR = Path("/var/run/dpdk")
_counter = itertools.count()


class TestPmdError(RuntimeError):
    """testpmd could not be started or did not answer; the message carries the tail of its output."""

    __test__ = False            # not a pytest test class


def testpmd_binary() -> str | None:
    """Path of ``dpdk-testpmd`` (``$VHOSTNI_TESTPMD`` overrides), or None."""
    env = os.environ.get("VHOSTNI_TESTPMD")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("dpdk-testpmd")


def dpdk_version() -> str | None:
    """The installed DPDK's version (from pkg-config or dpkg), or None."""
    import subprocess
    for argv in (["pkg-config", "--modversion", "libdpdk"], ["dpkg-query", "-W", "-f=${Version}", "dpdk"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def _set_pdeathsig() -> None:
    """In the child before exec: die with SIGKILL when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def is_socket(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(tmp_prefixes: Sequence[str] = ("vni-bench-", "vni-bt-")) -> list[str]:
    """Remove what a SIGKILLed earlier run left: DPDK runtime dirs ``vhostni-NAME-PID-N`` and temp dirs
    ``/tmp/<prefix>PID-...`` whose PID is dead.  (Its processes died with it: PR_SET_PDEATHSIG.)"""
    removed = []
    candidates = []
    if RUNTIME_DIR.is_dir():
        candidates += [(p, re.fullmatch(r"vhostni-.+-(\d+)-\d+", p.name)) for p in RUNTIME_DIR.iterdir()]
    tmp = Path("/tmp")
    for pre in tmp_prefixes:
        candidates += [(p, re.fullmatch(re.escape(pre) + r"(\d+)-.*", p.name)) for p in tmp.glob(pre + "*")]
    for path, m in candidates:
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


# --- output parsing -------------------------------------------------------------------------------------

_STATS_HDR = re.compile(r"#+ NIC statistics for port (\d+)\s+#+")
_FWD_HDR = re.compile(r"-+ Forward statistics for port (\d+)\s+-+")
_FIELD = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")


@dataclass
class PortStats:
    """Cumulative counters of one port, from ``show port stats``."""
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0

    def __sub__(self, other: "PortStats") -> "PortStats":
        return PortStats(**{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__})


def _fields(text: str) -> dict[str, int]:
    return {k.lower().replace("-", "_"): int(v) for k, v in _FIELD.findall(text)}


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """``show port stats all`` -> {port: PortStats}."""
    out: dict[int, PortStats] = {}
    parts = _STATS_HDR.split(text)
    # parts = [before, port, body, port, body, ...]
    for port, body in zip(parts[1::2], parts[2::2]):
        body = body.split("Throughput")[0]
        f = _fields(body)
        out[int(port)] = PortStats(**{k: f.get(k, 0) for k in PortStats.__dataclass_fields__})
    return out


def parse_fwd_stats(text: str) -> dict[int, dict[str, int]]:
    """The per-port ``Forward statistics`` blocks that ``stop`` prints -> {port: {rx_packets, tx_dropped...}}."""
    out: dict[int, dict[str, int]] = {}
    parts = _FWD_HDR.split(text)
    for port, body in zip(parts[1::2], parts[2::2]):
        out[int(port)] = _fields(body.split("----")[0] if "----" in body else body)
    return out


# --- the process ---------------------------------------------------------------------------------------

def lcores_arg(cpus: str | None) -> str:
    """EAL ``--lcores`` for testpmd's two lcores on ``cpus`` ("1", "0-1", None = float over all CPUs)."""
    if cpus is None:
        cpus = f"0-{(os.cpu_count() or 1) - 1}"
    group = cpus if re.fullmatch(r"\d+", cpus) else f"({cpus})"
    return f"0@{group},1@{group}"


class TestPmd:
    """One interactive ``dpdk-testpmd``.

    ``vdevs``: the ``--vdev`` strings (port numbers follow their order).  ``app_args``: testpmd options after
    ``--`` (``-i`` is always added).  ``mem_mb``: ``-m`` (anonymous memory, shared with vhost-user peers
    through a memfd).  ``nb_mbufs``: the mbuf pool size (the default pool of ~155k mbufs takes seconds to set
    up without hugepages).  Output goes to ``log_path`` if given.
    """

    __test__ = False

    def __init__(self, vdevs: Sequence[str], *, cpus: str | None = None, name: str = "testpmd",
                 mem_mb: int = 1024, nb_mbufs: int = 16384, app_args: Sequence[str] = (),
                 eal_args: Sequence[str] = (), log_path: str | os.PathLike | None = None):
        self.vdevs = list(vdevs)
        self.cpus = cpus
        self.name = name
        self.prefix = f"vhostni-{name}-{os.getpid()}-{next(_counter)}"
        self.mem_mb = mem_mb
        self.nb_mbufs = nb_mbufs
        self.app_args = list(app_args)
        self.eal_args = list(eal_args)
        self.log_path = Path(log_path) if log_path else None
        self.child: pexpect.spawn | None = None
        self._log = None
        self.exitstatus: int | None = None

    def argv(self) -> list[str]:
        binary = testpmd_binary()
        if binary is None:
            raise TestPmdError("dpdk-testpmd not found (apt-get install dpdk-dev)")
        argv = [binary, "--lcores", lcores_arg(self.cpus), "--no-huge", "-m", str(self.mem_mb), "--no-pci",
                "--file-prefix", self.prefix, "--log-level", "lib.eal:notice"]
        for v in self.vdevs:
            argv += ["--vdev", v]
        argv += self.eal_args
        argv += ["--", "-i", f"--total-num-mbufs={self.nb_mbufs}", *self.app_args]
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus] + argv
        return argv

    # lifecycle

    def start(self, timeout: float = 60.0) -> "TestPmd":
        argv = self.argv()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
            self._log.write(f"\n# {shlex.join(argv)}\n")
            self._log.flush()
        self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", echo=False,
                                   timeout=timeout, dimensions=(50, 250), preexec_fn=_set_pdeathsig)
        self.child.logfile_read = self._log
        try:
            self.child.expect_exact(PROMPT, timeout=timeout)
        except (pexpect.EOF, pexpect.TIMEOUT) as exc:
            what = "exited" if isinstance(exc, pexpect.EOF) else f"gave no prompt within {timeout:g} s"
            tail = self._tail()
            self.close()
            raise TestPmdError(f"testpmd {self.name} {what}: {shlex.join(argv)}\n{tail}") from None
        startup = self.child.before
        if "No probed ethernet devices" in startup:
            tail = self._tail()
            self.close()
            raise TestPmdError(f"testpmd {self.name} probed no port:\n{tail}")
        return self

    def _tail(self, chars: int = 3000) -> str:
        c = self.child
        text = ""
        if c is not None:
            text = (c.before or "") if isinstance(c.before, str) else ""
        return text[-chars:]

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def cmd(self, line: str, timeout: float = 20.0) -> str:
        """Send one command, return what testpmd printed before the next prompt."""
        c = self.child
        if c is None or not c.isalive():
            raise TestPmdError(f"testpmd {self.name} is not running (command {line!r})")
        c.sendline(line)
        try:
            c.expect_exact(PROMPT, timeout=timeout)
        except pexpect.EOF:
            raise TestPmdError(f"testpmd {self.name} died during {line!r}:\n{self._tail()}") from None
        except pexpect.TIMEOUT:
            raise TestPmdError(f"testpmd {self.name}: no prompt within {timeout:g} s after {line!r}:\n"
                               f"{self._tail()}") from None
        return c.before

    def close(self, timeout: float = 10.0) -> int | None:
        """``stop`` + ``quit``; SIGTERM, then SIGKILL if it hangs.  Removes the runtime dir.  Idempotent."""
        c = self.child
        if c is not None:
            if c.isalive():
                try:
                    c.sendline("stop")
                    c.sendline("quit")
                    c.expect(pexpect.EOF, timeout=timeout)
                except (pexpect.TIMEOUT, pexpect.EOF, OSError):
                    pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not c.isalive():
                    break
                try:
                    c.kill(sig)
                except OSError:
                    pass
                deadline = time.monotonic() + timeout
                while c.isalive() and time.monotonic() < deadline:
                    time.sleep(0.05)
            try:
                c.close(force=True)
            except Exception:
                pass
            self.exitstatus = c.exitstatus if c.exitstatus is not None else (
                -c.signalstatus if c.signalstatus else None)
            self.child = None
        shutil.rmtree(RUNTIME_DIR / self.prefix, ignore_errors=True)
        if self._log:
            self._log.close()
            self._log = None
        return self.exitstatus

    def __enter__(self) -> "TestPmd":
        if self.child is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # commands

    def nb_ports(self) -> int:
        m = re.search(r"Number of available ports:\s*(\d+)", self.cmd("show port summary all"))
        return int(m.group(1)) if m else 0

    def port_stats(self) -> dict[int, PortStats]:
        return parse_port_stats(self.cmd("show port stats all"))

    def clear_stats(self) -> None:
        self.cmd("clear port stats all")

    def link_up(self, port: int) -> bool:
        return bool(re.search(r"Link status:\s*up", self.cmd(f"show port info {port}")))

    def wait_links(self, ports: Iterable[int], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        ports = list(ports)
        while True:
            down = [p for p in ports if not self.link_up(p)]
            if not down:
                return
            if time.monotonic() > deadline:
                raise TestPmdError(f"testpmd {self.name}: link of port(s) {down} still down after {timeout:g} s")
            time.sleep(0.2)

    def start_fwd(self, mode: str = "io", *, tx_first: int | None = None, txpkts: int | None = None,
                  burst: int | None = None) -> None:
        """``set fwd MODE``, optional ``set txpkts``/``set burst``, then ``start`` or ``start tx_first N``."""
        out = self.cmd(f"set fwd {mode}")
        if "Set " not in out and "set" not in out.lower():
            raise TestPmdError(f"set fwd {mode}: {out!r}")
        if txpkts is not None:
            self.cmd(f"set txpkts {txpkts}")
        if burst is not None:
            self.cmd(f"set burst {burst}")
        out = self.cmd("start" if tx_first is None else f"start tx_first {tx_first}")
        if "forwarding" not in out and "already started" not in out:
            raise TestPmdError(f"testpmd {self.name} did not start forwarding: {out!r}")

    def stop_fwd(self) -> dict[int, dict[str, int]]:
        return parse_fwd_stats(self.cmd("stop", timeout=30))
