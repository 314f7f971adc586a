"""The NI kernel: scanners, their rights, held frames, streams and alerts.

The fast path (C) holds or copies the frames that subscriptions match and hands them over
through the punt queue.  Here each one goes to the scanners whose subscriptions matched
it, numbered per scanner; a held frame leaves the NI iff every scanner with contain rights
on it said pass.  Scanners are untrusted processes (see sandbox.py): anything a scanner
sends is validated (scanner/wire.py decodes typed requests, scannerproc.py checks them
against its rights), anything outside its rights is refused and alerted, and a scanner
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

The pieces live in their own modules: vhostni/scannerproc.py (one scanner's process, socket
and requests), vhostni/streams.py (the stream brokerage, NIKernel's stream methods) and
vhostni/alertlog.py (the alert log and its writer thread); this one ties them to the fast
path's punt and stream queues.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import sandbox
from .alertlog import AlertLog
from .fastpath import MAX_STREAM_SUBS, MAX_SUBS
from .scanstate import CheckpointStore
from .policy import Match, Policy, StreamMatch, check_wire
from .scannerproc import LOCKDOWN_GRACE, FlowSub, ScannerProc, StreamSub, Sub
from .scanner import wire
from .streams import KStream, StreamBroker

log = logging.getLogger("vhostni.kernel")

READY_GRACE = LOCKDOWN_GRACE
MIDSTREAM_ALERT_EVERY = 10.0   # at most one alert per NI this often about mid-stream pick-ups


@dataclass
class Held:
    needed: set
    deadline: float


class NIKernel(StreamBroker):
    """The kernel state of one NI: its policy, scanners, subscriptions, held frames and
    streams."""

    def __init__(self, kernel: "Kernel", name: str, port, policy: Policy):
        self.kernel = kernel
        self.name = name
        self.port = port
        self.policy = policy
        self.subs: list[Sub] = []
        self.stream_subs: list[StreamSub] = []
        self.flow_subs: list[FlowSub] = []
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
        self._sig_rules: list = []
        self._sig_by_sid: dict = {}
        self.apply()
        self.install_signatures()

    def start(self) -> None:
        for sp in self.scanners.values():
            sp.start()
        self.check_ready(time.monotonic())

    def install_signatures(self) -> None:
        """The policy's [signatures] stage goes into the data path (csrc/sigstage.c): one
        pointer swap on this (the data-plane) thread, the rules were compiled where the policy
        was loaded.  New connections use the new rules; open ones finish with the rules they
        started with (a stream never restarts mid-way)."""
        self.drain_signatures()     # alerts name rules by their index in the stage they came from
        sig = self.policy.signatures
        stage = sig.stage if sig is not None else None
        self.port.set_sigstage(stage)
        if stage is not None:
            self._sig_rules = stage.rules
            for r in stage.rules:
                self._sig_by_sid[(r.gid, r.sid)] = r
            log.info("NI %s: %d signature rules in the data path (%d stream, %d packet)",
                     self.name, sig.ruleset.accepted, stage.nstream, len(stage.rules) - stage.nstream)

    def drain_signatures(self) -> None:
        """The signature stage's matches into the alert log (durable, EVE field names)."""
        from .signatures.stage import alert_fields
        for a in self.port.sig_alerts():
            rule = None
            if a.rule < len(self._sig_rules) and self._sig_rules[a.rule].sid == a.sid:
                rule = self._sig_rules[a.rule]
            else:           # from a connection still on the rules of an older policy
                rule = next((r for (g, s), r in self._sig_by_sid.items() if s == a.sid), None)
            msg, fields = alert_fields(a, rule)
            self.kernel.alerts.append(self.name, None, msg, **fields)

    def signature_counts(self) -> Optional[dict]:
        """Per-rule matches and drops of the installed stage (rules that matched at least once)."""
        if self.policy.signatures is None or not self._sig_rules:
            return None
        m, d = self.port.sig_rule_counts(len(self._sig_rules))
        st = self.port.stats()
        per = {str(r.sid): {"matches": m[i], "drops": d[i], "msg": r.msg}
               for i, r in enumerate(self._sig_rules[:len(m)]) if m[i]}
        out = {"rules": self.policy.signatures.ruleset.accepted,
               "skipped": self.policy.signatures.ruleset.skipped,
               **{k: v for k, v in st.items() if k.startswith("sig_")}, "per_rule": per}
        stage = self.policy.signatures.stage
        if stage is not None:
            th = stage.track_stats()
            if th["entries"]:
                out["thresholds"] = th
        return out

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
        subs, owners = self._with_cover(subs, owners, cover, Match(), MAX_SUBS)
        ssubs, sowners = self._with_cover(ssubs, sowners, scover, StreamMatch(), MAX_STREAM_SUBS)
        self._owners, self._stream_owners = owners, sowners
        flow_events = frozenset().union(*(s.match.events for s in self.flow_subs)) \
            if self.flow_subs else None
        # a running scanner that asked for its ring gets its frames there, in C; covers and
        # everyone else through the punt queue, here
        rings = []
        for names, is_cover in owners:
            sp = None if is_cover else self.scanners.get(names[0])
            slot = sp.ring_slot_routed if sp is not None else None
            rings.append(0 if slot is None else slot + 1)
        srings = []                    # stream subscriptions: if the scanner asked for them too
        for names, is_cover in sowners:
            sp = None if is_cover else self.scanners.get(names[0])
            slot = sp.ring_slot_routed if sp is not None and sp.ring_streams else None
            srings.append(0 if slot is None else slot + 1)
        self.port.set_policy(self.policy.compile(subs, ssubs, flow_events, sub_rings=rings,
                                                 stream_sub_rings=srings))

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

    # Each table (frame, stream, flow subscriptions) is the NI's, shared by its scanners: each scanner
    # is guaranteed an equal share, so one cannot take the room another (added later, or slower to
    # start) needs; beyond its share a scanner may use what no other's guarantee keeps.  Frame and
    # stream tables keep one row back for the cover of scanners not ready.
    TABLES = {"frame": (MAX_SUBS, 1), "stream": (MAX_STREAM_SUBS, 1), "flow": (64, 0)}

    def share(self, table: str) -> int:
        size, reserve = self.TABLES[table]
        return max(1, (size - reserve) // max(1, len(self.scanners)))

    def _claimed(self, table: str, used: "collections.Counter") -> int:
        """Rows the table must keep: each scanner's rows, or its share while it uses fewer."""
        share = self.share(table)
        return sum(max(used[n], share) for n in set(self.scanners) | set(used))

    def _room(self, table: str, rows: list, sub) -> Optional[str]:
        size, reserve = self.TABLES[table]
        used = collections.Counter(s.scanner for s in rows)
        used[sub.scanner] += 1
        if self._claimed(table, used) <= size - reserve:
            return None
        if used[sub.scanner] > self.share(table):
            return (f"scanner {sub.scanner} has its share of this NI's {table} subscriptions "
                    f"({self.share(table)} of {size - reserve}, {len(self.scanners)} scanners) and the rest is "
                    "kept for the others' shares")
        return f"this NI has no room for more {table} subscriptions ({size - reserve})"

    def _over_share(self) -> set:
        """After the policy added scanners: while the tables cannot keep every scanner's share,
        the newest rows of the scanner furthest over its share are dropped here; the caller
        restarts those scanners to subscribe anew."""
        over = set()
        for table, attr in (("frame", "subs"), ("stream", "stream_subs"), ("flow", "flow_subs")):
            size, reserve = self.TABLES[table]
            share, rows = self.share(table), list(getattr(self, attr))
            used = collections.Counter(s.scanner for s in rows)
            while self._claimed(table, used) > size - reserve:
                name = max((n for n in used if used[n] > share), key=lambda n: used[n] - share, default=None)
                if name is None:
                    break
                del rows[max(i for i, s in enumerate(rows) if s.scanner == name)]
                used[name] -= 1
                over.add(name)
            setattr(self, attr, rows)
        return over

    def add_stream_sub(self, sub: StreamSub) -> Optional[str]:
        self.kernel.on_punts()         # compiled indices shift: hand out what matched first
        if sub in self.stream_subs:
            return None
        why = self._room("stream", self.stream_subs, sub)
        if why:
            return why
        self.stream_subs.append(sub)
        self.apply()
        return None

    def add_flow_sub(self, sub: FlowSub) -> Optional[str]:
        if sub in self.flow_subs:
            return None
        why = self._room("flow", self.flow_subs, sub)
        if why:
            return why
        self.flow_subs.append(sub)
        self.apply()
        return None

    def flow_event(self, ev) -> None:
        """Sends one flow event of the fast path to each scanner whose flows subscription
        covers it (one message per scanner, however many of its subscriptions match)."""
        names = {s.scanner for s in self.flow_subs if s.match.matches(ev.proto, ev.initiator, ev.kind)}
        if not names:
            return
        msg = wire.encode_control(flow_message(ev))
        for name in sorted(names):
            sp = self.scanners.get(name)
            if sp is not None and sp.running:
                sp.send_flow(msg)

    def add_sub(self, sub: Sub) -> Optional[str]:
        self.kernel.on_punts()         # compiled indices shift: hand out what matched first
        for s in self.subs:
            if s == sub:
                return None
        why = self._room("frame", self.subs, sub)
        if why:
            return why
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
        self.flow_subs = [s for s in self.flow_subs if s.scanner in old and any(
            s.match.within(r) for r in old[s.scanner].spec.flow_rights)]
        over = self._over_share()
        self.apply()
        for name in sorted(over):
            sp = old.get(name)
            if sp is None:
                continue
            self.kernel.alerts.append(
                self.name, name, "the policy's scanners share this NI's subscription tables anew: "
                "subscriptions past this scanner's share were dropped, and it is restarted to subscribe "
                f"again (share: {self.share('frame')} frame, {self.share('stream')} stream, "
                f"{self.share('flow')} flow subscriptions)")
            sp.kill("its subscriptions exceed its share of the NI's tables after a policy change")
        self.install_signatures()

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
        data = p.data
        held_id = p.id
        needed = set()
        cut = False
        # a scanner whose own ring got the frame saw it: its cover does not stand in for it
        on_ring = {n for n, sp in self.scanners.items() if p.rings and sp.ring_slot_routed is not None
                   and p.rings >> sp.ring_slot_routed & 1}
        for names in covers:
            if not any(n in targets or n in on_ring for n in names) and not self._cover_verdict(names):
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
            deadline = self.kernel.clock() + self.policy.hold_timeout
            self.held[held_id] = Held(needed, deadline)
            self.kernel.hold_deadline = min(self.kernel.hold_deadline, deadline)

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
        self.drain_signatures()
        self.port.set_sigstage(None)
        self.port.clear_policy()

    def deadline(self) -> float:
        """The earliest moment a held frame or stream chunk is owed a decision by."""
        t = min((h.deadline for h in self.held.values()), default=float("inf"))
        if any(sp.ring_slot is not None for sp in self.scanners.values()):
            t = min(t, self.kernel.switch.ring_deadline())   # what scanner rings hold (C)
        for st in self.streams.values():
            for q in st.deadlines.values():
                if q:
                    t = min(t, q[0][1])
        return t

    def owes(self) -> bool:
        """Whether a held frame, or a held stream chunk of a stream not being killed, still
        awaits a decision (by its scanners or, at its deadline, by the policy's default)."""
        return bool(self.held) or any(
            st.closing is None and any(st.deadlines.values()) for st in self.streams.values()) or any(
            sp.ring_owed() for sp in self.scanners.values())

    def held_now(self) -> int:
        """Frames the NI holds now for decisions: those punted here and those on scanner
        rings (the C core holds both)."""
        st = self.port.stats()
        return st["held"] - st["held_passed"] - st["held_cut"]

    def info(self) -> dict:
        sw = self.kernel.switch
        return {"policy": self.policy.source, "subscriptions": len(self.subs),
                "stream_subscriptions": len(self.stream_subs), "streams": len(self.streams),
                "flow_subscriptions": len(self.flow_subs),
                "flows": sw.flow_count(self.port.index),
                "streams_killed": self.streams_killed,
                "tcp_flows": sw.tcp_flows(self.port.index),
                "tcp_bytes": sw.tcp_bytes(self.port.index),
                "held": self.held_now(), "decided_by_timeout": self.decided_by_timeout,
                "scanners_not_ready": sorted(self.covered), "cut_before_ready": self.cut_before_ready,
                "scanners": {n: sp.info() for n, sp in self.scanners.items()},
                "signatures": self.signature_counts()}




def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def flow_message(ev) -> dict:
    """The ``flow`` control message of one fast-path flow event (scanner/wire.py)."""
    body = {"op": "flow", "event": ev.kind, "flow": ev.flow, "family": ev.family,
            "proto": ev.proto, "initiator": "guest" if ev.initiator == 1 else "remote",
            "guest": [_addr(ev.guest_addr), ev.guest_port],
            "remote": [_addr(ev.remote_addr), ev.remote_port],
            "state": list(ev.state), "packets": list(ev.packets), "bytes": list(ev.bytes),
            "start": ev.start_ns / 1e9, "last": ev.last_ns / 1e9, "time": ev.time_ns / 1e9}
    if ev.change:
        body["change"] = ev.change
    if ev.reason:
        body["reason"] = ev.reason
    if ev.icmp_type >= 0:
        body["icmp"] = {"type": ev.icmp_type, "code": ev.icmp_code, "from": _addr(ev.icmp_from)}
    return body


class Kernel:
    """All NI kernels of a daemon; glued to its epoll set by register/unregister."""

    def __init__(self, switch, register: Callable[[int, Callable[[], None]], None],
                 unregister: Callable[[int], None], alert_log: Optional[str],
                 state_dir: Optional[str] = None):
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
        # killed scanner launchers not reaped yet, with the uid each frees once it is gone
        self.dying: list[tuple[subprocess.Popen, Optional[int]]] = []
        self.events: list[Callable[[str, dict], None]] = []
        self.next_deadline = float("inf")
        # The NI clock: what hold deadlines (frames and stream bytes) run on, in seconds.  The
        # system's monotonic clock, or (set_clock) a time someone hands in: offline replay
        # runs the NI on a capture's timestamps.  Scanner lifecycle (restarts, liveness, the
        # readiness grace) stays on the system clock: a hung scanner is killed in real time.
        self.clock: Callable[[], float] = time.monotonic
        self.clock_mode = "system"
        self.hold_deadline = float("inf")    # the earliest hold deadline, on self.clock

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Runs hold deadlines on ``clock`` (seconds, never going back) instead of the system
        clock, and tells scanners started from now on that time is handed in (the SDK's
        ``clock()``/``time()`` then follow the frames' timestamps and ``tick`` messages)."""
        self.clock = clock
        self.clock_mode = "capture"

    def timers(self) -> None:
        """The work the NI clock drives: held frames and stream bytes past their deadline get
        the policy's default, and the C core's TCP timers run (on the switch's clock)."""
        now = self.clock()
        nxt = float("inf")
        for nk in list(self.nis.values()):
            nxt = min(nxt, nk.expire(now))
        self.switch.tcp_housekeeping()          # the rings' hold timeouts too
        for nk in list(self.nis.values()):      # ... alerted (and a hung scanner killed) now
            for sp in list(nk.scanners.values()):
                if sp.running:
                    sp.ring_check()
        self.hold_deadline = min(nxt, min((nk.deadline() for nk in self.nis.values()),
                                          default=float("inf")))

    def tick(self, every: float) -> int:
        """With a handed-in clock: tells each running scanner the time if ``every`` seconds of
        it passed since it was last told (frames carry their own time; a quiet scanner
        learns of time passing only so), so its timed work runs on the same clock as the NI.
        Returns how many were told."""
        now = self.clock()
        n = 0
        for nk in self.nis.values():
            for sp in nk.scanners.values():
                if sp.running and now - sp.last_tick >= every:
                    n += sp.send_tick(now)
        return n

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
        """The kernel's decision on a frame it was punted: a cut is final; a pass lets it go
        once the scanner rings holding it too (if any) passed it."""
        if passed:
            self.switch.decide_held(held_id, True)
        else:
            self.switch.release_held(held_id, False)

    def on_punts(self) -> None:
        sw = self.switch
        for _ in range(4096):
            p = sw.next_punt()
            if p is None:
                break
            nk = self.nis.get(p.port)
            if nk is None:
                if p.id:
                    self.release(p.id, False)
                continue
            nk.punted(p)
        for _ in range(4096):
            ev = sw.next_stream_event()
            if ev is None:
                break
            nk = self.nis.get(ev.port)
            if nk is None:
                if not ev.closed:
                    sw.stream_kill(ev.stream)
                continue
            nk.stream_event(ev)
        for _ in range(4096):
            fev = sw.next_flow_event()
            if fev is None:
                break
            nk = self.nis.get(fev.port)
            if nk is not None:
                nk.flow_event(fev)
        for nk in self.nis.values():
            if nk.policy.signatures is not None:
                nk.drain_signatures()
        self._update_deadline()

    def _update_deadline(self) -> None:
        self.hold_deadline = min((nk.deadline() for nk in self.nis.values()), default=float("inf"))
        # hold deadlines are on self.clock: the loop waits for them only when that is its own clock
        holds = self.hold_deadline if self.clock is time.monotonic else float("inf")
        self.next_deadline = min(holds, self._restarts_due())

    def _restarts_due(self) -> float:
        """When the earliest scanner restart is due (or a scanner whose socket closed is to be
        killed, ScannerProc.lost): the loop wakes for it, so the delay a restart alert states
        is the one taken (not rounded up to the housekeeping tick)."""
        return min((sp.next_start if sp.state == "restarting" else sp.lost[0]
                    for nk in self.nis.values() for sp in nk.scanners.values()
                    if sp.state == "restarting" or (sp.running and sp.lost is not None)),
                   default=float("inf"))

    def reap_later(self, proc: subprocess.Popen, uid: Optional[int]) -> None:
        """A killed scanner's launcher that has not exited yet: housekeeping reaps it (and
        frees its uid) once it has, so no wait for it stalls the data plane."""
        self.dying.append((proc, uid))

    def _reap_dying(self, wait: float = 0.0) -> None:
        left = []
        for proc, uid in self.dying:
            try:
                gone = proc.wait(timeout=wait) if wait else proc.poll()
            except subprocess.TimeoutExpired:
                gone = None
            if gone is None:
                left.append((proc, uid))
            elif uid is not None:
                self.uids.give(uid)
        self.dying = left

    def housekeeping(self, timers: bool = True) -> None:
        """Periodic work: alert log retries, reaping, scanner lifecycle, checkpoints and (unless
        ``timers`` is False: replay on a capture's clock runs them itself) :meth:`timers`."""
        self.alerts.retry()
        self._reap_dying()
        if timers:
            self.timers()
        now = time.monotonic()
        for nk in list(self.nis.values()):
            for sp in list(nk.scanners.values()):
                sp.poll(now)
                if sp.outq:
                    sp.flush()
            nk.check_ready(now)
            nk.note_midstream(now)
        self.checkpoints.flush()
        holds = self.hold_deadline if self.clock is time.monotonic else float("inf")
        self.next_deadline = min(holds, self._restarts_due())

    def close(self) -> None:
        for idx in list(self.nis):
            self.detach(idx)
        self._reap_dying(wait=5.0)          # shutting down: no frames to move any more
        if self.dying:
            log.error("%d scanner launchers did not exit after SIGKILL", len(self.dying))
        self.checkpoints.flush(force=True)
        self.alerts.close()
