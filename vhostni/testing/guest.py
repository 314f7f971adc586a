"""Real QEMU guests for tests: boot vhostni's guest image (``vhostni images build``) or a guest of your own
(``GuestImages.user``: a kernel, initrd or disk image) and drive its serial console.

    from vhostni.testing import Guest, GuestImages, VhostUserNic, boot_guests

    images = GuestImages.locate()     # $VHOSTNI_IMAGES, images/out of a checkout, or ~/.cache/vhostni/images
    a = Guest("a", images, nics=[VhostUserNic("/tmp/vni/a.sock")], ip="10.77.0.1/24")
    b = Guest("b", images, nics=[VhostUserNic("/tmp/vni/b.sock")], ip="10.77.0.2/24")
    boot_guests([a, b])                                # both boot at once
    out, status = a.run("ping -c 1 10.77.0.2", timeout=30)
    a.close(); b.close()

QEMU runs under TCG by default (``$VHOSTNI_ACCEL`` overrides), with the guest's memory in a shared memfd so
vhost-user backends can map it.  The serial console is QEMU's stdio, driven with pexpect; everything QEMU and
the guest print is written to the guest's console log (``test-logs/<name>.console.log`` unless given).

``run()`` sends one line of shell and reads its output between two unique markers, so it needs no prompt
matching: ``echo B; command eval 'CMD' </dev/null; echo E:$?``.  The command's stdin is /dev/null (a
background ``nc -l`` in the command does not steal the console).  After boot, the console's interactive shell
is replaced by a non-interactive one (no prompts, no echo, background jobs immune to the Ctrl-C that
interrupts a timed-out command); don't ``exit`` it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pexpect

# The guest's tty turns "\n" into "\r\n" and QEMU's stdio (OPOST on) adds another "\r": "\r\r\n".

READY_MARKER = "VHOSTNI-GUEST-READY"
ERROR_MARKER = "VHOSTNI-GUEST-ERROR:"
DEFAULT_LOG_DIR = "test-logs"
QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"      # the Debian package with QEMU
_MAX_LINE = 3500          # a canonical-mode tty line holds at most 4095 bytes


class GuestError(Exception):
    """A guest could not be started or driven.  The message names the console log."""


class GuestBootError(GuestError):
    pass


class GuestTimeout(GuestError, TimeoutError):
    def __init__(self, msg: str, output: str = ""):
        super().__init__(msg)
        self.output = output


class GuestCommandError(GuestError):
    def __init__(self, guest: str, cmd: str, status: int, output: str):
        super().__init__(f"{guest}: `{cmd}` exited with status {status}:\n{output.rstrip()}")
        self.cmd, self.status, self.output = cmd, status, output


class ImagesMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class GuestLogin:
    """How the harness gets a shell on a guest of your own (not vhostni's initramfs): the guest must have a
    serial console on ttyS0 and a POSIX ``sh``, ``stty`` and (to configure NICs) ``ip``.

    The harness waits for ``login_prompt`` (then sends ``user``, and ``password`` at ``password_prompt``) or,
    for a guest that logs in by itself (autologin, or a shell on the console), for ``shell_prompt``; then it
    makes sure the shell answers before taking over the console as for vhostni's own guests.  Patterns are
    Python regular expressions matched against the console's output (``$`` is the end of what arrived)."""

    user: str = "root"
    password: str | None = None
    login_prompt: str = r"login: $"
    password_prompt: str = r"[Pp]assword: ?$"
    #: "# " or "$ " at the end of the output, maybe followed by terminal queries (busybox asks ESC[6n)
    shell_prompt: str = r"[#$] ?(?:\x1b\[[0-9;?]*[A-Za-z])*$"


@dataclass(frozen=True)
class GuestImages:
    """What a guest boots.

    vhostni's own images (``vhostni images build``, or ``make images`` in a checkout): ``kernel`` and
    ``initrd``, whose /init configures the network from the kernel command line and prints a ready marker
    (:meth:`locate`).  Your own guest (:meth:`user`): a kernel, with or without an initrd, and/or a
    ``disk`` image (qcow2 or raw; booted by its own boot loader when there is no kernel), reached through
    ``login`` on the serial console; the harness configures its NICs through the console, finding each by
    its MAC address."""

    kernel: Path | None
    initrd: Path | None = None
    disk: Path | None = None
    disk_format: str = "qcow2"
    append: str = ""
    login: GuestLogin | None = None      # None: vhostni's own initramfs

    @classmethod
    def locate(cls, directory: str | os.PathLike | None = None) -> "GuestImages":
        """vhostni's images in ``directory``, else ``$VHOSTNI_IMAGES``, else ``./images/out`` (a vhostni
        checkout's ``make images``) if it has them, else ``~/.cache/vhostni/images``; ImagesMissing if absent."""
        if directory:
            d = Path(directory)
        elif os.environ.get("VHOSTNI_IMAGES"):
            d = Path(os.environ["VHOSTNI_IMAGES"])
        elif Path("images/out/vmlinuz").is_file():
            d = Path("images/out")
        else:
            from ..resources import default_images_dir
            d = default_images_dir()
        imgs = cls(d / "vmlinuz", d / "initrd.cpio.gz")
        missing = [str(p) for p in (imgs.kernel, imgs.initrd) if not p.is_file()]
        if missing:
            raise ImagesMissing(f"guest images not found ({', '.join(missing)}); build them with "
                                f"`vhostni images build --out {d}` (in a vhostni checkout: `make images`)")
        return imgs

    @classmethod
    def user(cls, kernel: str | os.PathLike | None = None, initrd: str | os.PathLike | None = None, *,
             disk: str | os.PathLike | None = None, disk_format: str | None = None, append: str = "",
             login: GuestLogin | None = None) -> "GuestImages":
        """Your own guest: ``kernel`` (+ ``initrd``) booted directly with ``console=ttyS0`` and ``append`` on
        its command line, and/or a ``disk`` image (attached as a virtio disk, copy-on-write: the file is
        never written).  ImagesMissing if a file is absent."""
        if kernel is None and disk is None:
            raise ValueError("a guest of your own needs a kernel or a disk image")
        if initrd is not None and kernel is None:
            raise ValueError("an initrd needs a kernel")
        paths = [Path(p) if p is not None else None for p in (kernel, initrd, disk)]
        missing = [str(p) for p in paths if p is not None and not p.is_file()]
        if missing:
            raise ImagesMissing(f"guest image files not found: {', '.join(missing)}")
        fmt = disk_format or ("raw" if paths[2] is not None and paths[2].suffix in (".img", ".raw") else "qcow2")
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"disk_format {fmt!r}: qcow2 or raw")
        return cls(paths[0], paths[1], paths[2], fmt, append, login or GuestLogin())

    @property
    def manifest(self) -> dict:
        p = self.kernel.parent / "manifest.json" if self.kernel else None
        return json.loads(p.read_text()) if p is not None and p.is_file() else {}


