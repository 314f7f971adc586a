"""One scanner of one NI: its confined process, its socket and the requests it sends.

A ScannerProc starts its scanner confined (sandbox.py), restarts it with back-off when it
dies, reads and validates what it sends (anything outside its rights is refused and
alerted) and hands well-formed requests to its NIKernel (kernel.py).  Runs on the daemon's
one thread.
"""
from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import subprocess
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from . import sandbox
from .policy import (FlowMatch, Match, PolicyError, ScannerSpec, StreamMatch, parse_flow_match,
                     parse_match, parse_stream_match)
from .logtext import printable
from .scanner import wire

log = logging.getLogger("vhostni.kernel")    # the kernel's logger, as before this module split

if TYPE_CHECKING:
    from .kernel import NIKernel

RESTART_MIN = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0        # a scanner up this long has its back-off reset
# the ring fds' numbers, in the environment of a scanner that has one (csrc/vnring.h)
RING_ENV = "VHOSTNI_RING_FDS"
RING_BROKEN = {1: "its consumer index went back or past what it was given",
               2: "its decision index went back or jumped more than the ring holds",
               3: "a decision for a frame it was never given",
               4: "a verdict neither pass nor cut"}
LOCKDOWN_GRACE = 10.0      # seconds after its start by which a scanner must show its confinement
LOST_GRACE = 0.2           # seconds a scanner whose socket closed has to exit (to say how it ended)
# Readiness: right after starting a scanner the kernel sends it a sync with this id; the
# SDK answers it when the scanner first waits for an event (Scanner.ready() earlier), i.e.
# once it has made its subscriptions.  Until then what its contain rights cover is held
# back (see NIKernel.apply); a scanner that never answers is taken as ready after
# READY_GRACE seconds (and the administrator is told).  Negative: never a replay sync id.
READY_SYNC = -1
STDERR_LINES_PER_S = 20
OUTQ_MAX = 64 << 20        # stream bytes queued for one scanner that does not keep up



ALERT_MESSAGE_MAX = 4096       # characters of a scanner's alert message kept
ALERT_FIELDS_MAX = 60 << 10    # bytes of its fields (compact JSON) kept: the e-mail scanner's copy of a
                               # message (40000 bytes, base64) fits
ALERT_BYTES_EACH = 4096        # alert bytes a second a scanner may write, per alert a second it may send


