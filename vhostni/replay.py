"""Offline replay: an NI's policy and scanners run over a capture file.

    vhostni replay --policy FILE --guest-mac MAC IN.pcap --out OUT.pcap --alerts OUT.jsonl

The same pieces as a running daemon: a C ``Switch`` whose two ports are *sink* ports (the
guest's and the network's) instead of a vhost-user NIC and a TAP, the guest's port carrying
the NI policy (anti-spoofing, prevent rules, subscriptions; ingress and egress alike), and
the real NI ``Kernel`` with its scanners as sandboxed processes.  Each captured frame is
given a direction by the guest's MAC: source MAC the guest's means *from the guest* (it
enters the switch from the guest's port), destination MAC the guest's, broadcast or
multicast means *to the guest* (it enters from the network's port).  Frames that are
neither never crossed this NI and are left out (counted as ``foreign``).  What the switch
delivers to either port is what the NI would have delivered; it is written to OUT.pcap,
both directions interleaved in delivery order.

Timing model
------------
* Frames are fed one at a time.  After each frame that reached a scanner, replay waits
  until every such scanner has handled it: it sends a ``sync`` request after the frame,
  which the SDK answers when the scanner asks for its next frame, so every decision and
  alert that frame caused has arrived (a scanner may still keep a frame undecided on
  purpose, waiting for more data).  Output order and content therefore depend only on what
  the scanners decide, not on how fast they run.  A scanner that does not answer syncs
  (not written with the SDK) is waited for only until it owes no decisions, after a
  warning; with it, the output can depend on timing.  ``window`` (``--window N``) lets each
  scanner fall up to N frames behind instead of one: faster on a machine with cores to
  spare, but a held frame may then leave after frames fed later than in lockstep.
* A frame costs a scanner up to two messages (its decision, its sync answer), and the kernel
  kills a scanner that sends more than its policy's ``messages_per_second``: replay feeds
  each scanner at most 0.4 times that many frames a second, so it never gets one killed.
* ``clock`` (``--clock``) says what time the NI runs on.  ``"capture"``: the capture's
  timestamps, for everything — the C core's timers and the timestamps scanners are given,
  hold timeouts, the scanners' own clocks (the SDK's ``clock()``/``time()`` and timeouts,
  told by ``tick`` messages as capture time passes: every ``TICK_S`` of it at most) — so a
  rate-based scanner (Code-Red's "more than 10 new destinations a minute") sees the
  capture's own rates while replay feeds as fast as the scanners keep up, and two runs
  give the same output.  Timers fire between frames, at the first frame at or past their
  time; at the end, time runs on to each remaining hold deadline until nothing is held.
  ``"system"`` (the default, as a live NI): the wall clock; frame timestamps handed to
  scanners are when the NI took the frame, so a capture's minutes may pass in a second;
  ``speed`` (``--speed``) then paces the feed at that many times the capture's own pace
  (1: real time).
* An output frame carries the capture timestamp of the input frame whose processing
  delivered it: its own, unless it was held past later frames (a scanner waiting for more
  data) or released by a timeout at the end, when it carries the last frame's (on the
  capture's clock: the time of the deadline that released it).
* An alert carries the wall-clock ``time`` it was raised and, when a scanner raised it while
  handling an input frame (before answering that frame's sync), ``frame`` (that record's
  number in IN.pcap, from 1), ``capture_time`` (its timestamp, s) and ``flow`` (its
  addresses, protocol and ports).  Alerts from a scanner's timed work, from the kernel about
  a scanner that died, or from a scanner that does not answer syncs have ``frame`` null.
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import re
import select
import struct
import time
from typing import Callable, Optional

from . import pcap
from .fastpath import Switch, lib
from .alertlog import encode_alert
from .kernel import Kernel
from .scannerproc import ScannerProc
from .policy import Policy

log = logging.getLogger("vhostni.replay")

FROM_GUEST = 1
TO_GUEST = 2
MAX_FRAME = 65550
HOUSEKEEPING_S = 0.25
TICK_S = 0.1          # capture clock: scanners are told the time after at most this much of it
# capture clock: the latest frame time it takes (the last a pcap record can carry; a pcapng
# timestamp past it counts as this time).  Hold deadlines past it still come: the switch's
# clock goes on to VN_CLOCK_MAX_NS, some ten years later.
CLOCK_MAX_NS = (1 << 32) * 1_000_000_000 - 1

MAC_RE = re.compile(r"\A([0-9a-fA-F]{2})([:-]?)([0-9a-fA-F]{2})(\2[0-9a-fA-F]{2}){4}\Z")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with dashes, or none) as 6 bytes; ValueError otherwise."""
    t = text.strip()
    if not MAC_RE.match(t):
        raise ValueError(f"{text!r} is not a MAC address (expected e.g. 52:54:00:12:34:56)")
    mac = bytes.fromhex(t.replace(":", "").replace("-", ""))
    if mac[0] & 1:
        raise ValueError(f"{text!r} is a multicast address: a guest's NIC has a unicast MAC")
    return mac


