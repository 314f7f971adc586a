"""The NI kernel: scanners, their rights, held frames and alerts.

The fast path (C) holds or copies the frames that subscriptions match and hands them over
through the punt queue.  Here each one goes to the scanners whose subscriptions matched
it, numbered per scanner; a held frame leaves the NI iff every scanner with contain rights
on it said pass.  Scanners are untrusted processes (see sandbox.py): anything a scanner
sends is validated here, anything outside its rights is refused and alerted, and a scanner
that crashes, hangs or floods is killed and restarted with back-off while the frames it
owed decisions on get the policy's default decision.

Everything here runs on the daemon's one thread, between calls into the C loop.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import sandbox
from .policy import Match, Policy, PolicyError, ScannerSpec, parse_match
from .scanner import seccomp, wire

log = logging.getLogger("vhostni.kernel")

RESTART_MIN = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0        # a scanner up this long has its back-off reset
LOCKDOWN_GRACE = 10.0      # seconds a scanner has to lock down before it is killed
STDERR_LINES_PER_S = 20


class AlertLog:
    """Alerts are never lost: appended to a JSON-lines file and fsynced before anyone else
    hears of them; each carries a sequence number that survives restarts.

    With ``max_bytes`` the log rotates by size: PATH becomes PATH.1 (PATH.1 becomes PATH.2
    ...), ``keep`` rotated files are kept; :meth:`files` lists them oldest first."""

    def __init__(self, path: Optional[str], max_bytes: int = 0, keep: int = 5):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.seq = 0
        self.listeners: list[Callable[[dict], None]] = []
        self.recent: list[dict] = []
        self._f = None
        self._size = 0
        if path:
            for p in reversed(self.files()):
                self.seq = self._last_seq(p)
                if self.seq:
                    break

    def files(self) -> list[str]:
        """The log's files that exist, oldest first (rotated ones, then the current)."""
        if not self.path:
            return []
        names = [f"{self.path}.{i}" for i in range(max(self.keep, 0), 0, -1)] + [self.path]
        return [p for p in names if os.path.exists(p)]

    def _rotate(self) -> None:
        self._f.close()
        self._f = None
        if self.keep <= 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep - 1, 0, -1):
                if os.path.exists(f"{self.path}.{i}"):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        d = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(d)
        finally:
            os.close(d)

    @staticmethod
    def _last_seq(path: str) -> int:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        for line in reversed(lines):
            try:
                return int(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def append(self, ni: str, scanner: Optional[str], message: str, /, **fields) -> dict:
        self.seq += 1
        rec = {"seq": self.seq, "time": time.time(), "ni": ni, "scanner": scanner,
               "message": message}
        if fields:
            rec["fields"] = fields
        line = json.dumps(rec, default=str, separators=(",", ":"))
        nbytes = len(line.encode()) + 1
        for _ in range(2):
            if self.path and self._f is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._f = open(self.path, "a", encoding="utf-8")
                self._size = self._f.tell()
            if self._f and self.max_bytes and self._size and self._size + nbytes > self.max_bytes:
                self._rotate()
                continue
            break
        if self._f:
            self._size += nbytes
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        log.warning("ALERT #%d ni=%s scanner=%s: %s %s", self.seq, ni, scanner or "-", message,
                    json.dumps(fields, default=str) if fields else "")
        self.recent.append(rec)
        del self.recent[:-1000]
        for fn in self.listeners:
            fn(rec)
        return rec

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


class _Bucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Sub:
    match: Match
    contain: bool
    scanner: str


@dataclass
class Held:
    needed: set
    deadline: float


@dataclass
class ScannerCounters:
    frames: int = 0
    decisions: int = 0
    timeouts: int = 0
    restarts: int = 0
    refused: int = 0
    alerts: int = 0
    alerts_suppressed: int = 0
    send_failures: int = 0


class ScannerProc:
    """One scanner of one NI: its process, socket, numbering and what it owes."""

    def __init__(self, nk: "NIKernel", spec: ScannerSpec):
        self.nk = nk
        self.spec = spec
        self.name = spec.name
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.err_fd: Optional[int] = None
        self.state = "stopped"
        self.next_number = 1
        self.pending: dict[int, int] = {}       # frame number -> held id
        self.counters = ScannerCounters()
        self.started_at = 0.0
        self.backoff = RESTART_MIN
        self.next_start = 0.0
        self.locked = False
        self.consecutive_timeouts = 0
        self.synced = 0                         # the last sync id the scanner answered
        self.sent = 0                           # messages sent to it (frames, stream data, replies)
        self.last_error = ""
        self.stage_root: Optional[str] = None
        self.uid: Optional[int] = None
        self._msg_window = (0.0, 0)
        self._alerts = _Bucket(spec.alerts_per_second, max(2.0, 2 * spec.alerts_per_second))
        self._err_buf = b""
        self._err_bucket = _Bucket(STDERR_LINES_PER_S, 2 * STDERR_LINES_PER_S)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def info(self) -> dict:
        return {"name": self.name, "state": self.state, "pid": self.proc.pid if self.proc else None,
                "uid": self.uid,
                "locked_down": self.locked, "pending_decisions": len(self.pending),
                "last_error": self.last_error,
                "rights": [{"contain": r.contain, "match": repr(r.match)} for r in self.spec.rights],
                **self.counters.__dict__}

    # ---- lifecycle
    def start(self) -> None:
        k = self.nk.kernel
        if self.stage_root is None:
            self.stage_root = sandbox.new_stage_root(self.name)
        argv, pypath = sandbox.stage(self.spec.argv, self.stage_root)
        try:
            self.uid = k.uids.take()
        except sandbox.SandboxError as exc:
            self.last_error = str(exc)
            self._schedule_restart()
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        child.set_inheritable(True)
        rerr, werr = os.pipe2(os.O_CLOEXEC)
        env = {"VHOSTNI_SCANNER_FD": str(child.fileno()), "PYTHONPATH": pypath,
               "PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=werr, stderr=werr, env=env, cwd="/",
                pass_fds=[child.fileno()], close_fds=True,
                preexec_fn=sandbox.preexec(self.spec.memory_mb, self.spec.cpu_seconds,
                                           self.spec.open_files, self.uid))
        except (OSError, subprocess.SubprocessError) as exc:
            k.uids.give(self.uid)
            self.uid = None
            parent.close()
            child.close()
            os.close(rerr)
            os.close(werr)
            self.last_error = f"cannot start: {exc}"
            self._schedule_restart()
            k.alerts.append(self.nk.name, self.name, f"scanner failed to start: {exc}")
            return
        child.close()
        os.close(werr)
        parent.setblocking(False)
        self.sock = parent
        self.err_fd = rerr
        os.set_blocking(rerr, False)
        self.state = "running"
        self.started_at = time.monotonic()
        self.next_number = 1
        self.locked = False
        self.consecutive_timeouts = 0
        k.register(parent.fileno(), self.on_readable)
        k.register(rerr, self.on_stderr)
        self._send(wire.encode_control({
            "op": "hello", "version": wire.VERSION, "scanner": self.name, "ni": self.nk.name,
            "config": self.spec.config, "injections": [n for n, _ in self.spec.injections]}))
        log.info("NI %s: scanner %s started (pid %d): %s", self.nk.name, self.name,
                 self.proc.pid, " ".join(argv))
        k.event("SCANNER_STARTED", ni=self.nk.name, scanner=self.name, pid=self.proc.pid)

    def kill(self, reason: str, restart: bool = True) -> None:
        """Ends the process and settles everything it owed."""
        if self.state != "running":
            return
        self.last_error = reason
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._reap(reason, restart)

    def _reap(self, reason: str, restart: bool) -> None:
        k = self.nk.kernel
        if self.sock:
            k.unregister(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.err_fd is not None:
            self._drain_stderr(final=True)
            k.unregister(self.err_fd)
            os.close(self.err_fd)
            self.err_fd = None
        self.state = "stopped"
        if self.uid is not None:
            k.uids.give(self.uid)
            self.uid = None
        owed = set(self.pending.values())
        self.pending.clear()
        for held_id in owed:
            self.nk.settle_default(held_id, self.name)
        if restart:
            self._schedule_restart()
            k.alerts.append(self.nk.name, self.name, f"scanner stopped: {reason}; restarting in "
                            f"{self.backoff:.1f} s", decisions_defaulted=len(owed))
        k.event("SCANNER_DIED", ni=self.nk.name, scanner=self.name, reason=reason)

    def _schedule_restart(self) -> None:
        now = time.monotonic()
        if self.started_at and now - self.started_at > STABLE_AFTER:
            self.backoff = RESTART_MIN
        self.next_start = now + self.backoff
        self.state = "restarting"
        self.backoff = min(RESTART_MAX, self.backoff * 2)

    def stop(self) -> None:
        self.kill("stopped by the administrator", restart=False)
        self.state = "stopped"
        if self.stage_root:
            sandbox.remove_stage_root(self.stage_root)
            self.stage_root = None

    def poll(self, now: float) -> None:
        """Housekeeping: notice death, enforce lockdown, restart when due."""
        if self.state == "running":
            if self.proc.poll() is not None:
                code = self.proc.returncode
                what = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                self.last_error = what
                self._reap(what, restart=True)
                return
            if not self.locked and now - self.started_at > LOCKDOWN_GRACE:
                self.locked = self._check_lockdown()
                if not self.locked:
                    self.kill("did not lock down (seccomp) within "
                              f"{LOCKDOWN_GRACE:.0f} s of starting")
        elif self.state == "restarting" and now >= self.next_start:
            self.counters.restarts += 1
            self.start()

    def _check_lockdown(self) -> bool:
        try:
            return seccomp.status(self.proc.pid) == 2
        except OSError:
            return False

    # ---- I/O
    def _send(self, data: bytes) -> bool:
        if not self.sock:
            return False
        try:
            self.sock.send(data)
            self.sent += 1
            return True
        except (BlockingIOError, InterruptedError):
            self.counters.send_failures += 1
            return False
        except OSError:
            self.counters.send_failures += 1
            return False

    def on_stderr(self) -> None:
        self._drain_stderr()

    def _drain_stderr(self, final: bool = False) -> None:
        try:
            while True:
                chunk = os.read(self.err_fd, 65536)
                if not chunk:
                    break
                self._err_buf += chunk
                if len(self._err_buf) > 65536:
                    self._err_buf = self._err_buf[-65536:]
        except (BlockingIOError, OSError):
            pass
        *lines, self._err_buf = self._err_buf.split(b"\n")
        if final and self._err_buf:
            lines.append(self._err_buf)
            self._err_buf = b""
        for line in lines:
            if self._err_bucket.take():
                log.info("scanner %s/%s: %s", self.nk.name, self.name,
                         line.decode("utf-8", "replace")[:500])

    def on_readable(self) -> None:
        for _ in range(256):       # bounded per wakeup so one scanner cannot starve the rest
            if not self.sock:
                return
            try:
                data = self.sock.recv(wire.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.kill(f"socket error: {exc}")
                return
            if not data:
                self.poll(time.monotonic())
                if self.state == "running":
                    self.kill("closed its socket")
                return
            if not self._count_message():
                self.kill(f"flooding: more than {self.spec.messages_per_second} messages/s")
                return
            try:
                msg = wire.decode(data)
            except wire.WireError as exc:
                self.nk.kernel.alerts.append(self.nk.name, self.name,
                                             f"scanner broke the protocol: {exc}")
                self.kill(f"protocol violation: {exc}")
                return
            self._handle(msg)

    def _count_message(self) -> bool:
        now = time.monotonic()
        start, n = self._msg_window
        if now - start >= 1.0:
            self._msg_window = (now, 1)
            return True
        self._msg_window = (start, n + 1)
        return n + 1 <= self.spec.messages_per_second

    # ---- requests
    def _handle(self, msg) -> None:
        if isinstance(msg, wire.Decision):
            self.counters.decisions += 1
            held_id = self.pending.pop(msg.number, None)
            if held_id is None:
                return   # late (timed out), duplicate, or for a read-only frame: nothing to do
            self.consecutive_timeouts = 0     # only a decision that was owed shows it alive
            self.nk.decide(held_id, self.name, msg.verdict == wire.PASS)
            return
        if isinstance(msg, wire.Frame):
            self.kill("sent a frame: scanners cannot send frames, only pre-registered injections")
            return
        body = msg.body
        op = body.get("op")
        if op == "subscribe":
            self._subscribe(body)
        elif op == "inject":
            self._inject(body)
        elif op == "alert":
            self._alert(body)
        elif op == "synced":
            sid = body.get("id")
            if isinstance(sid, int) and not isinstance(sid, bool):
                self.synced = max(self.synced, sid)
        else:
            self._reply(body, f"unknown op {op!r}")

    def _reply(self, body: dict, error: Optional[str] = None) -> None:
        rid = body.get("id")
        if error:
            self.counters.refused += 1
        self._send(wire.encode_control({"op": "reply", "id": rid if isinstance(rid, int) else None,
                                        "ok": error is None, **({"error": error} if error else {})}))

    def _subscribe(self, body: dict) -> None:
        if not self.locked:
            self.locked = self._check_lockdown()
            if not self.locked:
                self._reply(body, "lock down first: the SDK's Scanner.connect() installs the "
                                  "seccomp allow-list")
                return
        contain = body.get("contain", False)
        if not isinstance(contain, bool):
            self._reply(body, "contain must be true or false")
            return
        try:
            match = parse_match("match", body.get("match"))
        except PolicyError as exc:
            self._reply(body, str(exc))
            return
        ok = any(match.within(r.match) and (r.contain or not contain) for r in self.spec.rights)
        if not ok:
            self._reply(body, "outside this scanner's rights")
            self._alert_about(
                "scanner asked for a subscription outside its rights",
                match=body.get("match"), contain=contain)
            return
        err = self.nk.add_sub(Sub(match, contain, self.name))
        self._reply(body, err)

    def _inject(self, body: dict) -> None:
        idx = body.get("index")
        direction = body.get("direction")
        direction = wire.DIRECTIONS.get(direction) if isinstance(direction, str) else None
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(self.spec.injections):
            self._reply(body, f"no pre-registered injection {idx!r}")
            self._alert_about("scanner asked for an injection it does not have", index=idx)
            return
        if direction is None:
            self._reply(body, "direction must be to_guest or from_guest")
            return
        name, frame = self.spec.injections[idx]
        self.nk.port.inject(direction, frame)
        self._reply(body)

    def _alert_about(self, message: str, **fields) -> None:
        """An alert about something this scanner asked for: it can ask as often as it likes,
        so these share its alert rate limit."""
        if not self._alerts.take():
            self.counters.alerts_suppressed += 1
            return
        self.nk.kernel.alerts.append(self.nk.name, self.name, message, **fields)

    def _alert(self, body: dict) -> None:
        message = body.get("message")
        fields = body.get("fields") or {}
        if not isinstance(message, str) or not isinstance(fields, dict):
            self.counters.refused += 1
            return
        if not self._alerts.take():
            self.counters.alerts_suppressed += 1
            return
        self.counters.alerts += 1
        self.nk.kernel.alerts.append(self.nk.name, self.name, message[:4096], **fields)

    def sync(self, sync_id: int) -> bool:
        """Asks the scanner to answer ``synced`` with ``sync_id`` once it has handled every
        frame sent so far (see :mod:`vhostni.scanner.wire`); False if it cannot be asked."""
        return self._send(wire.encode_control({"op": "sync", "id": sync_id}))

    def send_frame(self, held_id: int, direction: int, time_ns: int, data: bytes) -> Optional[int]:
        number = self.next_number
        if not self._send(wire.encode_frame(number, direction, held_id != 0, time_ns, data)):
            return None
        self.next_number += 1
        self.counters.frames += 1
        if held_id:
            self.pending[number] = held_id
        return number


class NIKernel:
    """The kernel state of one NI: its policy, scanners, subscriptions and held frames."""

    def __init__(self, kernel: "Kernel", name: str, port, policy: Policy):
        self.kernel = kernel
        self.name = name
        self.port = port
        self.policy = policy
        self.subs: list[Sub] = []
        self.held: dict[int, Held] = {}
        self.scanners: dict[str, ScannerProc] = {}
        self.decided_by_timeout = 0
        self.apply()
        for spec in policy.scanners:
            self.scanners[spec.name] = ScannerProc(self, spec)

    def start(self) -> None:
        for sp in self.scanners.values():
            sp.start()

    def apply(self) -> None:
        self.port.set_policy(self.policy.compile([(s.match, s.contain) for s in self.subs]))

    def add_sub(self, sub: Sub) -> Optional[str]:
        for s in self.subs:
            if s == sub:
                return None
        if len(self.subs) >= 64:
            return "this NI has no room for more subscriptions (64)"
        self.subs.append(sub)
        self.apply()
        return None

    def replace_policy(self, policy: Policy) -> None:
        """A new policy for this NI, without dropping traffic: rules change at once,
        scanners that stay keep running, subscriptions outside new rights are revoked."""
        # Frames the fast path already matched name their subscriptions by index into the
        # current list: hand them out before revoking shifts those indices.
        self.kernel.on_punts()
        old = self.scanners
        self.policy = policy
        new_specs = {s.name: s for s in policy.scanners}
        for name, sp in list(old.items()):
            spec = new_specs.get(name)
            if spec is None or spec.argv != sp.spec.argv:
                sp.stop()
                del old[name]
        for name, spec in new_specs.items():
            if name in old:
                old[name].spec = spec
            else:
                old[name] = ScannerProc(self, spec)
                old[name].start()
        self.subs = [s for s in self.subs if s.scanner in old and any(
            s.match.within(r.match) and (r.contain or not s.contain) for r in old[s.scanner].spec.rights)]
        self.apply()

    # ---- held frames
    def punted(self, p) -> None:
        targets: dict[str, bool] = {}
        for i, sub in enumerate(self.subs):
            if p.subs >> i & 1:
                targets[sub.scanner] = targets.get(sub.scanner, False) or bool(p.contain >> i & 1)
        data = bytes(self.kernel.ffi.buffer(p.data, p.len))
        held_id = p.id
        needed = set()
        cut = False
        for name, contain in targets.items():
            sp = self.scanners.get(name)
            hid = held_id if contain else 0
            if sp is None or not sp.running or sp.send_frame(hid, p.dir, p.time_ns, data) is None:
                if contain and not self.policy.default_pass:
                    cut = True
                continue
            if contain:
                needed.add(name)
        if not held_id:
            return
        if cut:
            self.kernel.release(held_id, False)
        elif not needed:
            self.kernel.release(held_id, True)
        else:
            self.held[held_id] = Held(needed, time.monotonic() + self.policy.hold_timeout)

    def decide(self, held_id: int, scanner: str, passed: bool) -> None:
        h = self.held.get(held_id)
        if h is None or scanner not in h.needed:
            return
        if not passed:
            del self.held[held_id]
            self.kernel.release(held_id, False)
            return
        h.needed.discard(scanner)
        if not h.needed:
            del self.held[held_id]
            self.kernel.release(held_id, True)

    def settle_default(self, held_id: int, scanner: str) -> None:
        """A scanner that owed a decision is gone: the policy's default stands in for it."""
        self.decide(held_id, scanner, self.policy.default_pass)

    def expire(self, now: float) -> float:
        """Applies the default to held frames past their deadline; returns the next deadline."""
        nxt = float("inf")
        late = [(i, h) for i, h in self.held.items() if h.deadline <= now]
        for held_id, h in late:
            del self.held[held_id]
            self.decided_by_timeout += 1
            self.kernel.release(held_id, self.policy.default_pass)
            for name in h.needed:
                sp = self.scanners.get(name)
                if sp is None:
                    continue
                sp.counters.timeouts += 1
                sp.consecutive_timeouts += 1
                for num in [n for n, hid in sp.pending.items() if hid == held_id]:
                    del sp.pending[num]
                if sp.running and sp.consecutive_timeouts >= sp.spec.max_timeouts:
                    self.kernel.alerts.append(
                        self.name, name, "scanner hung: missed decisions, default applied",
                        missed=sp.consecutive_timeouts,
                        default="pass" if self.policy.default_pass else "cut")
                    sp.kill(f"hung: {sp.consecutive_timeouts} decisions missed in a row")
        for h in self.held.values():
            nxt = min(nxt, h.deadline)
        return nxt

    def shutdown(self) -> None:
        for sp in self.scanners.values():
            sp.stop()
        for held_id in list(self.held):
            self.kernel.release(held_id, self.policy.default_pass)
        self.held.clear()
        self.port.clear_policy()

    def info(self) -> dict:
        return {"policy": self.policy.source, "subscriptions": len(self.subs),
                "held": len(self.held), "decided_by_timeout": self.decided_by_timeout,
                "scanners": {n: sp.info() for n, sp in self.scanners.items()}}


class Kernel:
    """All NI kernels of a daemon; glued to its epoll set by register/unregister."""

    def __init__(self, switch, register: Callable[[int, Callable[[], None]], None],
                 unregister: Callable[[int], None], alert_log: Optional[str]):
        from ._fastpath import ffi, lib
        self.ffi, self.lib = ffi, lib
        self.switch = switch
        self.register = register
        self.unregister = unregister
        self.alerts = AlertLog(alert_log)
        self.uids = sandbox.UidPool()
        self.nis: dict[int, NIKernel] = {}          # by port index
        self.events: list[Callable[[str, dict], None]] = []
        self._punt = ffi.new("struct vn_punt *")
        self.next_deadline = float("inf")

    def event(self, name: str, **data) -> None:
        for fn in self.events:
            fn(name, data)

    def attach(self, name: str, port, policy: Policy) -> NIKernel:
        nk = NIKernel(self, name, port, policy)
        self.nis[port.index] = nk
        nk.start()
        return nk

    def detach(self, port_index: int) -> None:
        nk = self.nis.pop(port_index, None)
        if nk:
            nk.shutdown()

    def release(self, held_id: int, passed: bool) -> None:
        self.lib.vn_held_release(self.switch._sw, held_id, 1 if passed else 0)

    def on_punts(self) -> None:
        p = self._punt
        sw = self.switch._sw
        for _ in range(4096):
            if not self.lib.vn_punt_next(sw, p):
                break
            nk = self.nis.get(p.port)
            if nk is None:
                if p.id:
                    self.release(p.id, False)
                continue
            nk.punted(p)
        self._update_deadline()

    def _update_deadline(self) -> None:
        self.next_deadline = min((min((h.deadline for h in nk.held.values()), default=float("inf"))
                                  for nk in self.nis.values()), default=float("inf"))

    def housekeeping(self) -> None:
        now = time.monotonic()
        nxt = float("inf")
        for nk in list(self.nis.values()):
            nxt = min(nxt, nk.expire(now))
            for sp in list(nk.scanners.values()):
                sp.poll(now)
        self.next_deadline = nxt

    def close(self) -> None:
        for idx in list(self.nis):
            self.detach(idx)
        self.alerts.close()