class _ConsoleLog:
    """The console log file, without the carriage returns of the serial line (for people reading it)."""

    def __init__(self, path: Path):
        self._f = open(path, "w", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self._f.write(text.replace("\r", ""))

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()


def _crlf(text: str) -> str:
    return re.sub(r"\r+\n", "\n", text)


def default_accel() -> str:
    # /dev/kvm may exist but hang guests on these machines (see DESIGN.md): TCG unless told otherwise.
    return os.environ.get("VHOSTNI_ACCEL", "tcg")


def mac_for(name: str, index: int = 0) -> str:
    """A stable locally administered MAC for NIC ``index`` of guest ``name`` (52:54:00:xx:xx:xx)."""
    h = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (h[0], h[1], h[2])


# ---- NICs ----------------------------------------------------------------------------------------------------


@dataclass
class Nic:
    mac: str | None = field(default=None, kw_only=True)
    model: str = field(default="virtio-net-pci", kw_only=True)
    device_opts: str = field(default="", kw_only=True)   # extra ",key=val" for -device

    def netdev(self, idx: int) -> list[str]:
        raise NotImplementedError

    def device(self, idx: int, mac: str, accel: str) -> list[str]:
        opts = f"{self.model},netdev=n{idx},mac={mac}"
        if self.device_opts:
            opts += "," + self.device_opts.lstrip(",")
        return ["-device", opts]


@dataclass
class VhostUserNic(Nic):
    """A virtio-net NIC served by a vhost-user backend listening on ``socket`` (QEMU is the client).

    ``reconnect``: seconds between QEMU's reconnection attempts after the backend goes away (None: never).
    ``server=True`` makes QEMU listen on ``socket`` instead and the backend connect to it.
    """

    socket: str | os.PathLike = ""
    reconnect: int | None = 1
    server: bool = False
    queues: int = 1

    def netdev(self, idx: int) -> list[str]:
        if not self.socket:
            raise ValueError("VhostUserNic needs a socket path")
        ch = f"socket,id=c{idx},path={os.fspath(self.socket)}"
        if self.server:
            ch += ",server=on,wait=off"
        elif self.reconnect:
            ch += f",reconnect={int(self.reconnect)}"
        nd = f"vhost-user,id=n{idx},chardev=c{idx}"
        if self.queues > 1:
            nd += f",queues={self.queues}"
        return ["-chardev", ch, "-netdev", nd]

    def device(self, idx: int, mac: str, accel: str) -> list[str]:
        args = super().device(idx, mac, accel)
        # QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a vhost-user NIC starts with MSI-X.
        if accel == "tcg" and "vectors=" not in args[1]:
            args[1] += ",vectors=0"
        if self.queues > 1 and "mq=" not in args[1]:
            args[1] += ",mq=on"
        return args


@dataclass
class TapNic(Nic):
    """QEMU's own tap backend on host interface ``ifname`` (created by QEMU if it does not exist; give the
    guest a ``netns`` to keep it out of the root namespace).  The baseline vhostni is compared with."""

    ifname: str = ""
    vhost: bool = False

    def netdev(self, idx: int) -> list[str]:
        if not self.ifname:
            raise ValueError("TapNic needs an interface name")
        nd = f"tap,id=n{idx},ifname={self.ifname},script=no,downscript=no"
        if self.vhost:
            nd += ",vhost=on"
        return ["-netdev", nd]


@dataclass
class UserNic(Nic):
    """QEMU's user-mode (slirp) network: DHCP gives 10.0.2.15, and 10.0.2.2 reaches the host's loopback.

    ``hostfwd``: e.g. ``["tcp:127.0.0.1:2222-:22"]``.  ``restrict=True`` cuts the guest off from
    everything but the host loopback and forwards."""

    hostfwd: Sequence[str] = ()
    restrict: bool = True

    def netdev(self, idx: int) -> list[str]:
        nd = f"user,id=n{idx}"
        if self.restrict:
            nd += ",restrict=on"
        for fwd in self.hostfwd:
            nd += f",hostfwd={fwd}"
        return ["-netdev", nd]


# ---- the guest -----------------------------------------------------------------------------------------------


def _qemu_opt(value: str) -> str:
    """A value inside a QEMU -drive/-device option list: commas are doubled."""
    return value.replace(",", ",,")


def _listify(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


class Guest:
    """One QEMU guest on a serial console.

    Network configuration goes on the kernel command line (see images/init.sh): ``ip`` is a list with one
    entry per NIC (``"ADDR/PREFIX"``, ``"dhcp"`` or ``"none"``; a string for one NIC), ``gw`` the default
    route, ``mtu`` an int or a list per NIC, ``dns`` nameservers.
    """

    def __init__(self, name: str = "guest", images: GuestImages | None = None, *,
                 nics: Iterable[Nic] = (), ip: str | Sequence[str] | None = None, gw: str | None = None,
                 mtu: int | Sequence[int] | None = None, dns: str | Sequence[str] | None = None,
                 memory_mb: int = 256, smp: int = 1, accel: str | None = None, cpu: str | None = "max",
                 cmdline: str = "", log_path: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike = DEFAULT_LOG_DIR, qmp: bool = False, netns: str | None = None,
                 qemu: str | None = None, extra_args: Sequence[str] = (), boot_timeout: float = 120.0):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            raise ValueError(f"guest name {name!r}: use letters, digits, '.', '_' and '-' (it is the hostname)")
        self.name = name
        self.images = images or GuestImages.locate()
        self.nics = list(nics)
        self.ip = _listify(ip)
        self.gw = gw
        self.mtu = [str(m) for m in ([mtu] if isinstance(mtu, int) else (mtu or []))]
        self.dns = _listify(dns)
        self.memory_mb = memory_mb
        self.smp = smp
        self.accel = accel or default_accel()
        self.cpu = cpu
        self.cmdline_extra = cmdline
        self.log_path = Path(log_path) if log_path else Path(log_dir) / f"{name}.console.log"
        self.netns = netns
        self.qemu = qemu or os.environ.get("VHOSTNI_QEMU", QEMU)
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self._workdir: str | None = None
        self.qmp_path: str | None = None
        self._want_qmp = qmp
        self._child: pexpect.spawn | None = None
        self._log = None
        self._seq = itertools.count(1)
        self._token = secrets.token_hex(3)
        self._ready = False
        self._broken: str | None = None
        self.boot_seconds: float | None = None
        self.boot_output = ""
        self.macs = [n.mac or mac_for(name, i) for i, n in enumerate(self.nics)]
        self._lock = threading.Lock()

    # -- command line --

    def kernel_cmdline(self) -> str:
        if self.images.login is not None:       # a guest of your own: its NICs are configured after login
            return " ".join(p for p in ("console=ttyS0", "panic=-1", self.images.append, self.cmdline_extra) if p)
        parts = ["console=ttyS0", "loglevel=4", "panic=-1", f"vhostni.hostname={self.name}"]
        if self.ip:
            parts.append("vhostni.ip=" + ",".join(self.ip))
        if self.gw:
            parts.append(f"vhostni.gw={self.gw}")
        if self.mtu:
            parts.append("vhostni.mtu=" + ",".join(self.mtu))
        if self.dns:
            parts.append("vhostni.dns=" + ",".join(self.dns))
        if self.cmdline_extra:
            parts.append(self.cmdline_extra)
        return " ".join(parts)

    def argv(self) -> list[str]:
        m = self.memory_mb
        argv = [self.qemu, "-accel", self.accel, "-m", f"{m}M", "-smp", str(self.smp),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                # vhost-user backends map guest memory: it must be a shared memfd.
                "-object", f"memory-backend-memfd,id=mem,size={m}M,share=on",
                "-machine", "pc,memory-backend=mem",
                "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0"]
        im = self.images
        if im.kernel is not None:
            argv += ["-kernel", str(im.kernel)]
            if im.initrd is not None:
                argv += ["-initrd", str(im.initrd)]
            argv += ["-append", self.kernel_cmdline()]
        if im.disk is not None:
            # snapshot=on: writes go to a temporary overlay, so the image is never changed and guests share it
            argv += ["-drive", f"file={_qemu_opt(str(im.disk))},if=virtio,format={im.disk_format},snapshot=on"]
        if self.cpu:
            argv += ["-cpu", self.cpu]
        if self.qmp_path:
            argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for i, (nic, mac) in enumerate(zip(self.nics, self.macs)):
            argv += nic.netdev(i) + nic.device(i, mac, self.accel)
        argv += self.extra_args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        return argv

    # -- lifecycle --

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def alive(self) -> bool:
        return bool(self._child and self._child.isalive())

    def start(self) -> "Guest":
        """Start QEMU (returns at once; ``wait_ready()`` waits for the guest)."""
        if self._child is not None:
            raise GuestError(f"guest {self.name} already started")
        if shutil.which(self.qemu) is None:
            raise GuestError(f"{self.qemu} not found: install Debian's {QEMU_PACKAGE} "
                             f"(apt-get install {QEMU_PACKAGE})")
        self._workdir = tempfile.mkdtemp(prefix=f"vni-{self.name[:20]}-", dir="/tmp")
        if self._want_qmp:
            self.qmp_path = os.path.join(self._workdir, "qmp.sock")
        argv = self.argv()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = _ConsoleLog(self.log_path)
        self._log.write(f"# vhostni guest {self.name}: {shlex.join(argv)}\n")
        self._log.flush()
        self._t0 = time.monotonic()
        self._child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                                    timeout=None, echo=False, dimensions=(50, 250))
        self._child.logfile_read = self._log
        self._child.delaybeforesend = None
        return self

    def wait_ready(self, timeout: float | None = None) -> "Guest":
        """Wait for the guest's ready marker; GuestBootError (naming the console log) if it does not come."""
        if self._child is None:
            raise GuestError(f"guest {self.name} not started")
        if self._ready:
            return self
        timeout = self.boot_timeout if timeout is None else timeout
        c = self._child
        if self.images.login is not None:
            self._login(time.monotonic() + timeout, timeout)
        else:
            idx = c.expect([re.escape(READY_MARKER) + r"[^\n]*\n", r"Kernel panic[^\n]*", pexpect.EOF,
                            pexpect.TIMEOUT], timeout=timeout)
            self.boot_output = (c.before or "") + (c.after if isinstance(c.after, str) else "")
            if idx != 0:
                why = {1: f"kernel panic: {c.after.strip() if isinstance(c.after, str) else ''}",
                       2: f"QEMU exited ({self._exit_text()})",
                       3: f"no {READY_MARKER} within {timeout:g} s"}[idx]
                self._fail_boot(why)
            errors = [line.strip() for line in self.boot_output.splitlines() if ERROR_MARKER in line]
            if errors:
                self._fail_boot("its /init reported:\n  " + "\n  ".join(errors))
        self.boot_seconds = time.monotonic() - self._t0
        # The console's interactive shell now starts.  run() needs a shell that reads plain lines, prints no
        # prompts and survives signals, so replace it with a non-interactive one reading the console as a
        # script (busybox's interactive ash with echo off takes a SIGCHLD during its read for end of input and
        # exits).  Echo off first; Ctrl-C (used on timeouts) is trapped so only the command dies.
        tag = f"{self._token}_0"
        c.sendline(f"stty -echo; echo '__VNI_X''_{tag}__'; exec sh /proc/self/fd/0")
        try:
            c.expect(f"__VNI_X_{tag}__\r*\n", timeout=max(30.0, timeout / 4))
            c.sendline(f"trap : INT; echo '__VNI_S''_{tag}__'")
            c.expect(f"__VNI_S_{tag}__\r*\n", timeout=max(30.0, timeout / 4))
        except (pexpect.TIMEOUT, pexpect.EOF) as e:
            self._fail_boot(f"no shell on the console after the ready marker ({type(e).__name__})")
        self._ready = True
        if self.images.login is not None:
            try:
                self._configure_user_guest()
            except GuestError as e:
                self._fail_boot(f"configuring it through the console failed: {e}")
        return self

    def _login(self, deadline: float, timeout: float) -> None:
        """A guest of your own: log in on the console (or find its shell), until a shell answers."""
        lg = self.images.login
        assert lg is not None
        c = self._child
        assert c is not None

        def left(cap: float = 1e9) -> float:
            return max(0.1, min(cap, deadline - time.monotonic()))

        panic, incorrect = r"Kernel panic[^\n]*", r"Login incorrect"
        idx = c.expect([lg.login_prompt, lg.shell_prompt, panic, pexpect.EOF, pexpect.TIMEOUT], timeout=left())
        self.boot_output = (c.before or "") + (c.after if isinstance(c.after, str) else "")
        if idx >= 2:
            self._fail_boot({2: f"kernel panic: {c.after.strip() if isinstance(c.after, str) else ''}",
                             3: f"QEMU exited ({self._exit_text()})",
                             4: f"no login prompt ({lg.login_prompt!r}) nor shell prompt ({lg.shell_prompt!r}) "
                                "on the serial console (ttyS0) within "
                                f"{timeout:g} s"}[idx])
        if idx == 0:
            c.sendline(lg.user)
            if lg.password is not None:
                i = c.expect([lg.password_prompt, lg.shell_prompt, pexpect.EOF, pexpect.TIMEOUT], timeout=left(60))
                if i == 0:
                    c.sendline(lg.password)
                elif i >= 2:
                    self._fail_boot(f"no password prompt after logging in as {lg.user!r}")
        # The prompt may come before the shell reads its input (or be a false match): ask until it answers.
        for n in itertools.count(1):
            tag = f"{self._token}_p{n}"
            c.sendline(f"echo '__VNI_P''_{tag}__'")
            i = c.expect([f"__VNI_P_{tag}__\r*\n", incorrect, pexpect.EOF, pexpect.TIMEOUT], timeout=left(3))
            if i == 0:
                return
            if i == 1:
                self._fail_boot(f"login as {lg.user!r} failed (Login incorrect)")
            if i == 2:
                self._fail_boot(f"QEMU exited ({self._exit_text()})")
            if time.monotonic() >= deadline:
                self._fail_boot(f"no shell answered on the console within {timeout:g} s"
                                + (f" after logging in as {lg.user!r}" if idx == 0 else ""))

    def _configure_user_guest(self) -> None:
        """What vhostni's /init does from the kernel command line, through the console: the host name and
        each NIC (found by its MAC address) with its address, MTU, then the default route and nameservers."""
        cmds = [f"hostname {shlex.quote(self.name)} 2>/dev/null || true"]
        for i, mac in enumerate(self.macs):
            mac = mac.lower()                   # as sysfs shows it
            if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
                raise GuestError(f"NIC {i}: bad MAC address {mac!r}")
            conf = self.ip[i] if i < len(self.ip) else None
            mtu = self.mtu[i] if i < len(self.mtu) else None
            if conf is None and mtu is None:
                continue
            find = (f"d=; for f in /sys/class/net/*; do [ \"$(cat $f/address 2>/dev/null)\" = {mac} ] && "
                    f"d=${{f##*/}}; done; [ -n \"$d\" ] || {{ echo 'no network interface with MAC {mac}'; "
                    "exit 1; }")
            up = f"ip link set \"$d\" up" + (f" mtu {int(mtu)}" if mtu else "")
            if conf in (None, "", "none"):
                addr = "true"
            elif conf == "dhcp":
                addr = ("if command -v dhclient >/dev/null; then dhclient -1 \"$d\"; "
                        "else udhcpc -i \"$d\" -q -n -t 5 -T 1; fi")
            else:
                addr = f"ip -4 addr flush dev \"$d\" && ip addr add {shlex.quote(conf)} dev \"$d\""
            cmds.append(f"{find}; {up} && {addr}")
        if self.gw:
            cmds.append(f"ip route replace default via {shlex.quote(self.gw)}")
        if self.dns:
            cmds.append("printf 'nameserver %s\\n' " + " ".join(shlex.quote(d) for d in self.dns)
                        + " > /etc/resolv.conf")
        for cmd in cmds:
            self.check(f"( {cmd} )", timeout=90)

    def boot(self, timeout: float | None = None) -> "Guest":
        """start() + wait_ready()."""
        self.start()
        return self.wait_ready(timeout)

    def _exit_text(self) -> str:
        c = self._child
        if c is None:
            return "not started"
        if c.isalive():
            return "still running"
        return f"exit status {c.exitstatus}" if c.signalstatus is None else f"signal {c.signalstatus}"

    def _fail_boot(self, why: str) -> None:
        tail = self.console_tail(25)
        self.close()
        raise GuestBootError(f"guest {self.name} did not boot: {why}\n"
                             f"console log: {self.log_path}\n--- last lines ---\n{tail}")

    def console_tail(self, lines: int = 40) -> str:
        try:
            if self._log and not self._log.closed:
                self._log.flush()
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def close(self, timeout: float = 10.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and close the console log.  Safe to call twice."""
        c = self._child
        if c is not None and c.isalive():
            try:
                c.kill(15)
            except OSError:
                pass
            deadline = time.monotonic() + timeout
            while c.isalive() and time.monotonic() < deadline:
                try:
                    c.read_nonblocking(65536, timeout=0.2)    # drain so QEMU can finish writing
                except pexpect.TIMEOUT:
                    pass
                except (pexpect.EOF, OSError):
                    break
        if c is not None:
            try:
                c.close(force=True)
            except Exception:
                pass
        if self._log is not None and not self._log.closed:
            if c is not None:
                self._log.write(f"\n# vhostni guest {self.name}: QEMU stopped ({self._exit_text()})\n")
            self._log.close()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._ready = False

    def __enter__(self) -> "Guest":
        if self._child is None:
            self.boot()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Guest {self.name} pid={self.pid} {'ready' if self._ready else 'not ready'}>"

    # -- live migration --

    def qmp(self, command: str, timeout: float = 10.0, **arguments) -> object:
        """Run one QMP command on this guest's QEMU (needs ``qmp=True``); returns its "return"."""
        if not self.qmp_path:
            raise GuestError(f"guest {self.name}: started without qmp=True")
        return qmp_command(self.qmp_path, command, arguments or None, timeout)

    def migrate(self, timeout: float = 300.0, max_bandwidth: int = 1 << 30,
                downtime_ms: int = 500) -> dict:
        """Live-migrate this guest to a new QEMU on this host: the same command line plus
        ``-incoming unix:...`` (so the same vhost-user sockets: the destination joins the
        NI, see the README's "Live migration"), ``migrate`` over QMP, then the source quits.
        The console, ``run()`` and ``qmp()`` follow the guest.  Returns the final
        ``query-migrate`` (status "completed", total-time, downtime, ram).  GuestError if
        the migration fails (the source keeps running then)."""
        if not self._ready or self._child is None:
            raise GuestError(f"guest {self.name} is not booted")
        n = next(self._seq)
        src_qmp, src_child = self.qmp_path, self._child
        mig = os.path.join(self._workdir, f"mig{n}.sock")
        self.qmp_path = dst_qmp = os.path.join(self._workdir, f"qmp{n}.sock")
        argv = self.argv() + ["-incoming", f"unix:{mig}"]
        self.qmp_path = src_qmp
        self._log.write(f"\n# vhostni guest {self.name}: migrating to {shlex.join(argv)}\n")
        dst = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                            timeout=None, echo=False, dimensions=(50, 250))
        dst.logfile_read = self._log
        dst.delaybeforesend = None
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(mig) and time.monotonic() < deadline:
                if not dst.isalive():
                    raise GuestError(f"guest {self.name}: the destination QEMU exited; log: {self.log_path}")
                self._drain(dst)
            self.qmp("migrate-set-parameters", **{"max-bandwidth": max_bandwidth,
                                                   "downtime-limit": downtime_ms})
            self.qmp("migrate", uri=f"unix:{mig}")
            deadline = time.monotonic() + timeout
            while True:
                info = self.qmp("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    if status not in ("failed", "cancelled"):
                        self.qmp("migrate_cancel")
                    raise GuestError(f"guest {self.name}: migration {status or 'timed out'}: "
                                     f"{info.get('error-desc', '') if isinstance(info, dict) else info}")
                self._drain(dst)
                self._drain(src_child)
        except BaseException:
            dst.close(force=True)
            raise
        # the guest runs on the destination (it starts by itself after -incoming): switch over
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if qmp_command(dst_qmp, "query-status").get("status") == "running":
                    break
            except (OSError, GuestError):
                pass
            self._drain(dst)
        try:
            qmp_command(src_qmp, "quit")
        except (OSError, GuestError):
            pass
        src_child.expect(pexpect.EOF, timeout=30)
        src_child.close(force=True)
        self._child, self.qmp_path = dst, dst_qmp
        return info

    @staticmethod
    def _drain(child: pexpect.spawn) -> None:
        """Read what a QEMU printed (into the console log) so it never blocks on its pty."""
        try:
            child.read_nonblocking(65536, timeout=0.1)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError):
            pass

    # -- commands --

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]:
        """Run shell ``cmd`` in the guest; return (output, exit status).  Output has '\\n' line ends.

        On timeout the command is interrupted (Ctrl-C) and GuestTimeout is raised with the output so far.
        """
        with self._lock:
            return self._run(cmd, timeout)

    def _run(self, cmd: str, timeout: float) -> tuple[str, int]:
        if self._broken:
            raise GuestError(f"guest {self.name}: console unusable ({self._broken}); log: {self.log_path}")
        if not self._ready:
            raise GuestError(f"guest {self.name} is not booted")
        c = self._child
        assert c is not None
        n = next(self._seq)
        tag = f"{self._token}_{n}"
        quoted = "'" + cmd.replace("'", "'\\''") + "'"
        # The markers are split by quotes so that, should echo ever come back on, the echoed line cannot match.
        # `command eval`: a syntax error in CMD does not end the (non-interactive) shell.
        line = f"echo '__VNI_B''_{tag}__'; command eval {quoted} </dev/null\necho \"__VNI_E\"\"_{tag}__:$?:\""
        if max(len(x) for x in line.split("\n")) > _MAX_LINE:
            raise ValueError(f"command line longer than {_MAX_LINE} bytes; split it or use put_file()")
        deadline = time.monotonic() + timeout
        if self._log and not self._log.closed:
            self._log.write(f"\n### run[{n}] (timeout {timeout:g} s): {cmd}\n")
        c.sendline(line)
        try:
            c.expect(f"__VNI_B_{tag}__\r*\n", timeout=timeout)
            c.expect(rf"__VNI_E_{tag}__:(\d+):", timeout=max(0.1, deadline - time.monotonic()),
                     searchwindowsize=None)
        except pexpect.TIMEOUT:
            partial = _crlf(c.before or "")
            self._interrupt(tag)
            raise GuestTimeout(f"guest {self.name}: `{cmd}` did not finish within {timeout:g} s "
                               f"(interrupted); console log: {self.log_path}\n--- output so far ---\n"
                               f"{partial[-2000:]}", partial) from None
        except pexpect.EOF:
            self._broken = f"QEMU exited ({self._exit_text()})"
            raise GuestError(f"guest {self.name}: QEMU exited while running `{cmd}` ({self._exit_text()}); "
                             f"console log: {self.log_path}\n--- last lines ---\n{self.console_tail(25)}") from None
        output = _crlf(c.before)
        return output, int(c.match.group(1))

    def _interrupt(self, tag: str) -> None:
        c = self._child
        assert c is not None
        c.send("\x03")
        time.sleep(0.2)
        c.sendline(f"echo '__VNI_I''_{tag}__'")
        try:
            c.expect(f"__VNI_I_{tag}__\r*\n", timeout=15)
        except (pexpect.TIMEOUT, pexpect.EOF):
            self._broken = "a command timed out and Ctrl-C did not bring the shell back"

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        """run() that raises GuestCommandError unless the exit status is 0; returns the output."""
        out, status = self.run(cmd, timeout)
        if status != 0:
            raise GuestCommandError(self.name, cmd, status, out)
        return out

    def put_file(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 120.0) -> None:
        """Write ``data`` to ``path`` in the guest (base64 over the console: slow, fine for small files)."""
        import base64

        tmp = f"/tmp/.vni-put-{next(self._seq)}"
        b64 = base64.b64encode(data).decode()
        self.check(f": > {shlex.quote(tmp)}", timeout)
        for i in range(0, len(b64), 3000):
            self.check(f"echo {b64[i:i + 3000]} >> {shlex.quote(tmp)}", timeout)
        self.check(f"base64 -d {shlex.quote(tmp)} > {shlex.quote(path)} && rm {shlex.quote(tmp)} && "
                   f"chmod {mode:o} {shlex.quote(path)}", timeout)