def direction_of(frame: bytes, guest_mac: bytes) -> Optional[int]:
    """FROM_GUEST, TO_GUEST or None (a frame this NI never saw, or a runt)."""
    if len(frame) < 14:
        return None
    if frame[6:12] == guest_mac:
        return FROM_GUEST
    if frame[0:6] == guest_mac or frame[0] & 1:
        return TO_GUEST
    return None


_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}


def flow_of(frame: bytes) -> Optional[dict]:
    """The IP addresses, protocol and (TCP/UDP/SCTP) ports of a frame, or None."""
    try:
        off, et = 14, struct.unpack_from("!H", frame, 12)[0]
        if et in (0x8100, 0x88A8):
            off, et = 18, struct.unpack_from("!H", frame, 16)[0]
        if et == 0x0800:
            ihl = (frame[off] & 15) * 4
            proto = frame[off + 9]
            src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
            first = struct.unpack_from("!H", frame, off + 6)[0] & 0x1FFF == 0
            l4 = off + ihl
        elif et == 0x86DD:
            proto = frame[off + 6]
            src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
            first, l4 = True, off + 40
        else:
            return None
        if len(src) not in (4, 16) or len(dst) != len(src):
            return None
        flow = {"proto": _PROTO_NAMES.get(proto, proto), "src": str(ipaddress.ip_address(src)),
                "dst": str(ipaddress.ip_address(dst))}
        if proto in (6, 17, 132) and first and len(frame) >= l4 + 4:
            flow["sport"], flow["dport"] = struct.unpack_from("!HH", frame, l4)
        return flow
    except (IndexError, struct.error, ValueError):
        return None


@dataclasses.dataclass
class ReplayStats:
    records: int = 0
    from_guest: int = 0
    to_guest: int = 0
    foreign: int = 0             # neither from nor to the guest: not this NI's traffic
    runts: int = 0               # shorter than an Ethernet header
    oversize: int = 0            # longer than any frame the NI carries
    delivered_from_guest: int = 0
    delivered_to_guest: int = 0
    alerts: int = 0
    alerts_attributed: int = 0
    syncs: int = 0
    throttled: int = 0           # waits to keep scanners under their message rate limit


