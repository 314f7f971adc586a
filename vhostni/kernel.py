"""The NI kernel: scanners, their rights, held frames, streams and alerts.

The fast path (C) holds or copies the frames that subscriptions match and hands them over
through the punt queue.  Here each one goes to the scanners whose subscriptions matched
it, numbered per scanner; a held frame leaves the NI iff every scanner with contain rights
on it said pass.  Scanners are untrusted processes (see sandbox.py): anything a scanner
sends is validated here, anything outside its rights is refused and alerted, and a scanner
that crashes, hangs or floods is killed and restarted with back-off while the frames it
owed decisions on get the policy's default decision.

Stream subscriptions (reconstructed TCP streams, csrc/tcp.c) work the same way on byte
ranges: the fast path reports streams that opened, grew or closed; each new stream is
announced to the scanners whose stream subscriptions matched it, its in-order bytes are
read from the held frames (zero-copy in C, one copy into the message here) and sent to
them, and a held direction moves on as far as every contain scanner passed it.  The hold
timeout and default decision apply to each chunk of bytes as to a frame: default pass lets
the chunk go, default cut kills the connection.  A contain scanner may also edit what it
holds: ``cut`` drops a byte range (the receiver never gets it; the fast path rewrites the
sequence numbers) and counts as that scanner's pass of those bytes, and ``inject`` inserts
bytes the policy pre-registered for it (``[[scanner.inject]] stream``), both only on bytes
it has not passed yet.  ``more`` has the fast path acknowledge held bytes on the
receiver's behalf, so a decision can wait for more than the receiver's window.

Everything here runs on the daemon's one thread, between calls into the C loop.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import sandbox
from .alertlog import AlertLog
from .scanstate import CheckpointStore
from .policy import (Match, Policy, PolicyError, ScannerSpec, StreamMatch, check_wire,
                     parse_match, parse_stream_match)
from .logtext import printable
from .scanner import wire

log = logging.getLogger("vhostni.kernel")

RESTART_MIN = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0        # a scanner up this long has its back-off reset
LOCKDOWN_GRACE = 10.0      # seconds after its start by which a scanner must show its confinement
# Readiness: right after starting a scanner the kernel sends it a sync with this id; the
# SDK answers it when the scanner first waits for an event (Scanner.ready() earlier), i.e.
# once it has made its subscriptions.  Until then what its contain rights cover is held
# back (see NIKernel.apply); a scanner that never answers is taken as ready after
# READY_GRACE seconds (and the administrator is told).  Negative: never a replay sync id.
READY_SYNC = -1
READY_GRACE = LOCKDOWN_GRACE
MIDSTREAM_ALERT_EVERY = 10.0   # at most one alert per NI this often about mid-stream pick-ups
STDERR_LINES_PER_S = 20
OUTQ_MAX = 64 << 20        # stream bytes queued for one scanner that does not keep up
STREAM_CHUNK = 65536       # bytes of one stream-data message at most
CLOSE_REASONS = {1: "fin", 2: "rst", 3: "killed", 4: "idle", 5: "bypass", 6: "gone"}
DIR_NAMES = {1: "from_guest", 2: "to_guest"}


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
class StreamSub:
    match: StreamMatch
    contain: bool
    scanner: str


@dataclass
class Held:
    needed: set
    deadline: float


class KStream:
    """The kernel's side of one reconstructed TCP stream: who reads and holds which
    direction, how far each holder passed, what was read from the fast path and what is
    owed by when."""

    def __init__(self, sid: int, info: dict):
        self.id = sid
        self.info = info
        self.readers: dict[str, int] = {}          # scanner -> direction bits it reads
        self.holders: dict[str, int] = {}          # scanner -> direction bits it holds
        self.passed: dict[tuple[str, int], int] = {}
        self.read_off = {1: 0, 2: 0}               # consumed from the fast path
        self.released = {1: 0, 2: 0}               # passed on to the fast path
        self.deadlines = {1: collections.deque(), 2: collections.deque()}
        self.hold_dirs = 0
        self.ended: set[int] = set()
        self.more: dict[str, int] = {}
        self.closing: Optional[str] = None          # a reason of ours, overriding the fast path's

    def holders_of(self, d: int) -> list[str]:
        return [n for n, dirs in self.holders.items() if dirs & d]

    def readers_of(self, d: int) -> list[str]:
        return [n for n, dirs in self.readers.items() if dirs & d]


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
    streams: int = 0
    stream_bytes: int = 0
    stream_passes: int = 0
    stream_kills: int = 0
    stream_mores: int = 0
    stream_cuts: int = 0
    stream_cut_bytes: int = 0
    stream_injects: int = 0
    stream_inject_bytes: int = 0
    checkpoints: int = 0
    checkpoint_bytes: int = 0          # of the latest one


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
        self.pid: Optional[int] = None          # the scanner's host pid (self.proc is bwrap)
        self.init_pid: Optional[int] = None     # bwrap's init, PID 1 of the scanner's namespace
        self.launch_filter: Optional[bytes] = None   # the seccomp program bwrap loaded
        self._msg_window = (0.0, 0)
        self._alerts = _Bucket(spec.alerts_per_second, max(2.0, 2 * spec.alerts_per_second))
        self._err_buf = b""
        self._err_bucket = _Bucket(STDERR_LINES_PER_S, 2 * STDERR_LINES_PER_S)
        self.outq: collections.deque = collections.deque()   # stream messages waiting for room
        self.outq_bytes = 0
        self._out_armed = False
        self._restore: Optional[tuple[int, bytes]] = None   # the checkpoint the hello announced
        self.ready_for = -1.0                   # started_at of the run that said it is ready
        self.ready_asked = -1.0                 # started_at of the run the readiness sync went to

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def ready(self) -> bool:
        """Running, locked down and done subscribing (it answered the readiness sync, or
        READY_GRACE passed): its subscriptions alone say what it is handed from now on."""
        return self.state == "running" and self.ready_for == self.started_at

    def ask_ready(self) -> None:
        """Sends this run the readiness sync (once per run)."""
        if self.state == "running" and self.ready_asked != self.started_at:
            self.ready_asked = self.started_at
            self.sync(READY_SYNC)

    def _became_ready(self, why: str) -> None:
        if self.ready or self.state != "running":
            return
        if not self.locked:
            self.locked = self._check_confinement() is None
            if not self.locked:
                return             # not confined: it cannot have subscribed either
        self.ready_for = self.started_at
        log.info("NI %s: scanner %s ready (%s)", self.nk.name, self.name, why)
        self.nk.scanner_ready(self)

    def info(self) -> dict:
        return {"name": self.name, "state": self.state, "pid": self.pid,
                "uid": self.uid,
                "locked_down": self.locked, "pending_decisions": len(self.pending),
                "last_error": self.last_error,
                "rights": [{"contain": r.contain, "match": repr(r.match)} for r in self.spec.rights]
                + [{"contain": r.contain, "stream": repr(r.match)} for r in self.spec.stream_rights],
                **self.counters.__dict__}

    # ---- lifecycle
    def start(self) -> None:
        """Launches the scanner confined (sandbox.command: bwrap with namespaces, a read-only
        view and the launcher's seccomp filter before its first instruction)."""
        k = self.nk.kernel
        if self.stage_root is None:
            self.stage_root = sandbox.new_stage_root(self.name)
        argv, _ = sandbox.stage(self.spec.argv, self.stage_root)
        try:
            self.uid = k.uids.take()
        except sandbox.SandboxError as exc:
            self.last_error = str(exc)
            self._schedule_restart()
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        child.set_inheritable(True)
        rerr, werr = os.pipe2(os.O_CLOEXEC)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        filt = self.launch_filter = sandbox.launch_filter()
        filt_r, filt_w = os.pipe2(os.O_CLOEXEC)
        os.write(filt_w, filt)           # a few hundred bytes: fits the pipe
        os.close(filt_w)
        env = {"VHOSTNI_SCANNER_FD": str(child.fileno()), "PYTHONPATH": sandbox.sdk_path_inside(),
               "PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
        try:
            cmd = sandbox.command(argv, self.stage_root, self.uid, filt_r, info_w,
                                  self.spec.sockets)
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=werr, stderr=werr, env=env, cwd="/",
                pass_fds=[child.fileno(), info_w, filt_r], close_fds=True,
                preexec_fn=sandbox.preexec(self.spec.memory_mb, self.spec.cpu_seconds,
                                           self.spec.open_files, self.uid))
        except (OSError, subprocess.SubprocessError, sandbox.SandboxError) as exc:
            k.uids.give(self.uid)
            self.uid = None
            for fd in (rerr, werr, info_r, info_w, filt_r):
                os.close(fd)
            parent.close()
            child.close()
            self.last_error = f"cannot start: {exc}"
            delay = self._schedule_restart()
            k.alerts.append(self.nk.name, self.name, f"scanner failed to start: {exc}; "
                            f"restarting in {delay:.2f} s")
            return
        child.close()
        for fd in (werr, info_w, filt_r):
            os.close(fd)
        self.init_pid = sandbox.read_child_pid(info_r)
        os.close(info_r)
        self.pid = sandbox.find_scanner_pid(self.init_pid) if self.init_pid else None
        parent.setblocking(False)
        self.sock = parent
        self.err_fd = rerr
        os.set_blocking(rerr, False)
        self.state = "running"
        self.started_at = time.monotonic()
        self.next_number = 1
        self.locked = False
        self.consecutive_timeouts = 0
        self.outq.clear()
        self.outq_bytes = 0
        self._out_armed = False
        k.register(parent.fileno(), self.on_io)
        k.register(rerr, self.on_stderr)
        if self.pid is None:     # ended at once, or bwrap failed (its stderr is logged)
            cause = self._exit_cause(wait=1.0)
            self.kill(f"ended as it started: {cause}" if cause else
                      "its launcher (bwrap) did not start it")
            return
        self._send(wire.encode_hello(
            self.name, self.nk.name, self.spec.config, [n for n, _ in self.spec.injections],
            [n for n, _ in self.spec.stream_injections], **self._checkpoint_hello()))
        self._send_checkpoint()
        log.info("NI %s: scanner %s started (pid %d, launcher %d): %s", self.nk.name, self.name,
                 self.pid, self.proc.pid, " ".join(argv))
        k.event("SCANNER_STARTED", ni=self.nk.name, scanner=self.name, pid=self.pid)

    def kill(self, reason: str, restart: bool = True) -> None:
        """Ends the process and settles everything it owed."""
        if self.state != "running":
            return
        self.last_error = reason
        if self.proc and self.proc.poll() is None:
            for target in (self.pid, -self.proc.pid):     # the scanner, then bwrap's group
                if target:
                    try:
                        os.kill(target, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
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
        self.pid = self.init_pid = None
        self.outq.clear()
        self.outq_bytes = 0
        self._out_armed = False
        if self.uid is not None:
            k.uids.give(self.uid)
            self.uid = None
        owed = set(self.pending.values())
        self.pending.clear()
        for held_id in owed:
            self.nk.settle_default(held_id, self.name)
        owed_streams = self.nk.stream_scanner_gone(self.name)
        if restart:
            delay = self._schedule_restart()
            k.alerts.append(self.nk.name, self.name, f"scanner stopped: {reason}; restarting in "
                            f"{delay:.2f} s", decisions_defaulted=len(owed),
                            streams_defaulted=owed_streams)
        k.event("SCANNER_DIED", ni=self.nk.name, scanner=self.name, reason=reason)

    def _schedule_restart(self) -> float:
        """Sets when to start again; returns that delay (the back-off doubles after it)."""
        now = time.monotonic()
        if self.started_at and now - self.started_at > STABLE_AFTER:
            self.backoff = RESTART_MIN
        delay = self.backoff
        self.next_start = now + delay
        self.state = "restarting"
        self.backoff = min(RESTART_MAX, self.backoff * 2)
        k = self.nk.kernel
        k.next_deadline = min(k.next_deadline, self.next_start)     # the loop wakes for it
        return delay

    def _exit_cause(self, wait: float = 0.0) -> Optional[str]:
        """How the scanner ended ("killed by signal N" / "exited with status N"), waiting up
        to ``wait`` s for its launcher; None while it runs.  bwrap exits with the scanner's
        status, or 128+N when signal N killed it."""
        try:
            code = self.proc.wait(timeout=wait) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None
        if code is None:
            return None
        if code < 0:                       # bwrap itself was killed
            sig = -code
        elif code > 128 and code - 128 < signal.NSIG:
            sig = code - 128
        else:
            return f"exited with status {code}"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})"

    def stop(self) -> None:
        self.kill("stopped by the administrator", restart=False)
        self.state = "stopped"
        if self.stage_root:
            sandbox.remove_stage_root(self.stage_root)
            self.stage_root = None

    def poll(self, now: float) -> None:
        """Housekeeping: notice death, check the confinement, restart when due."""
        if self.state == "running":
            what = self._exit_cause()
            if what is not None:
                self.last_error = what
                self._reap(what, restart=True)
                return
            if not self.locked and now - self.started_at > LOCKDOWN_GRACE:
                why = self._check_confinement()
                self.locked = why is None
                if not self.locked:
                    self.kill(f"not confined {LOCKDOWN_GRACE:.0f} s after its start: {why}")
        elif self.state == "restarting" and now >= self.next_start:
            self.counters.restarts += 1
            self.start()

    def _check_confinement(self) -> Optional[str]:
        """None if the scanner runs in the confinement its launch imposed, else why not
        (sandbox.check_confined: namespaces, seccomp filters and the launcher's one first,
        uid, parent)."""
        if self.pid is None or self.uid is None or self.proc is None:
            return "not running"
        return sandbox.check_confined(self.pid, self.uid, parent=self.init_pid,
                                      launcher=self.proc.pid, first=self.launch_filter)

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

    def send_stream(self, data: bytes, force: bool = False) -> bool:
        """Sends a stream message in order behind any already queued; False if this scanner
        is gone or ``OUTQ_MAX`` bytes already wait for it (unless ``force``: a close)."""
        if not self.sock:
            return False
        if not self.outq:
            try:
                self.sock.send(data)
                self.sent += 1
                return True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.counters.send_failures += 1
                return False
        if self.outq_bytes + len(data) > OUTQ_MAX and not force:
            self.counters.send_failures += 1
            return False
        self.outq.append(data)
        self.outq_bytes += len(data)
        self.sent += 1
        self._arm_output(True)
        return True

    def _arm_output(self, on: bool) -> None:
        """Waits for room in the socket (EPOLLOUT) only while stream messages are queued."""
        if on == self._out_armed or not self.sock:
            return
        k = self.nk.kernel
        fd = self.sock.fileno()
        k.unregister(fd)
        try:
            k.register(fd, self.on_io, select.EPOLLIN | (select.EPOLLOUT if on else 0))
        except TypeError:          # a register() without events: flushed by housekeeping
            k.register(fd, self.on_io)
        self._out_armed = on

    def flush(self) -> None:
        while self.outq and self.sock:
            try:
                self.sock.send(self.outq[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.outq.clear()
                self.outq_bytes = 0
                break
            self.outq_bytes -= len(self.outq.popleft())
        if not self.outq:
            self._arm_output(False)

    def on_io(self) -> None:
        if self.outq:
            self.flush()
        self.on_readable()

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
                         printable(line.decode("utf-8", "replace"), 500))

    def on_readable(self) -> None:
        for _ in range(256):       # bounded per wakeup so one scanner cannot starve the rest
            if not self.sock:
                return
            try:
                data = self.sock.recv(wire.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                data = b""         # it closed its end with messages of ours unread: an end
            except OSError as exc:
                self._lost(f"socket error: {exc}")
                return
            if not data:
                self._lost("closed its socket")
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

    def _lost(self, what: str) -> None:
        """The socket broke or closed: most often because the scanner died, so say how it
        did (its exit status or signal) rather than what the socket saw."""
        cause = self._exit_cause(wait=0.2)
        if cause is not None:
            self.last_error = cause
            self._reap(cause, restart=True)
        else:
            self.kill(what)

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
        if isinstance(msg, wire.StreamPass):
            self.counters.stream_passes += 1
            self.nk.stream_pass(self.name, msg.stream, msg.direction, msg.upto)
            return
        if isinstance(msg, wire.StreamData):
            self.kill("sent stream data: scanners cannot write into streams, only pass, cut "
                      "and inject pre-registered bytes")
            return
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
        if isinstance(msg, wire.Checkpoint):
            self._checkpoint(msg)
            return
        body = msg.body
        op = body.get("op")
        if op == "subscribe":
            self._subscribe(body)
        elif op == "inject" and "stream" in body:
            self._stream_inject(body)
        elif op == "inject":
            self._inject(body)
        elif op == "cut":
            self._stream_cut(body)
        elif op == "alert":
            self._alert(body)
        elif op == "synced":
            sid = body.get("id")
            if isinstance(sid, int) and not isinstance(sid, bool):
                self.synced = max(self.synced, sid)
                if sid == READY_SYNC:
                    self._became_ready("subscribed")
        elif op in ("kill", "more"):
            self._stream_request(op, body)
        else:
            self._reply(body, f"unknown op {op!r}")

    # ---- checkpoints (vhostni/scanstate.py): kept for this scanner, never parsed here
    def _checkpoint_hello(self) -> dict:
        """The hello's checkpoint fields: the limit, and the saved one's length (or None)."""
        limit = self.spec.checkpoint_max_bytes
        saved = self.nk.kernel.checkpoints.get(self.nk.name, self.name) if limit else None
        if saved and len(saved[1]) > limit:      # the policy's limit went down since
            self.nk.kernel.checkpoints.drop(self.nk.name, self.name)
            saved = None
        self._restore = saved
        return {"checkpoint_max": self.spec.checkpoint_max_bytes,
                "checkpoint": len(saved[1]) if saved else None}

    def _send_checkpoint(self) -> None:
        """Hands the saved checkpoint back, right behind the hello that announced it."""
        saved, self._restore = self._restore, None
        if saved and self._send(wire.encode_checkpoint(*saved)):
            self.nk.kernel.checkpoints.counters.restored += 1

    def _checkpoint(self, msg: wire.Checkpoint) -> None:
        limit = self.spec.checkpoint_max_bytes
        if len(msg.data) > limit:
            self.counters.refused += 1
            self._alert_about("scanner checkpoint refused: " + (
                f"{len(msg.data)} bytes exceed its limit of {limit} (checkpoint_max_bytes)"
                if limit else "checkpoints are off for this scanner (checkpoint_max_bytes = 0)"),
                size=len(msg.data), limit=limit)
            return
        self.counters.checkpoints += 1
        self.counters.checkpoint_bytes = len(msg.data)
        self.nk.kernel.checkpoints.put(self.nk.name, self.name, msg.kind, msg.data)

    def _reply(self, body: dict, error: Optional[str] = None) -> None:
        rid = body.get("id")
        if error:
            self.counters.refused += 1
        self._send(wire.encode_control({"op": "reply", "id": rid if isinstance(rid, int) else None,
                                        "ok": error is None, **({"error": error} if error else {})}))

    def _subscribe(self, body: dict) -> None:
        if not self.locked:
            why = self._check_confinement()
            self.locked = why is None
            if not self.locked:
                self._reply(body, f"not confined: {why}")
                self._alert_about("scanner is not in the confinement it was launched in",
                                  reason=why)
                return
        contain = body.get("contain", False)
        if not isinstance(contain, bool):
            self._reply(body, "contain must be true or false")
            return
        if "stream" in body:
            self._subscribe_stream(body, contain)
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

    def _subscribe_stream(self, body: dict, contain: bool) -> None:
        try:
            match = parse_stream_match("subscription", {k: body[k] for k in ("stream", "port", "direction")
                                                        if k in body})
        except PolicyError as exc:
            self._reply(body, str(exc))
            return
        ok = any(match.within(r.match) and (r.contain or not contain) for r in self.spec.stream_rights)
        if not ok:
            self._reply(body, "outside this scanner's rights")
            self._alert_about("scanner asked for a stream subscription outside its rights",
                              port=body.get("port"), direction=body.get("direction"), contain=contain)
            return
        self._reply(body, self.nk.add_stream_sub(StreamSub(match, contain, self.name)))

    def _stream_request(self, op: str, body: dict) -> None:
        sid = body.get("stream")
        if isinstance(sid, bool) or not isinstance(sid, int):
            self.counters.refused += 1
            return
        direction = body.get("direction")
        d = wire.DIRECTIONS.get(direction) if isinstance(direction, str) else None
        if op == "kill":
            self.counters.stream_kills += 1
            self.nk.stream_kill(self.name, sid, "kill")
        else:
            self.counters.stream_mores += 1
            self.nk.stream_more(self.name, sid, d)

    def _stream_edit_target(self, body: dict) -> tuple[Optional[tuple[int, int, int]], Optional[str]]:
        """The (stream, direction, offset) of a cut or inject request, or why it is malformed."""
        sid, direction, offset = body.get("stream"), body.get("direction"), body.get("offset")
        if isinstance(sid, bool) or not isinstance(sid, int):
            return None, "stream must be a stream id"
        d = wire.DIRECTIONS.get(direction) if isinstance(direction, str) else None
        if d is None:
            return None, "direction must be to_guest or from_guest"
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < wire.PASS_ALL:
            return None, "offset must be a stream offset (an integer >= 0)"
        return (sid, d, offset), None

    def _stream_cut(self, body: dict) -> None:
        target, err = self._stream_edit_target(body)
        length = body.get("length")
        if err is None and (isinstance(length, bool) or not isinstance(length, int)
                            or not 1 <= length < wire.PASS_ALL - target[2]):
            err = "length must be an integer >= 1"
        if err is None:
            err = self.nk.stream_cut(self.name, *target, length)
        if err is None:
            self.counters.stream_cuts += 1
            self.counters.stream_cut_bytes += length
        self._reply(body, err)

    def _stream_inject(self, body: dict) -> None:
        idx = self._stream_injection(body)
        if idx is None:
            return
        target, err = self._stream_edit_target(body)
        data = self.spec.stream_injections[idx][1]
        if err is None:
            err = self.nk.stream_inject(self.name, *target, data)
        if err is None:
            self.counters.stream_injects += 1
            self.counters.stream_inject_bytes += len(data)
        self._reply(body, err)

    def _stream_injection(self, body: dict) -> Optional[int]:
        """The index of the stream injection a request names (by ``index`` or ``name``);
        None, answered and alerted, if this scanner has no such injection."""
        idx, name = body.get("index"), body.get("name")
        names = [n for n, _ in self.spec.stream_injections]
        if "index" not in body and isinstance(name, str) and name in names:
            return names.index(name)
        if "name" not in body and not isinstance(idx, bool) and isinstance(idx, int) \
                and 0 <= idx < len(names):
            return idx
        what = name if "index" not in body else idx
        self._reply(body, f"no pre-registered stream injection {what!r}")
        self._alert_about("scanner asked for an injection it does not have", stream_injection=what)
        return None

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
        msg = wire.encode_control({"op": "sync", "id": sync_id})
        # behind any stream messages still queued for it: a sync answers for all before it
        return self.send_stream(msg, force=True) if self.outq else self._send(msg)

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
    """The kernel state of one NI: its policy, scanners, subscriptions, held frames and
    streams."""

    def __init__(self, kernel: "Kernel", name: str, port, policy: Policy):
        self.kernel = kernel
        self.name = name
        self.port = port
        self.policy = policy
        self.subs: list[Sub] = []
        self.stream_subs: list[StreamSub] = []
        self.streams: dict[int, KStream] = {}
        self.streams_killed = 0
        self.held: dict[int, Held] = {}
        self.scanners: dict[str, ScannerProc] = {}
        self.decided_by_timeout = 0
        self.cut_before_ready = 0      # frames and connections covered by a scanner not ready
        self.covered: frozenset = frozenset()
        self._midstream_seen: dict[str, int] = {}   # tcp_midstream_* counts already alerted
        self._midstream_next = 0.0
        self._owners: list = []        # per compiled subscription: (scanner names, is_cover)
        self._stream_owners: list = []
        for spec in policy.scanners:
            self.scanners[spec.name] = ScannerProc(self, spec)
        self.apply()

    def start(self) -> None:
        for sp in self.scanners.values():
            sp.start()
        self.check_ready(time.monotonic())

    def _not_ready(self) -> frozenset:
        return frozenset(n for n, sp in self.scanners.items() if not sp.ready)

    def apply(self) -> None:
        """Installs the policy with the live subscriptions, and a *cover* for every scanner
        not ready (starting, restarting, not yet subscribed): its contain rights, as contain
        subscriptions.  What a cover alone matches is cut (a running scanner) or gets the
        default decision (a failed one): never forwarded unseen before the scanner could have
        asked for it.  Too many to fit: one cover of everything."""
        self.covered = self._not_ready()
        subs = [(s.match, s.contain) for s in self.subs]
        owners = [((s.scanner,), False) for s in self.subs]
        ssubs = [(s.match, s.contain) for s in self.stream_subs]
        sowners = [((s.scanner,), False) for s in self.stream_subs]
        cover, scover = [], []
        for name in sorted(self.covered):
            spec = self.scanners[name].spec
            cover += [(r.match, name) for r in spec.rights if r.contain]
            scover += [(r.match, name) for r in spec.stream_rights if r.contain]
        lib = self.kernel.lib
        subs, owners = self._with_cover(subs, owners, cover, Match(), lib.VN_MAX_SUBS)
        ssubs, sowners = self._with_cover(ssubs, sowners, scover, StreamMatch(), lib.VN_MAX_STREAM_SUBS)
        self._owners, self._stream_owners = owners, sowners
        self.port.set_policy(self.policy.compile(subs, ssubs))

    def _with_cover(self, subs, owners, cover, everything, room):
        if len(subs) + len(cover) <= room:
            return subs + [(m, True) for m, _ in cover], owners + [((n,), True) for _, n in cover]
        if len(subs) >= room:
            log.error("NI %s: no room for the cover of scanners not ready: %d subscriptions",
                      self.name, len(subs))
            subs, owners = subs[:room - 1], owners[:room - 1]
        return subs + [(everything, True)], owners + [(tuple(sorted({n for _, n in cover})), True)]

    def _reapply(self) -> None:
        # frames the fast path matched name subscriptions by index: hand them out first
        self.kernel.on_punts()
        self.apply()

    def scanner_ready(self, sp: ScannerProc) -> None:
        if sp.name in self.covered and self.scanners.get(sp.name) is sp:
            self._reapply()

    def check_ready(self, now: float) -> None:
        """Asks newly started scanners whether they are ready; takes one that never answers
        as ready after READY_GRACE; reinstalls the covers when who is ready changed."""
        for sp in self.scanners.values():
            sp.ask_ready()
            if sp.running and not sp.ready and sp.locked and now - sp.started_at > READY_GRACE:
                self.kernel.alerts.append(
                    self.name, sp.name, f"scanner did not say it was ready within {READY_GRACE:.0f} s "
                    "of starting (not written with the SDK?): taken as ready, with the "
                    "subscriptions it made")
                sp._became_ready("grace")
        if self._not_ready() != self.covered:
            self._reapply()

    def note_midstream(self, now: float) -> None:
        """Tells the administrator (at most every MIDSTREAM_ALERT_EVERY s) about connections
        the fast path picked up mid-stream and reset, passed uninspected or adopted."""
        if now < self._midstream_next:
            return
        st = self.port.stats()
        counts = {k: st.get(f"tcp_midstream_{k}", 0) for k in ("reset", "pass", "adopt")}
        new = {k: v - self._midstream_seen.get(k, 0) for k, v in counts.items()}
        if not any(v > 0 for v in new.values()):
            return
        self._midstream_seen = counts
        self._midstream_next = now + MIDSTREAM_ALERT_EVERY
        self.kernel.alerts.append(
            self.name, None, "TCP connections picked up mid-stream (no handshake seen): "
            f"tcp_midstream = {self.policy.tcp_midstream}", **{k: v for k, v in new.items() if v > 0})

    def _cover_verdict(self, names) -> Optional[bool]:
        """What a frame or connection that only a cover of ``names`` matched gets: cut
        while one of them runs but is not ready, else the policy's default (they failed)."""
        if any((sp := self.scanners.get(n)) is not None and sp.running and not sp.ready for n in names):
            return False
        return self.policy.default_pass

    def add_stream_sub(self, sub: StreamSub) -> Optional[str]:
        self.kernel.on_punts()         # compiled indices shift: hand out what matched first
        if sub in self.stream_subs:
            return None
        if len(self.stream_subs) >= 64:
            return "this NI has no room for more stream subscriptions (64)"
        self.stream_subs.append(sub)
        self.apply()
        return None

    def add_sub(self, sub: Sub) -> Optional[str]:
        self.kernel.on_punts()         # compiled indices shift: hand out what matched first
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
        for spec in policy.scanners:      # PolicyError before anything changes or starts
            check_wire(spec, self.name)
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
            if spec is None or not spec.checkpoint_max_bytes:
                self.kernel.checkpoints.drop(self.name, name)
        for name, spec in new_specs.items():
            if name in old:
                old[name].spec = spec
            else:
                old[name] = ScannerProc(self, spec)
                old[name].start()
                old[name].ask_ready()
        self.subs = [s for s in self.subs if s.scanner in old and any(
            s.match.within(r.match) and (r.contain or not s.contain) for r in old[s.scanner].spec.rights)]
        self.stream_subs = [s for s in self.stream_subs if s.scanner in old and any(
            s.match.within(r.match) and (r.contain or not s.contain)
            for r in old[s.scanner].spec.stream_rights)]
        self.apply()

    # ---- held frames
    def punted(self, p) -> None:
        targets: dict[str, bool] = {}
        covers = []
        for i, (names, is_cover) in enumerate(self._owners):
            if p.subs >> i & 1:
                if is_cover:
                    covers.append(names)
                else:
                    targets[names[0]] = targets.get(names[0], False) or bool(p.contain >> i & 1)
        data = bytes(self.kernel.ffi.buffer(p.data, p.len))
        held_id = p.id
        needed = set()
        cut = False
        for names in covers:
            if not any(n in targets for n in names) and not self._cover_verdict(names):
                cut = True
                self.cut_before_ready += 1
                break
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
        self.expire_streams(now)
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
                # counted above, and told to the administrator (within the scanner's alert rate)
                sp._alert_about("decision missed: the policy's default applied after the hold timeout",
                                default="pass" if self.policy.default_pass else "cut",
                                timeouts=sp.counters.timeouts)
                if sp.running and sp.consecutive_timeouts >= sp.spec.max_timeouts:
                    self.kernel.alerts.append(
                        self.name, name, "scanner hung: missed decisions, default applied",
                        missed=sp.consecutive_timeouts,
                        default="pass" if self.policy.default_pass else "cut")
                    sp.kill(f"hung: {sp.consecutive_timeouts} decisions missed in a row")
        self._prune_pending()
        return min(nxt, self.deadline())

    def _prune_pending(self) -> None:
        """Forgets the numbers of frames a scanner still owes a decision on that are no
        longer held: another contain scanner cut them first.  A scanner that never decides
        those would otherwise grow its ``pending`` without bound (nothing times them out).
        Each held frame has at most one entry per scanner, so more entries than held
        frames means stale ones: only then is the table walked."""
        for sp in self.scanners.values():
            if len(sp.pending) > len(self.held):
                for num in [n for n, hid in sp.pending.items() if hid not in self.held]:
                    del sp.pending[num]

    def shutdown(self) -> None:
        for sp in self.scanners.values():
            sp.stop()
        for held_id in list(self.held):
            self.kernel.release(held_id, self.policy.default_pass)
        self.held.clear()
        self.streams.clear()
        self.port.clear_policy()

    def deadline(self) -> float:
        """The earliest moment a held frame or stream chunk is owed a decision by."""
        t = min((h.deadline for h in self.held.values()), default=float("inf"))
        for st in self.streams.values():
            for q in st.deadlines.values():
                if q:
                    t = min(t, q[0][1])
        return t

    def owes(self) -> bool:
        """Whether a held frame, or a held stream chunk of a stream not being killed, still
        awaits a decision (by its scanners or, at its deadline, by the policy's default)."""
        return bool(self.held) or any(
            st.closing is None and any(st.deadlines.values()) for st in self.streams.values())

    def info(self) -> dict:
        lib, sw = self.kernel.lib, self.kernel.switch._sw
        return {"policy": self.policy.source, "subscriptions": len(self.subs),
                "stream_subscriptions": len(self.stream_subs), "streams": len(self.streams),
                "streams_killed": self.streams_killed,
                "tcp_flows": lib.vn_tcp_flows(sw, self.port.index),
                "tcp_bytes": int(lib.vn_tcp_bytes(sw, self.port.index)),
                "held": len(self.held), "decided_by_timeout": self.decided_by_timeout,
                "scanners_not_ready": sorted(self.covered), "cut_before_ready": self.cut_before_ready,
                "scanners": {n: sp.info() for n, sp in self.scanners.items()}}

    # ---- streams
    def stream_event(self, ev) -> None:
        """A stream opened, grew or closed in the fast path (one vn_stream_event)."""
        sid = int(ev.stream)
        st = self.streams.get(sid)
        if ev.what & self.kernel.lib.VN_STREAM_OPEN:
            st = self._stream_open(ev)
        if st is None:
            # not ours (opened under another kernel): nobody will read or decide it
            if not ev.what & self.kernel.lib.VN_STREAM_CLOSED:
                self.kernel.lib.vn_stream_kill(self.kernel.switch._sw, sid)
            return
        if st.closing is None:
            for i, d in ((0, 1), (1, 2)):
                if ev.read[i]:
                    self._stream_data(st, d, int(ev.avail[i]), bool(ev.eof[i]))
        if ev.what & self.kernel.lib.VN_STREAM_CLOSED:
            reason = st.closing or CLOSE_REASONS.get(ev.reason, "closed")
            self._stream_closed(st, reason)

    def _stream_open(self, ev) -> Optional[KStream]:
        n = 4 if ev.family == 4 else 16
        g = str(ipaddress.ip_address(bytes(ev.guest_addr[0:n])))
        r = str(ipaddress.ip_address(bytes(ev.remote_addr[0:n])))
        client = "guest" if ev.client == 1 else "remote"
        server_port = ev.remote_port if client == "guest" else ev.guest_port
        st = KStream(int(ev.stream), {"family": ev.family, "client": client,
                                      "guest": [g, ev.guest_port], "remote": [r, ev.remote_port],
                                      "port": server_port, "midstream": bool(ev.midstream)})
        covers = []
        for i, (names, is_cover) in enumerate(self._stream_owners):
            if not ev.subs >> i & 1:
                continue
            if is_cover:
                covers.append(names)
                continue
            sub = self.stream_subs[i]
            dirs = sub.match.directions()
            st.readers[sub.scanner] = st.readers.get(sub.scanner, 0) | dirs
            if sub.contain:
                st.holders[sub.scanner] = st.holders.get(sub.scanner, 0) | dirs
        st.hold_dirs = (1 if ev.hold[0] else 0) | (2 if ev.hold[1] else 0)
        self.streams[st.id] = st
        for names in covers:
            if not any(n in st.readers for n in names) and not self._cover_verdict(names):
                # opened before a scanner that may want it was ready: reset, never unseen
                self.cut_before_ready += 1
                self._kill_stream(st, "scanner not ready")
                return st
        for name in list(st.readers):
            sp = self.scanners.get(name)
            if sp is None or not sp.running:
                if self._stream_lose_scanner(st, name, "scanner"):
                    return st
                continue
            sp.counters.streams += 1
            msg = {"op": "stream_open", "stream": st.id, **st.info,
                   "read": [DIR_NAMES[d] for d in (1, 2) if st.readers[name] & d],
                   "held": [DIR_NAMES[d] for d in (1, 2) if st.holders.get(name, 0) & d]}
            if not sp.send_stream(wire.encode_control(msg)):
                if self._stream_lose_scanner(st, name, "overrun"):
                    return st
        self._stream_settle(st)
        return st

    def _stream_data(self, st: KStream, d: int, avail: int, eof: bool) -> None:
        if st.closing is not None:
            return
        lib, ffi, sw = self.kernel.lib, self.kernel.ffi, self.kernel.switch._sw
        ptr = self.kernel._sptr
        start = st.read_off[d]
        while st.read_off[d] < avail:
            n = lib.vn_stream_read(sw, st.id, d, st.read_off[d], ptr)
            if n <= 0:
                break
            data = ffi.buffer(ptr[0], n)[:]
            off = st.read_off[d]
            for name in st.readers_of(d):
                sp = self.scanners.get(name)
                held = bool(st.holders.get(name, 0) & d)
                ok = sp is not None
                for k in range(0, n, STREAM_CHUNK):
                    if not ok:
                        break
                    piece = data[k:k + STREAM_CHUNK]
                    ok = sp.send_stream(wire.encode_stream_data(st.id, d, held, off + k, piece))
                    if ok:
                        sp.counters.stream_bytes += len(piece)
                if not ok and self._stream_lose_scanner(st, name, "overrun"):
                    return
            st.read_off[d] = off + n
        if st.read_off[d] > start:
            lib.vn_stream_consume(sw, st.id, d, st.read_off[d])
            if st.hold_dirs & d and st.read_off[d] > st.released[d]:
                st.deadlines[d].append((st.read_off[d], time.monotonic() + self.policy.hold_timeout))
        if eof and st.read_off[d] >= avail and d not in st.ended:
            st.ended.add(d)
            msg = wire.encode_control({"op": "stream_end", "stream": st.id,
                                       "direction": DIR_NAMES[d], "offset": st.read_off[d]})
            for name in st.readers_of(d):
                sp = self.scanners.get(name)
                if sp is not None and not sp.send_stream(msg):
                    if self._stream_lose_scanner(st, name, "overrun"):
                        return

    def _stream_closed(self, st: KStream, reason: str) -> None:
        self.streams.pop(st.id, None)
        msg = wire.encode_control({"op": "stream_close", "stream": st.id, "reason": reason})
        for name in st.readers:
            sp = self.scanners.get(name)
            if sp is not None and sp.running:
                sp.send_stream(msg, force=True)

    def _stream_settle(self, st: KStream) -> None:
        """Tells the fast path how far each held direction may go: as far as every holder
        passed; a held direction nobody holds any longer goes on entirely."""
        lib, sw = self.kernel.lib, self.kernel.switch._sw
        for d in (1, 2):
            if not st.hold_dirs & d:
                continue
            holders = st.holders_of(d)
            upto = min((st.passed.get((n, d), 0) for n in holders), default=wire.PASS_ALL)
            if upto > st.released[d]:
                st.released[d] = upto
                lib.vn_stream_pass(sw, st.id, d, upto)
                q = st.deadlines[d]
                while q and q[0][0] <= upto:
                    q.popleft()

    def _stream_lose_scanner(self, st: KStream, name: str, reason: str) -> bool:
        """Scanner ``name`` no longer takes part in ``st`` (gone, or it could not keep up):
        the default decision stands in for what it holds.  True if that killed the stream."""
        holds = st.holders.pop(name, 0)
        st.readers.pop(name, None)
        sp = self.scanners.get(name)
        if sp is not None and sp.running and reason == "overrun":
            sp.send_stream(wire.encode_control({"op": "stream_close", "stream": st.id,
                                                "reason": "overrun"}), force=True)
        if holds and not self.policy.default_pass:
            self._kill_stream(st, reason)
            return True
        self._stream_settle(st)
        return False

    def stream_scanner_gone(self, name: str) -> int:
        n = 0
        for st in list(self.streams.values()):
            if name in st.readers or name in st.holders:
                n += 1
                self._stream_lose_scanner(st, name, "scanner")
        return n

    def _kill_stream(self, st: KStream, reason: str) -> None:
        if st.closing is None:
            st.closing = reason
            self.streams_killed += 1
            self.kernel.lib.vn_stream_kill(self.kernel.switch._sw, st.id)

    def stream_pass(self, scanner: str, sid: int, d: int, upto: int) -> None:
        st = self.streams.get(sid)
        if st is None or st.closing is not None or not st.holders.get(scanner, 0) & d:
            return     # late (closed), or not this scanner's to decide: nothing to do
        key = (scanner, d)
        if upto <= st.passed.get(key, 0):
            return
        st.passed[key] = upto
        sp = self.scanners.get(scanner)
        if sp is not None:
            sp.consecutive_timeouts = 0
        self._stream_settle(st)

    def stream_kill(self, scanner: str, sid: int, how: str = "kill") -> None:
        st = self.streams.get(sid)
        sp = self.scanners.get(scanner)
        if st is None or st.closing is not None:
            return
        if not st.holders.get(scanner):
            if sp is not None:
                sp.counters.refused += 1
                sp._alert_about(f"scanner asked to {how} a stream it has no contain rights on",
                                stream=sid)
            return
        self._kill_stream(st, "killed")

    def _stream_uneditable(self, scanner: str, how: str, sid: int, d: int,
                           offset: int) -> Optional[str]:
        """Why ``scanner`` may not edit direction ``d`` of stream ``sid`` at ``offset`` (None
        if it may): it must hold that direction (else alerted, as for a kill), and neither
        it nor the NI may have passed that byte already (passed bytes may have left)."""
        st = self.streams.get(sid)
        if st is None:
            return f"no stream {sid} (closed)"
        if st.closing is not None:
            return f"stream {sid} is closing ({st.closing})"
        if not st.holders.get(scanner, 0) & d:
            sp = self.scanners.get(scanner)
            if sp is not None:
                sp._alert_about(f"scanner asked to {how} a stream it has no contain rights on",
                                stream=sid, direction=DIR_NAMES[d])
            return f"no contain rights on {DIR_NAMES[d]} of stream {sid}"
        mine = st.passed.get((scanner, d), 0)
        if offset < mine:
            return f"offset {offset} is before what this scanner passed ({mine})"
        if offset < st.released[d]:
            return f"offset {offset} is before what the NI already let go ({st.released[d]})"
        return None

    def _edit_error(self, how: str, rc: int) -> str:
        ffi, lib = self.kernel.ffi, self.kernel.lib
        return f"{how} refused by the fast path: {ffi.string(lib.vn_strerror(rc)).decode()}"

    def stream_cut(self, scanner: str, sid: int, d: int, offset: int, length: int) -> Optional[str]:
        """Drops bytes [offset, offset+length) of direction ``d``: None, or why not.  A cut
        is also the scanner's decision on those bytes, so it counts as its pass of them."""
        err = self._stream_uneditable(scanner, "cut", sid, d, offset)
        if err is not None:
            return err
        rc = self.kernel.lib.vn_stream_cut(self.kernel.switch._sw, sid, d, offset, offset + length)
        if rc < 0:
            return self._edit_error("cut", rc)
        # the fast path lets the bytes around a cut go only once they are passed
        self.stream_pass(scanner, sid, d, offset + length)
        return None

    def stream_inject(self, scanner: str, sid: int, d: int, offset: int, data: bytes) -> Optional[str]:
        """Inserts ``data`` (a pre-registered injection) before byte ``offset`` of direction
        ``d``: None, or why not."""
        err = self._stream_uneditable(scanner, "inject into", sid, d, offset)
        if err is not None:
            return err
        rc = self.kernel.lib.vn_stream_inject(self.kernel.switch._sw, sid, d, offset, data, len(data))
        return self._edit_error("inject", rc) if rc < 0 else None

    def stream_more(self, scanner: str, sid: int, d: Optional[int]) -> None:
        """A decision of ``scanner`` on direction ``d`` (None: each it holds) needs bytes
        beyond the receiver's window: the fast path acknowledges the held bytes on the
        receiver's behalf until the scanner passes beyond what had arrived."""
        st = self.streams.get(sid)
        held = st.holders.get(scanner, 0) if st is not None and st.closing is None else 0
        if not held:
            return
        st.more[scanner] = st.more.get(scanner, 0) + 1
        for dd in (1, 2):
            if held & dd and (d is None or d == dd):
                self.kernel.lib.vn_stream_more(self.kernel.switch._sw, sid, dd)

    def expire_streams(self, now: float) -> None:
        """The hold timeout on stream chunks: default pass lets a chunk go in place of the
        holders that did not pass it; default cut kills the connection."""
        for st in list(self.streams.values()):
            for d in (1, 2):
                q = st.deadlines[d]
                while q and q[0][1] <= now and st.closing is None:
                    end, _ = q.popleft()
                    late = [n for n in st.holders_of(d) if st.passed.get((n, d), 0) < end]
                    if not late:
                        continue
                    self.decided_by_timeout += 1
                    for name in late:
                        sp = self.scanners.get(name)
                        if sp is not None:
                            sp.counters.timeouts += 1
                            sp.consecutive_timeouts += 1
                    if self.policy.default_pass:
                        for name in late:
                            st.passed[(name, d)] = end
                        self._stream_settle(st)
                    else:
                        self._kill_stream(st, "timeout")
                    for name in late:
                        sp = self.scanners.get(name)
                        if sp is not None and sp.running and sp.consecutive_timeouts >= sp.spec.max_timeouts:
                            self.kernel.alerts.append(
                                self.name, name, "scanner hung: missed decisions, default applied",
                                missed=sp.consecutive_timeouts,
                                default="pass" if self.policy.default_pass else "cut")
                            sp.kill(f"hung: {sp.consecutive_timeouts} decisions missed in a row")


class Kernel:
    """All NI kernels of a daemon; glued to its epoll set by register/unregister."""

    def __init__(self, switch, register: Callable[[int, Callable[[], None]], None],
                 unregister: Callable[[int], None], alert_log: Optional[str],
                 state_dir: Optional[str] = None):
        from ._fastpath import ffi, lib
        self.ffi, self.lib = ffi, lib
        self.switch = switch
        self.register = register
        self.unregister = unregister
        self.alerts = AlertLog(alert_log)
        # scanner checkpoints: in memory, and in state_dir (if any) across daemon restarts
        self.checkpoints = CheckpointStore(state_dir)
        self.alerts.on_status.append(lambda name, data: self.event(name, **data))
        self.uids = sandbox.UidPool()
        for gone in sandbox.remove_stale_stage_roots():   # left by a daemon killed hard
            log.info("removed the stale scanner stage %s (its daemon is gone)", gone)
        self.nis: dict[int, NIKernel] = {}          # by port index
        self.events: list[Callable[[str, dict], None]] = []
        self._punt = ffi.new("struct vn_punt *")
        self._sev = ffi.new("struct vn_stream_event *")
        self._sptr = ffi.new("const uint8_t **")
        self.next_deadline = float("inf")

    def event(self, name: str, **data) -> None:
        for fn in self.events:
            fn(name, data)

    def attach(self, name: str, port, policy: Policy) -> NIKernel:
        for spec in policy.scanners:      # PolicyError before any scanner starts
            check_wire(spec, name)
        self.checkpoints.keep_only(name, [s.name for s in policy.scanners if s.checkpoint_max_bytes])
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
        ev = self._sev
        for _ in range(4096):
            if not self.lib.vn_stream_next(sw, ev):
                break
            nk = self.nis.get(ev.port)
            if nk is None:
                if not ev.what & self.lib.VN_STREAM_CLOSED:
                    self.lib.vn_stream_kill(sw, ev.stream)
                continue
            nk.stream_event(ev)
        self._update_deadline()

    def _update_deadline(self) -> None:
        self.next_deadline = min(min((nk.deadline() for nk in self.nis.values()), default=float("inf")),
                                 self._restarts_due())

    def _restarts_due(self) -> float:
        """When the earliest scanner restart is due: the loop wakes for it, so the delay a
        restart alert states is the one taken (not rounded up to the housekeeping tick)."""
        return min((sp.next_start for nk in self.nis.values() for sp in nk.scanners.values()
                    if sp.state == "restarting"), default=float("inf"))

    def housekeeping(self) -> None:
        self.alerts.retry()
        now = time.monotonic()
        nxt = float("inf")
        for nk in list(self.nis.values()):
            nxt = min(nxt, nk.expire(now))
            for sp in list(nk.scanners.values()):
                sp.poll(now)
                if sp.outq:
                    sp.flush()
            nk.check_ready(now)
            nk.note_midstream(now)
        self.lib.vn_tcp_housekeeping(self.switch._sw)
        self.checkpoints.flush()
        self.next_deadline = min(nxt, min((nk.deadline() for nk in self.nis.values()),
                                          default=float("inf")), self._restarts_due())

    def close(self) -> None:
        for idx in list(self.nis):
            self.detach(idx)
        self.checkpoints.flush(force=True)
        self.alerts.close()