def qmp_command(path: str, command: str, arguments: dict | None = None, timeout: float = 10.0) -> object:
    """One QMP command over the unix socket at ``path`` (a connection of its own); returns
    its "return", raises GuestError with QEMU's error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        f = s.makefile("rwb")

        def call(cmd: str, args: dict | None) -> object:
            msg = {"execute": cmd}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise GuestError(f"QMP {path}: connection closed during {cmd}")
                reply = json.loads(line)
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise GuestError(f"QMP {cmd}: {reply['error'].get('desc', reply['error'])}")
                # events: skipped

        json.loads(f.readline() or b"{}")      # greeting
        call("qmp_capabilities", None)
        return call(command, arguments)


def boot_guests(guests: Sequence[Guest], timeout: float | None = None) -> list[Guest]:
    """Boot several guests at once (they boot in parallel; this returns when all are ready).

    If any fails, all are closed and the first GuestBootError is raised, mentioning the others' failures."""
    guests = list(guests)
    try:
        for g in guests:
            g.start()
    except BaseException:
        for g in guests:
            g.close()
        raise
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, len(guests))) as ex:
        futures = [ex.submit(g.wait_ready, timeout) for g in guests]
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)
    if errors:
        for g in guests:
            g.close()
        if len(errors) > 1:
            raise GuestBootError("\n\n".join(str(e) for e in errors)) from errors[0]
        raise errors[0]
    return guests