class Replay:
    """One NI, replayed.  Feed frames with :meth:`feed`; delivered frames go to
    ``on_frame(ts_ns, frame, direction)``, alerts to ``on_alert(record)``.

        with Replay(mac, policy, on_frame=..., on_alert=...) as r:
            r.start()                        # scanners up and subscribed
            for rec in records:
                r.feed(rec.ts_ns, rec.data, rec.number)
            r.finish()                       # every held frame decided (or timed out)
    """

    def __init__(self, guest_mac: bytes, policy: Optional[Policy] = None, ni: str = "replay",
                 on_frame: Callable[[int, bytes, int], None] = lambda ts, f, d: None,
                 on_alert: Callable[[dict], None] = lambda rec: None,
                 speed: Optional[float] = None, sync_timeout: float = 10.0,
                 start_timeout: float = 20.0, window: int = 1, clock: str = "system"):
        if len(guest_mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        if speed is not None and not speed > 0:
            raise ValueError("speed must be positive")
        if window < 1:
            raise ValueError("window must be at least 1")
        if clock not in ("system", "capture"):
            raise ValueError("clock is 'system' or 'capture'")
        if clock == "capture" and speed is not None:
            raise ValueError("speed paces the system clock; with the capture's clock there is nothing to pace")
        self.capture_clock = clock == "capture"
        self.guest_mac = guest_mac
        self.ni = ni
        self.on_frame = on_frame
        self.on_alert = on_alert
        self.speed = speed
        self.sync_timeout = sync_timeout
        self.start_timeout = start_timeout
        self.window = window
        self.stats = ReplayStats()
        self.policy = policy
        if policy is not None and policy.mac is None:
            # the guest's MAC is known here: anti-spoofing checks it, as the daemon's NI would
            policy = dataclasses.replace(policy, mac=guest_mac)
        elif policy is not None and policy.mac != guest_mac:
            log.warning("the policy's [ni] mac %s is not the guest's %s: anti-spoofing will "
                        "drop what the guest sends", policy.mac.hex(":"), guest_mac.hex(":"))
        self.ep = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self.switch = Switch()
        self.guest = self.switch.add_sink_port()
        self.net = self.switch.add_sink_port()
        self.kernel = Kernel(self.switch, self._register, self._unregister, None)
        if self.capture_clock:
            self.kernel.set_clock(lambda: self.clock_ns / 1e9)
        self.kernel.alerts.listeners.append(self._alerted)
        self._policy = policy
        self.nk = None
        self.clock_ns = 0                    # capture time of the frame being processed
        # per scanner: the syncs it has not answered yet, oldest first, each with the pid it
        # went to and the input frame it follows: (sync id, pid, (number, ts_ns, frame))
        self._outstanding: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._sync_id = 0
        self._budget: dict[str, list[float]] = {}   # scanner -> [frames it may take now, when]
        self._unsynced: set[str] = set()     # scanners that do not answer syncs
        # capture clock: scanners that neither answer syncs nor decide in time; nothing
        # but capture time passing settles their frames, so replay does not wait for them
        self._undeciding: set[str] = set()
        self._last_house = 0.0
        self._timers_ns = 0                  # capture clock: when the NI's timers last ran
        self._pace0: Optional[tuple[float, int]] = None
        self._closed = False

    # ---- the event loop (a small Daemon.run)
    def _register(self, fd: int, handler: Callable[[], None], events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = handler
        self.ep.register(fd, events)

    def _unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def _pump(self, timeout: float) -> None:
        """Waits up to ``timeout`` s for scanner messages, handles them and what they caused."""
        if self.kernel.next_deadline != float("inf"):
            timeout = min(timeout, self.kernel.next_deadline - time.monotonic())
        timeout = min(timeout, HOUSEKEEPING_S)
        for fd, _ in self.ep.poll(max(0.0, timeout)):
            handler = self._handlers.get(fd)
            if handler is not None:
                handler()
        # no switch thread here: decisions scanners published on their rings without a
        # message after them (a pass after the sync it answered) are applied now
        self.switch.ring_poll()
        now = time.monotonic()
        if now >= self.kernel.next_deadline or now - self._last_house >= HOUSEKEEPING_S:
            self._last_house = now
            # on the capture's clock, the NI's timers run between frames (_advance), at
            # points the capture decides, not the wall clock
            self.kernel.housekeeping(timers=not self.capture_clock)
        self._collect()

    def _advance(self, ts_ns: int) -> None:
        """On the capture's clock: time moves to ``ts_ns``; the switch's timers and the hold
        deadlines that passed fire, and scanners are told the time (``tick``)."""
        # 0 would mean the system clock; a capture's time never goes back, nor past the C clock's end
        self.clock_ns = min(max(self.clock_ns, ts_ns, 1), lib.VN_CLOCK_MAX_NS)
        self.switch.set_clock(self.clock_ns)
        if (self.clock_ns / 1e9 >= self.kernel.hold_deadline
                or self.clock_ns - self._timers_ns >= HOUSEKEEPING_S * 1e9):
            self._timers_ns = self.clock_ns
            self.kernel.timers()
            self._collect()
        self.kernel.tick(TICK_S)

    def _collect(self) -> None:
        """Hands punted frames to the kernel and delivered frames to ``on_frame``."""
        self.kernel.on_punts()
        for port, frame in self.switch.sink_frames():
            if port == self.guest.index:
                self.stats.delivered_to_guest += 1
                self.on_frame(self.clock_ns, frame, TO_GUEST)
            else:
                self.stats.delivered_from_guest += 1
                self.on_frame(self.clock_ns, frame, FROM_GUEST)

    def _scanners(self) -> list[ScannerProc]:
        return list(self.nk.scanners.values()) if self.nk else []

    # ---- alerts
    def _alerted(self, rec: dict) -> None:
        out = dict(rec)
        self.stats.alerts += 1
        # A scanner handles frames in order and answers each frame's sync when it asks for the
        # next one: what it says before answering the oldest sync it owes comes from that frame.
        q = self._outstanding.get(rec.get("scanner"))
        if q:
            self._settle(rec.get("scanner"))
        if q and q[0][2] is not None:
            number, ts, frame = q[0][2]
            self.stats.alerts_attributed += 1
            out["frame"] = number
            out["capture_time"] = ts / 1e9
            if "flow" not in out:
                flow = flow_of(frame)
                if flow:
                    out["flow"] = flow
        else:
            out.setdefault("frame", None)
            out.setdefault("capture_time", None)
        self.on_alert(out)

    # ---- lifecycle
    def start(self, at_ns: Optional[int] = None) -> None:
        """Starts the policy's scanners and waits until each has subscribed and entered its
        frame loop (answered a sync), has died trying, or ``start_timeout`` passed.  On the
        capture's clock, ``at_ns`` is the time to start at (the first frame's: scanners
        that read the time while starting see the capture's)."""
        if self.capture_clock and at_ns is not None and at_ns > 0:
            self.clock_ns = self._timers_ns = at_ns = min(at_ns, CLOCK_MAX_NS)
            self.switch.set_clock(at_ns)
        if self._policy is None:
            return
        self.nk = self.kernel.attach(self.ni, self.guest, self._policy)
        restarts0 = {sp.name: sp.counters.restarts for sp in self._scanners()}
        deadline = time.monotonic() + self.start_timeout
        # two syncs, one after the other: a scanner may answer the first while it is still
        # starting (the SDK's ready() does), the second only once it waits for its first
        # event, so whatever it says while starting ("ready" alerts) comes before any frame
        for _ in range(2):
            if not self._start_sync(restarts0, deadline):
                return

    def _start_sync(self, restarts0: dict, deadline: float) -> bool:
        """One startup sync to every running scanner; False if replay gave up waiting."""
        asked: dict[str, int] = {}               # scanner -> pid the startup sync went to
        self._sync_id += 1
        sid = self._sync_id
        while True:
            waiting = []
            for sp in self._scanners():
                if sp.state != "running" or sp.counters.restarts > restarts0[sp.name]:
                    continue                     # it died while starting: the kernel alerted
                if sp.running and asked.get(sp.name) != sp.proc.pid:
                    if sp.sync(sid):
                        asked[sp.name] = sp.proc.pid
                if not (sp.running and sp.synced >= sid):
                    waiting.append(sp.name)
            if not waiting:
                return True
            if time.monotonic() >= deadline:
                log.warning("scanner(s) %s not ready after %.0f s (no answer to sync: not "
                            "written with the SDK?); replaying anyway", ", ".join(waiting),
                            self.start_timeout)
                self._unsynced.update(waiting)
                return False
            self._pump(deadline - time.monotonic())

    def feed(self, ts_ns: int, frame: bytes, number: Optional[int] = None) -> Optional[int]:
        """One captured frame; returns its direction (None: not this NI's, not fed)."""
        self.stats.records += 1
        number = self.stats.records if number is None else number
        direction = direction_of(frame, self.guest_mac)
        if direction is None:
            if len(frame) < 14:
                self.stats.runts += 1
            else:
                self.stats.foreign += 1
            return None
        if len(frame) > MAX_FRAME:
            self.stats.oversize += 1
            return None
        if direction == FROM_GUEST:
            self.stats.from_guest += 1
        else:
            self.stats.to_guest += 1
        if self.speed:
            self._pace(ts_ns)
        self._throttle()
        if time.monotonic() - self._last_house >= HOUSEKEEPING_S:
            self._pump(0)     # restarts, hold timeouts, scanners' stderr: as the daemon does
        # a scanner was given something if the kernel sent it a message: a frame, (streams)
        # reassembled data, or (capture clock) the time
        sent = {sp.name: sp.given() for sp in self._scanners()}
        if self.capture_clock:
            self._advance(min(ts_ns, CLOCK_MAX_NS))
        else:
            self.clock_ns = max(self.clock_ns, ts_ns)
        (self.guest if direction == FROM_GUEST else self.net).inject_from(frame)
        self._collect()
        if self._sync_touched(sent, (number, ts_ns, frame)):
            self._wait(self.window - 1)
        return direction

    def _sync_touched(self, sent: dict, what: Optional[tuple]) -> int:
        """Sends a sync to each scanner the kernel sent something since ``sent`` (its
        message counts then), recording ``what`` it follows: (number, ts_ns, frame) of an
        input frame, or None (time passing).  Returns how many were touched."""
        touched = [sp for sp in self._scanners() if sp.given() != sent.get(sp.name, sp.given())]
        for sp in touched:
            if sp.name in self._budget:
                self._budget[sp.name][0] -= 1
            if sp.name not in self._unsynced and sp.running:
                self._sync_id += 1
                if sp.sync(self._sync_id):
                    self.stats.syncs += 1
                    self._outstanding[sp.name].append((self._sync_id, sp.proc.pid, what))
        return len(touched)

    def _throttle(self) -> None:
        """Keeps each scanner under its policy's ``messages_per_second``, past which the
        kernel kills it as flooding: a frame costs a scanner up to two messages (a decision
        and a sync answer), so it gets at most 0.4 x that many frames a second (in bursts
        of at most 0.05 x)."""
        for sp in self._scanners():
            rate = 0.4 * sp.spec.messages_per_second
            b = self._budget.setdefault(sp.name, [0.05 * sp.spec.messages_per_second, time.monotonic()])
            while True:
                now = time.monotonic()
                b[0] = min(0.05 * sp.spec.messages_per_second, b[0] + (now - b[1]) * rate)
                b[1] = now
                if b[0] >= 1:
                    break
                self.stats.throttled += 1
                self._pump((1 - b[0]) / rate)

    def _pace(self, ts_ns: int) -> None:
        if self._pace0 is None:
            self._pace0 = (time.monotonic(), ts_ns)
            return
        wall0, ts0 = self._pace0
        target = wall0 + (ts_ns - ts0) / 1e9 / self.speed
        while (left := target - time.monotonic()) > 0:
            self._pump(left)

    def _settle(self, name: str) -> None:
        """Forgets the syncs scanner ``name`` answered (or can no longer answer)."""
        q = self._outstanding[name]
        sp = self.nk.scanners.get(name) if self.nk else None
        while q and (sp is None or not sp.running or sp.proc.pid != q[0][1] or sp.synced >= q[0][0]):
            q.popleft()

    def _behind(self, limit: int) -> list[str]:
        """Scanners more than ``limit`` frames behind: syncs unanswered, or for those that do
        not answer syncs, decisions owed."""
        late = []
        for sp in self._scanners():
            if sp.name in self._undeciding:
                continue
            if sp.name in self._unsynced:
                # decisions owed on frames still held (a frame another scanner cut stays in
                # its pending list until it decides, which it may never do)
                owed = sum(1 for hid in sp.pending.values() if hid in self.nk.held) + sp.ring_owed()
                if sp.running and owed > limit:
                    late.append(sp.name)
            else:
                self._settle(sp.name)
                if len(self._outstanding[sp.name]) > limit:
                    late.append(sp.name)
        return late

    def _wait(self, limit: int) -> None:
        """Waits until no scanner is more than ``limit`` frames behind (see the module doc)."""
        deadline = time.monotonic() + self.sync_timeout
        while late := self._behind(limit):
            now = time.monotonic()
            syncing = [n for n in late if n not in self._unsynced]
            if now >= deadline and syncing:
                log.warning("scanner(s) %s did not answer a sync within %.0f s (not written with "
                            "the SDK, or stuck): from now on replay waits only for their "
                            "decisions, and the output may depend on timing",
                            ", ".join(syncing), self.sync_timeout)
                self._unsynced.update(syncing)
                for n in syncing:
                    self._outstanding[n].clear()
                continue
            if now >= deadline and self.capture_clock:
                # owed decisions only: on the system clock their hold timeouts end the wait,
                # on the capture's the clock stands still while replay waits here
                log.warning("scanner(s) %s neither answer syncs nor decide within %.0f s: "
                            "replay no longer waits for them, their frames are settled by "
                            "hold timeouts on the capture's clock", ", ".join(late),
                            self.sync_timeout)
                self._undeciding.update(late)
                continue
            self._pump(deadline - now if now < deadline else HOUSEKEEPING_S)

    def finish(self) -> None:
        """The capture ended: waits until every held frame and every held stream byte is
        decided (by a scanner, or by the policy's default when its hold timeout passes)."""
        self._collect()
        self._wait(0)
        while self.nk is not None and self.nk.owes():
            if self.capture_clock:
                # nothing more comes: time runs on to the next hold deadline
                nxt = self.kernel.hold_deadline
                if nxt == float("inf"):
                    self.kernel.timers()
                    nxt = self.kernel.hold_deadline
                if nxt == float("inf") or self.clock_ns >= lib.VN_CLOCK_MAX_NS:
                    break                    # held by nothing with a deadline: close() settles
                sent = {sp.name: sp.given() for sp in self._scanners()}
                # (+1 us: the deadline is a float of Unix seconds, good to ~0.3 us)
                self._advance(max(self.clock_ns, int(nxt * 1e9) + 1000))
                self._pump(0)
                self._sync_touched(sent, None)
                self._wait(0)
            else:
                self._pump(HOUSEKEEPING_S)
        self._collect()

    def summary(self) -> dict:
        d = dataclasses.asdict(self.stats)
        g = self.guest.stats()
        d["ni"] = {k: g[k] for k in ("drop_spoofed", "drop_prevented", "held", "held_passed",
                                     "held_cut", "held_over_cap", "punted_copies",
                                     "punt_queue_full", "injected", "drop_runt", "drop_bad_offload",
                                     "drop_frag_unmatched", "unparsed_passed")}
        # frames the parser could not walk, by reason (csrc/parse.c)
        d["ni"].update({k: v for k, v in g.items() if k.startswith("drop_unparsed_")})
        if self.nk is not None:
            d["ni"]["decided_by_timeout"] = self.nk.decided_by_timeout
            d["scanners"] = {n: {k: v for k, v in sp.info().items()
                                 if k in ("state", "frames", "decisions", "timeouts", "restarts",
                                          "refused", "alerts", "alerts_suppressed", "send_failures",
                                          "last_error")}
                             for n, sp in self.nk.scanners.items()}
        d["scanners_not_synced"] = sorted(self._unsynced)
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kernel.close()
        self._collect_closed()
        self.switch.close()
        self.ep.close()

    def _collect_closed(self) -> None:
        # shutting the kernel down decides what is still held (default decision)
        for port, frame in self.switch.sink_frames():
            d = TO_GUEST if port == self.guest.index else FROM_GUEST
            self.on_frame(self.clock_ns, frame, d)

    def __enter__(self) -> "Replay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InputError(Exception):
    """A problem with what the user gave (exit status 2)."""


def replay_file(in_path: str, guest_mac: bytes, policy: Optional[Policy] = None,
                out_path: Optional[str] = None, alerts_path: Optional[str] = None,
                ni: str = "replay", speed: Optional[float] = None,
                sync_timeout: float = 10.0, window: int = 1, clock: str = "system") -> dict:
    """Replays a capture file; returns the summary.  Raises InputError for an unreadable or
    unsupported capture or unwritable outputs (after replaying what could be read, for a
    capture that turns out corrupt or truncated part-way: the summary is then in the
    exception's ``summary``)."""
    try:
        fin = open(in_path, "rb")
    except OSError as exc:
        raise InputError(f"{in_path}: {exc.strerror}") from None
    with fin:
        try:
            reader = pcap.PcapReader(fin)
        except pcap.PcapError as exc:
            raise InputError(f"{in_path}: {exc}") from None
        hdr = reader.header
        outs = []
        try:
            fout = open(out_path, "wb") if out_path else None
            if fout:
                outs.append(fout)
            falerts = open(alerts_path, "w", encoding="utf-8") if alerts_path else None
            if falerts:
                outs.append(falerts)
        except OSError as exc:
            for f in outs:
                f.close()
            raise InputError(f"{exc.filename}: {exc.strerror}") from None
        try:
            return _run(reader, hdr, guest_mac, policy, fout, falerts, ni, speed, sync_timeout,
                        window, in_path, clock)
        finally:
            for f in outs:
                f.close()


def _run(reader, hdr, guest_mac, policy, fout, falerts, ni, speed, sync_timeout, window,
         in_path, clock="system") -> dict:
    writer = pcap.PcapWriter(fout, snaplen=hdr.snaplen, nanosecond=hdr.nanosecond,
                             big_endian=hdr.big_endian and hdr.format == "pcap") if fout else None
    current: list = [None]
    limit = (1 << 32) * 1_000_000_000 - 1

    def on_frame(ts_ns: int, frame: bytes, direction: int) -> None:
        if writer is None:
            return
        rec = current[0]
        # a frame delivered unchanged keeps the original length its capture recorded
        orig = rec.orig_len if rec is not None and rec.data == frame else None
        writer.write(min(max(ts_ns, 0), limit), frame, orig)

    def on_alert(rec: dict) -> None:
        if falerts is not None:
            falerts.write(encode_alert(rec) + "\n")       # strict JSON, one alert a line
            falerts.flush()

    error = None
    t0 = time.monotonic()
    first_ts = last_ts = None
    records = iter(reader)
    head = []
    try:
        head = [next(records)]               # its time is the capture clock's start
    except StopIteration:
        pass
    except pcap.PcapError as exc:
        error = f"{in_path}: {exc}"
    with Replay(guest_mac, policy, ni, on_frame, on_alert, speed, sync_timeout, window=window,
                clock=clock) as r:
        r.start(at_ns=head[0].ts_ns if head else None)
        try:
            for rec in itertools.chain(head, records if error is None else ()):
                current[0] = rec
                first_ts = rec.ts_ns if first_ts is None else first_ts
                last_ts = rec.ts_ns
                r.feed(rec.ts_ns, rec.data, rec.number)
                current[0] = None
        except pcap.PcapError as exc:
            error = f"{in_path}: {exc}"
        current[0] = None
        r.finish()
        summary = r.summary()
    summary["input"] = {"format": hdr.format, "nanosecond": hdr.nanosecond, "snaplen": hdr.snaplen,
                        "first": first_ts / 1e9 if first_ts is not None else None,
                        "last": last_ts / 1e9 if last_ts is not None else None}
    summary["wall_seconds"] = round(time.monotonic() - t0, 3)
    if error:
        summary["error"] = error
        exc = InputError(f"{error} (replayed the {summary['records']} records before it)")
        exc.summary = summary
        raise exc
    return summary


# ---- command line (wired into vhostni.cli)

def add_arguments(p) -> None:
    p.add_argument("input", metavar="IN.pcap", help="capture to replay (pcap or pcapng, Ethernet)")
    p.add_argument("--guest-mac", required=True, metavar="MAC",
                   help="the guest's MAC: frames from it are the guest's, frames to it (or "
                        "broadcast/multicast) are for it")
    p.add_argument("--policy", metavar="FILE", help="the NI's policy (TOML or JSON); none: "
                   "the NI only forwards")
    p.add_argument("--out", metavar="OUT.pcap", help="write the frames the NI delivered here")
    p.add_argument("--alerts", metavar="OUT.jsonl", help="write the alerts here, one JSON object a line")
    p.add_argument("--ni", default="replay", metavar="NAME", help="the NI's name in alerts "
                   "(default %(default)s)")
    p.add_argument("--speed", type=float, metavar="X",
                   help="feed at X times the capture's pace (1: real time); default: as fast as "
                        "the scanners keep up")
    p.add_argument("--clock", choices=("system", "capture"), default="system",
                   help="what time the NI and its scanners run on: the system's (default, as a "
                        "live NI: the capture's minutes may pass in a second) or the capture's "
                        "timestamps (hold timeouts, TCP timers, the scanners' clocks and "
                        "timeouts: fast and deterministic)")
    p.add_argument("--window", type=int, default=1, metavar="N",
                   help="let a scanner fall up to N frames behind the feed (default 1: lockstep, "
                        "the output depends only on the scanners' decisions; more is faster but "
                        "the output may then depend on timing)")
    p.add_argument("--sync-timeout", type=float, default=10.0, metavar="S",
                   help="how long to wait for a scanner to handle one frame (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")


def main(args) -> int:
    """``vhostni replay``: 0 done, 2 bad arguments or input, 1 anything else."""
    import sys
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    def fail(msg: str) -> int:
        print(f"vhostni replay: {msg}", file=sys.stderr)
        return 2

    try:
        mac = parse_mac(args.guest_mac)
    except ValueError as exc:
        return fail(f"--guest-mac: {exc}")
    if args.speed is not None and not args.speed > 0:
        return fail("--speed must be positive")
    if args.window < 1:
        return fail("--window must be at least 1")
    if args.clock == "capture" and args.speed is not None:
        return fail("--speed paces the system clock; it does not go with --clock capture")
    if not args.sync_timeout > 0:
        return fail("--sync-timeout must be positive")
    if not os.path.exists(args.input):
        return fail(f"{args.input}: no such file")
    from .cli import NAME_RE
    if not NAME_RE.match(args.ni):
        return fail(f"--ni {args.ni!r}: NI names are 1-32 of [A-Za-z0-9_.-]")
    from .policy import PolicyError, load_policy
    pol = None
    if args.policy:
        try:
            pol = load_policy(args.policy)
        except OSError as exc:
            return fail(f"--policy {args.policy}: {exc.strerror}")
        except PolicyError as exc:
            return fail(f"--policy: {exc}")
    try:
        summary = replay_file(args.input, mac, pol, args.out, args.alerts, args.ni, args.speed,
                              args.sync_timeout, args.window, args.clock)
    except InputError as exc:
        s = getattr(exc, "summary", None)
        if s is not None:
            print(json.dumps(s, indent=1), file=sys.stderr)
        return fail(str(exc))
    except PolicyError as exc:      # validated, yet cannot be applied (a bug): said clearly
        return fail(f"--policy: {exc}")
    except OSError as exc:          # writing the outputs failed (disk full...)
        print(f"vhostni replay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vhostni replay: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0