def bounded_fields(fields: dict, limit: int = ALERT_FIELDS_MAX) -> dict:
    """A scanner's alert fields cut to ``limit`` bytes of compact JSON: the largest are shortened
    (strings) or dropped (anything else) first, so the small ones that say what happened stay;
    ``fields_truncated`` says so."""
    def size(k, v) -> int:
        return len(json.dumps({k: v}, separators=(",", ":")))
    out = dict(fields)
    sizes = {k: size(k, v) for k, v in out.items()}
    total = sum(sizes.values())
    if total <= limit:
        return out
    while total > limit and sizes:
        k = max(sizes, key=sizes.get)
        v, over = out[k], total - limit
        if isinstance(v, str) and sizes[k] - over > len(k) + 24:
            short = v[:max(0, len(v) - over)]
            while short and size(k, short) > sizes[k] - over:      # escapes take more than a byte
                short = short[:len(short) * 3 // 4]
            out[k] = short
            new = size(k, short)
        else:
            del out[k]
            new = 0
        total += new - sizes[k]
        if new:
            sizes[k] = new
        else:
            del sizes[k]
    out["fields_truncated"] = True
    return out


class _Bucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= n:
            self.tokens -= n
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
class FlowSub:
    match: FlowMatch
    scanner: str




@dataclass
class ScannerCounters:
    frames: int = 0
    decisions: int = 0
    timeouts: int = 0
    ring_full: int = 0          # frames its full ring could not take (the default applied)
    restarts: int = 0
    refused: int = 0
    alerts: int = 0
    alerts_suppressed: int = 0
    send_failures: int = 0
    flow_events: int = 0               # flow events sent to it
    streams: int = 0
    stream_bytes: int = 0
    stream_passes: int = 0
    stream_kills: int = 0
    resets: int = 0
    resets_refused: int = 0     # outside its right, not from/to where it may, or over its rate
    injects_refused: int = 0    # frame injections over resets_per_second
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
        self._counters = ScannerCounters()
        self.started_at = 0.0
        self.backoff = RESTART_MIN
        self.next_start = 0.0
        self.locked = False
        self.consecutive_timeouts = 0
        self.synced = 0                         # the last sync id the scanner answered
        self.sent = 0                           # messages sent to it (frames, stream data, replies)
        self.last_tick = float("-inf")          # NI-clock time it was last told (Kernel.tick)
        self.last_error = ""
        self.stage_root: Optional[str] = None
        self.uid: Optional[int] = None
        self.pid: Optional[int] = None          # the scanner's host pid (self.proc is bwrap)
        self.init_pid: Optional[int] = None     # bwrap's init, PID 1 of the scanner's namespace
        self.launch_filter: Optional[bytes] = None   # the seccomp program bwrap loaded
        self._msg_window = (0.0, 0)
        self._alerts = _Bucket(spec.alerts_per_second, max(2.0, 2 * spec.alerts_per_second))
        # and their bytes: what one alert may carry is bounded (ALERT_FIELDS_MAX), and so is what
        # they add to the alert log a second (ALERT_BYTES_EACH per allowed alert, on average)
        rate = spec.alerts_per_second * ALERT_BYTES_EACH
        self._alert_bytes = _Bucket(rate, max(rate, 4 * (ALERT_FIELDS_MAX + ALERT_MESSAGE_MAX)))
        self._resets = _Bucket(spec.resets_per_second, spec.resets_per_second)
        self._injects = _Bucket(spec.resets_per_second, spec.resets_per_second)
        self._err_buf = b""
        self._err_bucket = _Bucket(STDERR_LINES_PER_S, 2 * STDERR_LINES_PER_S)
        self.outq: collections.deque = collections.deque()   # stream messages waiting for room
        self.outq_bytes = 0
        self._out_armed = False
        self._restore: Optional[tuple[int, bytes]] = None   # the checkpoint the hello announced
        self.lost: Optional[tuple[float, str]] = None   # socket gone, process not yet: (deadline, why)
        self.ready_for = -1.0                   # started_at of the run that said it is ready
        self.ready_asked = -1.0                 # started_at of the run the readiness sync went to
        # its ring (csrc/ring.c): the slot on the NI's port while the process runs, whether
        # the scanner asked for its frames there, and the ring's counters last seen
        self.ring_slot: Optional[int] = None
        self.ring_on = False
        self.ring_streams = False       # ... its stream subscriptions too
        self.ring_seen: dict = {}       # the ring's counters last folded into ours
        self._ring_alerted: dict = {}   # ... last looked at for alerts

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
                "locked_down": self.locked,
                "pending_decisions": len(self.pending) + self.ring_seen.get("owed", 0),
                "ring": self.ring_slot_routed is not None,
                "last_error": self.last_error,
                "rights": [{"contain": r.contain, "match": repr(r.match)} for r in self.spec.rights]
                + [{"contain": r.contain, "stream": repr(r.match)} for r in self.spec.stream_rights]
                + [{"contain": False, "flows": repr(r)} for r in self.spec.flow_rights],
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
        ring_fds = self._open_ring()
        if ring_fds:
            env[RING_ENV] = ",".join(str(fd) for fd in ring_fds)
        try:
            cmd = sandbox.command(argv, self.stage_root, self.uid, filt_r, info_w,
                                  self.spec.sockets)
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=werr, stderr=werr, env=env, cwd="/",
                pass_fds=[child.fileno(), info_w, filt_r, *ring_fds], close_fds=True,
                preexec_fn=sandbox.preexec(self.spec.memory_mb, self.spec.cpu_seconds,
                                           self.spec.open_files, self.uid))
        except (OSError, subprocess.SubprocessError, sandbox.SandboxError) as exc:
            k.uids.give(self.uid)
            self.uid = None
            for fd in (rerr, werr, info_r, info_w, filt_r):
                os.close(fd)
            parent.close()
            child.close()
            self._close_ring()
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
        self.lost = None
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
            [n for n, _ in self.spec.stream_injections], clock=k.clock_mode,
            now=k.clock() if k.clock_mode == "capture" else None, **self._checkpoint_hello()))
        self._send_checkpoint()
        log.info("NI %s: scanner %s started (pid %d, launcher %d): %s", self.nk.name, self.name,
                 self.pid, self.proc.pid, " ".join(argv))
        k.event("SCANNER_STARTED", ni=self.nk.name, scanner=self.name, pid=self.pid)

    def kill(self, reason: str, restart: bool = True) -> None:
        """Ends the process and settles everything it owed.  Does not wait for the process
        to go (the data plane runs on this thread): the kernel reaps it in housekeeping."""
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
        if self.proc is not None and self.proc.poll() is None:
            k.reap_later(self.proc, self.uid)   # killed, not gone yet: its uid is free once it is
        elif self.uid is not None:
            k.uids.give(self.uid)
        self.uid = None
        owed = set(self.pending.values())
        self.pending.clear()
        for held_id in owed:
            self.nk.settle_default(held_id, self.name)
        owed_on_ring = self._close_ring()
        owed_streams = self.nk.stream_scanner_gone(self.name)
        if restart:
            delay = self._schedule_restart()
            k.alerts.append(self.nk.name, self.name, f"scanner stopped: {reason}; restarting in "
                            f"{delay:.2f} s", decisions_defaulted=len(owed) + owed_on_ring,
                            streams_defaulted=owed_streams)
        k.event("SCANNER_DIED", ni=self.nk.name, scanner=self.name, reason=reason)

    # ---- its ring
    def _open_ring(self) -> list:
        """Opens this run's ring on the NI's port; returns the fds the process inherits
        (ni, sc, kick_scanner, kick_ni), or [] (no room: its frames go over the socket)."""
        self._close_ring()
        sw, port = self.nk.kernel.switch, self.nk.port.index
        try:
            self.ring_slot = sw.ring_open(port)
        except Exception as exc:        # FastPathError: the port's rings are all taken
            log.warning("NI %s: no ring for scanner %s (%s): frames go over its socket",
                        self.nk.name, self.name, exc)
            return []
        info = sw.ring_info(port, self.ring_slot)
        self.ring_seen = self._ring_alerted = info
        return [info["ni_fd"], info["sc_fd"], info["kick_scanner_fd"], info["kick_ni_fd"]]

    def _close_ring(self) -> int:
        """Closes the ring: what the scanner owed on it gets the policy's default.  Returns
        how many held frames that was."""
        if self.ring_slot is None:
            return 0
        sw, port = self.nk.kernel.switch, self.nk.port.index
        self.ring_check(final=True)
        owed = self.ring_seen.get("owed", 0)
        sw.ring_close(port, self.ring_slot, self.nk.policy.default_pass)
        self.ring_slot = None
        self.ring_on = self.ring_streams = False
        return owed

    @property
    def ring_slot_routed(self) -> Optional[int]:
        """The ring slot this scanner's frame subscriptions deliver to, or None (socket)."""
        return self.ring_slot if self.ring_on and self.running else None

    def _ring_request(self, rid, streams: bool = False) -> None:
        if self.ring_slot is None:
            self._reply(rid, "no ring for this scanner: its frames come over the socket")
            return
        if self.ring_on:
            # once a run: each switch recompiles and reinstalls the NI's policy, which a scanner
            # must not be able to make the kernel do at its message rate
            if streams != self.ring_streams:
                self._reply(rid, "the ring is on already; its mode is set once per run")
                return
            self._reply(rid)
            return
        self.nk.kernel.on_punts()  # frames matched so far go the old way first
        self.ring_on = True
        # streams already open stay with the kernel; new ones go on the ring
        self.ring_streams = streams
        self.nk.apply()
        self._reply(rid)

    def ring_part(self, sid: int) -> Optional[dict]:
        """Its ring's part in stream ``sid`` (None: it has none, or the stream is over)."""
        if self.ring_slot is None or not self.ring_streams:
            return None
        return self.nk.kernel.switch.stream_ring_part(sid, self.nk.port.index, self.ring_slot)

    def given(self) -> int:
        """What it was given so far: messages sent, and descriptors on its ring (offline
        replay syncs with the scanners it gave something)."""
        if self.ring_slot is None:
            return self.sent
        info = self.nk.kernel.switch.ring_info(self.nk.port.index, self.ring_slot)
        return self.sent + (info["delivered"] if info else 0)

    def ring_owed(self) -> int:
        if self.ring_slot is None:
            return 0
        info = self.nk.kernel.switch.ring_info(self.nk.port.index, self.ring_slot)
        return info["owed"] if info else 0

    def _ring_sync(self) -> None:
        """Folds the ring's counters (kept by the C core) into the scanner's."""
        if self.ring_slot is None:
            return
        info = self.nk.kernel.switch.ring_info(self.nk.port.index, self.ring_slot)
        if info is None:
            return
        old, self.ring_seen = self.ring_seen, info
        c = self._counters
        c.frames += info["delivered"] - old.get("delivered", 0)
        c.decisions += (info["passed"] + info["cut"] + info["stale"]
                        - old.get("passed", 0) - old.get("cut", 0) - old.get("stale", 0))
        missed = info["timeouts"] - old.get("timeouts", 0)
        c.timeouts += missed
        self.nk.decided_by_timeout += missed
        c.ring_full += info["ring_full"] - old.get("ring_full", 0)
        c.streams += info["streams"] - old.get("streams", 0)
        c.stream_bytes += info["stream_bytes"] - old.get("stream_bytes", 0)

    @property
    def counters(self) -> ScannerCounters:
        """Its counters, the ring's included (read now)."""
        self._ring_sync()
        return self._counters

    def owed(self) -> int:
        """Held frames it owes a decision on, over its socket and on its ring."""
        self._ring_sync()
        return len(self.pending) + self.ring_seen.get("owed", 0)

    def ring_check(self, final: bool = False) -> None:
        """Housekeeping of the ring: its counters into the scanner's, decisions missed
        alerted, a scanner that broke the ring's protocol or stopped deciding killed."""
        if self.ring_slot is None:
            return
        self._ring_sync()
        info, old = self.ring_seen, self._ring_alerted
        self._ring_alerted = info
        if final or not info:
            return
        missed = info["timeouts"] - old.get("timeouts", 0)
        if missed > 0:
            self._alert_about("decision missed: the policy's default applied after the hold timeout",
                              default="pass" if self.nk.policy.default_pass else "cut",
                              timeouts=self._counters.timeouts)
        if info["broken"] and not old.get("broken"):
            why = RING_BROKEN.get(info["broken"], str(info["broken"]))
            self.nk.kernel.alerts.append(self.nk.name, self.name,
                                         f"scanner broke its ring: {why}", ring=self.ring_slot)
            self.kill(f"protocol violation on its ring: {why}")
            return
        if self.running and info["timeouts_in_a_row"] >= self.spec.max_timeouts and missed > 0:
            self.nk.kernel.alerts.append(
                self.nk.name, self.name, "scanner hung: missed decisions, default applied",
                missed=info["timeouts_in_a_row"],
                default="pass" if self.nk.policy.default_pass else "cut")
            self.kill(f"hung: {info['timeouts_in_a_row']} decisions missed in a row")

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
            if self.lost is not None:
                if now >= self.lost[0]:
                    self.kill(self.lost[1])
                return
            if not self.locked and now - self.started_at > LOCKDOWN_GRACE:
                why = self._check_confinement()
                self.locked = why is None
                if not self.locked:
                    self.kill(f"not confined {LOCKDOWN_GRACE:.0f} s after its start: {why}")
                    return
            self.ring_check()
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
        if self._drain_stderr():
            # nobody writes it any more (the scanner is ending): stop watching it, or its
            # end would be reported readable on every turn until the scanner is reaped
            self._drain_stderr(final=True)
            self.nk.kernel.unregister(self.err_fd)
            os.close(self.err_fd)
            self.err_fd = None

    def _drain_stderr(self, final: bool = False) -> bool:
        """Logs what the scanner wrote to stderr (rate-limited); True at its end (EOF)."""
        eof = False
        try:
            while True:
                chunk = os.read(self.err_fd, 65536)
                if not chunk:
                    eof = True
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
        return eof

    def on_readable(self) -> None:
        if self.ring_on:
            # decisions it wrote on its ring before these messages take effect first (a
            # sync answer then means its decisions are applied, as over the socket)
            self.nk.kernel.switch.ring_poll()
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
        did (its exit status or signal) rather than what the socket saw.  Its launcher may
        not have exited yet: rather than wait for it here, on the data-plane thread, stop
        reading and let housekeeping (poll) say how it ended, or kill it after LOST_GRACE."""
        cause = self._exit_cause()
        if cause is not None:
            self.last_error = cause
            self._reap(cause, restart=True)
            return
        k = self.nk.kernel
        if self.sock:
            k.unregister(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.lost = (time.monotonic() + LOST_GRACE, what)
        k.next_deadline = min(k.next_deadline, self.lost[0])     # the loop wakes for it

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
        try:
            req = wire.decode_request(msg.body)
        except wire.RequestError as exc:
            self._refuse(exc)
            return
        if isinstance(req, (wire.Subscribe, wire.StreamSubscribe, wire.FlowSubscribe)):
            self._subscribe(req)
        elif isinstance(req, wire.StreamInject):
            self._stream_inject(req)
        elif isinstance(req, wire.Inject):
            self._inject(req)
        elif isinstance(req, wire.StreamCut):
            self._stream_cut(req)
        elif isinstance(req, wire.Alert):
            self._alert(req)
        elif isinstance(req, wire.Synced):
            self.synced = max(self.synced, req.id)
            if req.id == READY_SYNC:
                self._became_ready("subscribed")
        elif isinstance(req, wire.Reset):
            self._reset(req)
        elif isinstance(req, wire.StreamKill):
            self.counters.stream_kills += 1
            self.nk.stream_kill(self.name, req.stream, "kill")
        elif isinstance(req, wire.StreamMore):
            self.counters.stream_mores += 1
            self.nk.stream_more(self.name, req.stream, req.direction)
        elif isinstance(req, wire.Barrier):
            self._reply(req.id)        # everything before it was handled: it is in order
        elif isinstance(req, wire.RingRequest):
            self._ring_request(req.id, req.streams)

    def _refuse(self, exc: wire.RequestError) -> None:
        """A malformed request (wire.decode_request said why): answered, counted, alerted
        as the error says."""
        if exc.reply:
            self._reply(exc.id, exc.reason)
        elif exc.counted:
            self.counters.refused += 1
        if exc.alert is not None:
            message, fields = exc.alert
            self._alert_about(message, **fields)

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

    def _reply(self, rid: Optional[int], error: Optional[str] = None) -> None:
        if error:
            self.counters.refused += 1
        self._send(wire.encode_control({"op": "reply", "id": rid,
                                        "ok": error is None, **({"error": error} if error else {})}))

    def _subscribe(self, req: "wire.Subscribe | wire.StreamSubscribe") -> None:
        if not self.locked:
            why = self._check_confinement()
            self.locked = why is None
            if not self.locked:
                self._reply(req.id, f"not confined: {why}")
                self._alert_about("scanner is not in the confinement it was launched in",
                                  reason=why)
                return
        if isinstance(req, wire.StreamSubscribe):
            self._subscribe_stream(req)
            return
        if isinstance(req, wire.FlowSubscribe):
            self._subscribe_flows(req)
            return
        contain = req.contain
        try:
            match = parse_match("match", req.match)
        except PolicyError as exc:
            self._reply(req.id, str(exc))
            return
        ok = any(match.within(r.match) and (r.contain or not contain) for r in self.spec.rights)
        if not ok:
            self._reply(req.id, "outside this scanner's rights")
            self._alert_about(
                "scanner asked for a subscription outside its rights",
                match=req.match, contain=contain)
            return
        err = self.nk.add_sub(Sub(match, contain, self.name))
        self._reply(req.id, err)

    def _subscribe_stream(self, req: wire.StreamSubscribe) -> None:
        contain = req.contain
        try:
            match = parse_stream_match("subscription", req.fields)
        except PolicyError as exc:
            self._reply(req.id, str(exc))
            return
        ok = any(match.within(r.match) and (r.contain or not contain) for r in self.spec.stream_rights)
        if not ok:
            self._reply(req.id, "outside this scanner's rights")
            self._alert_about("scanner asked for a stream subscription outside its rights",
                              port=req.fields.get("port"), direction=req.fields.get("direction"),
                              contain=contain)
            return
        self._reply(req.id, self.nk.add_stream_sub(StreamSub(match, contain, self.name)))

    def _subscribe_flows(self, req: wire.FlowSubscribe) -> None:
        try:
            match = parse_flow_match("subscription", req.fields, subscription=True)
        except PolicyError as exc:
            self._reply(req.id, str(exc))
            return
        if not any(match.within(r) for r in self.spec.flow_rights):
            self._reply(req.id, "outside this scanner's rights")
            self._alert_about("scanner asked for a flows subscription outside its rights",
                              proto=req.fields.get("proto"), direction=req.fields.get("direction"))
            return
        self._reply(req.id, self.nk.add_flow_sub(FlowSub(match, self.name)))

    def send_flow(self, msg: bytes) -> bool:
        """Sends one flow event, in order behind the stream messages queued for it."""
        if self.send_stream(msg):
            self.counters.flow_events += 1
            return True
        return False

    def _stream_cut(self, req: wire.StreamCut) -> None:
        err = self.nk.stream_cut(self.name, req.stream, req.direction, req.offset, req.length)
        if err is None:
            self.counters.stream_cuts += 1
            self.counters.stream_cut_bytes += req.length
        self._reply(req.id, err)

    def _stream_inject(self, req: wire.StreamInject) -> None:
        names = [n for n, _ in self.spec.stream_injections]
        which = req.injection
        idx = names.index(which) if isinstance(which, str) and which in names else \
            which if not isinstance(which, str) and which < len(names) else None
        if idx is None:
            self._reply(req.id, f"no pre-registered stream injection {which!r}")
            self._alert_about("scanner asked for an injection it does not have", stream_injection=which)
            return
        data = self.spec.stream_injections[idx][1]
        err = self.nk.stream_inject(self.name, req.stream, req.direction, req.offset, data)
        if err is None:
            self.counters.stream_injects += 1
            self.counters.stream_inject_bytes += len(data)
        self._reply(req.id, err)

    def _inject(self, req: wire.Inject) -> None:
        if req.index >= len(self.spec.injections):
            self._reply(req.id, f"no pre-registered injection {req.index!r}")
            self._alert_about("scanner asked for an injection it does not have", index=req.index)
            return
        if not self._injects.take():
            # the administrator's frames, but as often as the scanner likes: bounded like resets
            self.counters.injects_refused += 1
            self._too_fast(req.id, "injections")
            return
        name, frame = self.spec.injections[req.index]
        # from the guest: through the guest's own checks (the C side sends it as the guest's), so a
        # registered frame in another host's name is dropped as spoofed, like the guest's own would be
        self.nk.port.inject(req.direction, frame)
        self._reply(req.id)

    def _reset(self, req: wire.Reset) -> None:
        """A TCP RST|ACK from the guest's own address, sent as if the guest had sent it (through
        anti-spoofing, prevent rules and subscriptions): the NI builds it, the scanner only names
        the connection and its sequence numbers."""
        if not self.spec.resets:
            self.counters.resets_refused += 1
            self._reply(req.id, "this scanner may not send resets (resets = true in its policy)")
            self._alert_about("scanner asked to send a TCP reset without the right to", dst=req.dst)
            return
        pol = self.nk.policy
        src, dst = ipaddress.ip_address(req.src), ipaddress.ip_address(req.dst)
        mac = bytes.fromhex(req.mac.replace(":", ""))
        nets = [net for net in pol.addresses if net.version == src.version]
        if pol.mac is None or not any(src in net for net in nets):
            self.counters.resets_refused += 1
            self._reply(req.id, f"{req.src} is not one of the guest's addresses ([ni] mac and addresses)")
            self._alert_about("scanner asked for a TCP reset from an address not the guest's", src=req.src)
            return
        # wire.Reset let through unicast addresses only; what only the NI knows: the guest's own
        # MAC and the broadcast addresses of its prefixes are not a peer either
        if mac == pol.mac or any(net.prefixlen < net.max_prefixlen - 1 and dst == net.broadcast_address
                                 for net in nets):
            self.counters.resets_refused += 1
            self._reply(req.id, "a reset goes to a peer of the guest, not to the guest itself or a broadcast")
            self._alert_about("scanner asked for a TCP reset to the guest itself or a broadcast",
                              dst=req.dst, mac=req.mac)
            return
        if not self._resets.take():
            # the guest's own connections bound what a detector has to repair; past the policy's
            # rate a scanner is flooding the network in the guest's name
            self.counters.resets_refused += 1
            self._too_fast(req.id, "resets")
            return
        self.nk.port.inject_from(tcp_reset_frame(pol.mac, mac, src, req.sport, dst, req.dport,
                                                 req.seq, req.ack))
        self.counters.resets += 1
        self._reply(req.id)

    def _too_fast(self, rid, what: str) -> None:
        """Refuses a request past ``resets_per_second`` (which bounds resets and injections each)."""
        rate = self.spec.resets_per_second
        self._reply(rid, f"more than {rate:g} {what} a second (resets_per_second in its policy)")
        self._alert_about(f"scanner asked for {what} faster than its policy allows", rate=rate)

    def _alert_about(self, message: str, **fields) -> None:
        """An alert about something this scanner asked for: it can ask as often as it likes,
        so these share its alert rate limit."""
        if not self._alerts.take():
            self.counters.alerts_suppressed += 1
            return
        self.nk.kernel.alerts.append(self.nk.name, self.name, message, **fields)

    def _alert(self, req: wire.Alert) -> None:
        if not self._alerts.take():
            self.counters.alerts_suppressed += 1
            return
        message, fields = req.message[:ALERT_MESSAGE_MAX], bounded_fields(req.fields)
        if not self._alert_bytes.take(len(message) + len(json.dumps(fields, separators=(",", ":")))):
            self.counters.alerts_suppressed += 1
            return
        self.counters.alerts += 1
        self.nk.kernel.alerts.append(self.nk.name, self.name, message, **fields)

    def sync(self, sync_id: int) -> bool:
        """Asks the scanner to answer ``synced`` with ``sync_id`` once it has handled every
        frame sent so far (see :mod:`vhostni.scanner.wire`); False if it cannot be asked."""
        msg = wire.encode_control({"op": "sync", "id": sync_id})
        # behind any stream messages still queued for it: a sync answers for all before it
        return self.send_stream(msg, force=True) if self.outq else self._send(msg)

    def send_tick(self, now: float) -> bool:
        """Tells the scanner the NI clock's time (``tick``), in order behind what it was sent.
        Not past OUTQ_MAX (False): a tick only says the time, and the next one says a later
        time, so a scanner that stopped reading gets no more queued for it."""
        msg = wire.encode_control({"op": "tick", "now": now})
        ok = self.send_stream(msg) if self.outq else self._send(msg)
        if ok:
            self.last_tick = now
        return ok

    def send_frame(self, held_id: int, direction: int, time_ns: int, data: bytes) -> Optional[int]:
        number = self.next_number
        if not self._send(wire.encode_frame(number, direction, held_id != 0, time_ns, data)):
            return None
        self.next_number += 1
        self.counters.frames += 1
        if held_id:
            self.pending[number] = held_id
        return number


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_reset_frame(src_mac: bytes, dst_mac: bytes, src, sport: int, dst, dport: int, seq: int,
                    ack: int) -> bytes:
    """An Ethernet frame with a TCP RST|ACK (IPv4 or IPv6, checksums filled in)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, 0x14, 0, 0, 0)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return dst_mac + src_mac + b"\x08\x00" + ip + tcp
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(tcp), 6)
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src.packed + dst.packed
    return dst_mac + src_mac + b"\x86\xdd" + ip + tcp
