"""The stream brokerage: reconstructed TCP streams between the fast path and the scanners.

The fast path (csrc/tcp.c) reports streams that opened, grew or closed; each new stream is
announced to the scanners whose stream subscriptions matched it, its in-order bytes are read
from the held frames and sent to them, and a held direction moves on as far as every contain
scanner passed it (see kernel.py's docstring).  StreamBroker holds these methods of NIKernel,
which inherits them: they work on its scanners, policy and streams.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import time
from typing import Optional

from .fastpath import strerror
from .scanner import wire

log = logging.getLogger("vhostni.kernel")    # the kernel's logger, as before this module split

STREAM_CHUNK = 65536       # bytes of one stream-data message at most
CLOSE_REASONS = {1: "fin", 2: "rst", 3: "killed", 4: "idle", 5: "bypass", 6: "gone"}
DIR_NAMES = {1: "from_guest", 2: "to_guest"}


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



class StreamBroker:
    """NIKernel's stream methods (a mixin: NIKernel holds the state they use)."""

    def stream_event(self, ev) -> None:
        """A stream opened, grew or closed in the fast path (one vn_stream_event)."""
        sid = ev.stream
        st = self.streams.get(sid)
        if ev.opened:
            st = self._stream_open(ev)
        if st is None:
            # not ours (opened under another kernel): nobody will read or decide it
            if not ev.closed:
                self.kernel.switch.stream_kill(sid)
            return
        if st.closing is None:
            for i, d in ((0, 1), (1, 2)):
                if ev.read[i]:
                    self._stream_data(st, d, ev.avail[i], ev.eof[i])
        if ev.closed:
            reason = st.closing or CLOSE_REASONS.get(ev.reason, "closed")
            self._stream_closed(st, reason)

    def _stream_open(self, ev) -> Optional[KStream]:
        g = str(ipaddress.ip_address(ev.guest_addr))
        r = str(ipaddress.ip_address(ev.remote_addr))
        client = "guest" if ev.client == 1 else "remote"
        server_port = ev.remote_port if client == "guest" else ev.guest_port
        st = KStream(ev.stream, {"family": ev.family, "client": client,
                                      "guest": [g, ev.guest_port], "remote": [r, ev.remote_port],
                                      "port": server_port, "midstream": ev.midstream})
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
        sw = self.kernel.switch
        start = st.read_off[d]
        while st.read_off[d] < avail:
            data = sw.stream_read(st.id, d, st.read_off[d])
            if not data:
                break
            n = len(data)
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
            sw.stream_consume(st.id, d, st.read_off[d])
            if st.hold_dirs & d and st.read_off[d] > st.released[d]:
                deadline = self.kernel.clock() + self.policy.hold_timeout
                st.deadlines[d].append((st.read_off[d], deadline))
                self.kernel.hold_deadline = min(self.kernel.hold_deadline, deadline)
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
        sw = self.kernel.switch
        for d in (1, 2):
            if not st.hold_dirs & d:
                continue
            holders = st.holders_of(d)
            upto = min((st.passed.get((n, d), 0) for n in holders), default=wire.PASS_ALL)
            if upto > st.released[d]:
                st.released[d] = upto
                sw.stream_pass(st.id, d, upto)
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
            self.kernel.switch.stream_kill(st.id)

    def _ring_part(self, scanner: str, sid: int) -> Optional[dict]:
        """The part of ``scanner``'s ring in stream ``sid`` (streams on its ring are not
        brokered here: the C core keeps who holds what and how far each passed)."""
        sp = self.scanners.get(scanner)
        return sp.ring_part(sid) if sp is not None else None

    def stream_pass(self, scanner: str, sid: int, d: int, upto: int) -> None:
        st = self.streams.get(sid)
        if st is None or scanner not in st.readers:
            part = self._ring_part(scanner, sid)
            if part is not None and part["hold"] & d:
                self.kernel.switch.stream_ring_pass(sid, self.port.index,
                                                    self.scanners[scanner].ring_slot, d, upto)
            return
        if st.closing is not None or not st.holders.get(scanner, 0) & d:
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
        if st is None or scanner not in st.readers:
            part = self._ring_part(scanner, sid)
            if part is not None:
                if not part["hold"]:
                    sp.counters.refused += 1
                    sp._alert_about(f"scanner asked to {how} a stream it has no contain rights on",
                                    stream=sid)
                    return
                self.streams_killed += 1
                self.kernel.switch.stream_kill(sid)
                return
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
        if st is None or scanner not in st.readers:
            part = self._ring_part(scanner, sid)
            if part is not None:
                if not part["hold"] & d:
                    self.scanners[scanner]._alert_about(
                        f"scanner asked to {how} a stream it has no contain rights on",
                        stream=sid, direction=DIR_NAMES[d])
                    return f"no contain rights on {DIR_NAMES[d]} of stream {sid}"
                i = 0 if d == 1 else 1
                if offset < part["passed"][i]:
                    return f"offset {offset} is before what this scanner passed ({part['passed'][i]})"
                if offset < part["released"][i]:
                    return f"offset {offset} is before what the NI already let go ({part['released'][i]})"
                return None
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
        return f"{how} refused by the fast path: {strerror(rc)}"

    def stream_cut(self, scanner: str, sid: int, d: int, offset: int, length: int) -> Optional[str]:
        """Drops bytes [offset, offset+length) of direction ``d``: None, or why not.  A cut
        is also the scanner's decision on those bytes, so it counts as its pass of them."""
        err = self._stream_uneditable(scanner, "cut", sid, d, offset)
        if err is not None:
            return err
        rc = self.kernel.switch.stream_cut(sid, d, offset, offset + length)
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
        rc = self.kernel.switch.stream_inject(sid, d, offset, data)
        return self._edit_error("inject", rc) if rc < 0 else None

    def stream_more(self, scanner: str, sid: int, d: Optional[int]) -> None:
        """A decision of ``scanner`` on direction ``d`` (None: each it holds) needs bytes
        beyond the receiver's window: the fast path acknowledges the held bytes on the
        receiver's behalf until the scanner passes beyond what had arrived."""
        st = self.streams.get(sid)
        held = st.holders.get(scanner, 0) if st is not None and st.closing is None else 0
        if not held and (st is None or scanner not in st.readers):
            part = self._ring_part(scanner, sid)
            held = part["hold"] if part is not None else 0
            if held:
                for dd in (1, 2):
                    if held & dd and (d is None or d == dd):
                        self.kernel.switch.stream_more(sid, dd)
            return
        if not held:
            return
        st.more[scanner] = st.more.get(scanner, 0) + 1
        for dd in (1, 2):
            if held & dd and (d is None or d == dd):
                self.kernel.switch.stream_more(sid, dd)

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
