"""TCP for stream tests: correct (or deliberately broken) TCP/IP frames, a simulated
connection between two Kit guests, and an in-process stand-in for the NI kernel's stream
side (``Engine``) that drives the C reassembly engine directly.

A ``Conn`` is a TCP connection between simulated guests of a ``nikit.Kit``: it builds the
segments each end would send (sequence and acknowledgement numbers from the shadow state
it keeps, real checksums) and sends them through the Kit; ``parse`` takes received frames
apart again.  Offsets are stream offsets: 0 is the first byte after the SYN.

``Engine`` installs a compiled policy with stream subscriptions on one NI of a Kit's daemon
and takes over the punt queue: it records every stream event, reads each stream's
in-order bytes through ``vn_stream_read`` (as the kernel does) and passes or kills on the
test's command (or passes everything with ``auto_pass``).
"""
from __future__ import annotations

import socket
import time
import struct
from dataclasses import dataclass, field
from typing import Optional

from nikit import IPS, IP6S, MACS, Kit

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
FROM_GUEST, TO_GUEST = 1, 2


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_header(src: str, dst: str, proto: int, length: int, ident: int = 1, frag: int = 0x4000,
                ttl: int = 64, bad_csum: bool = False) -> bytes:
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, ident, frag, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    c = checksum(h) ^ (0x5555 if bad_csum else 0)
    return h[:10] + struct.pack("!H", c) + h[12:]


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
                win: int = 65535, payload: bytes = b"", options: bytes = b"", urg: int = 0,
                family: int = 4, bad_csum: bool = False) -> bytes:
    """A TCP header + payload with its checksum for the given IP addresses."""
    options += b"\0" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 4,
                      flags, win, 0, urg) + options
    seg = hdr + payload
    if family == 4:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                  + struct.pack("!IxxxB", len(seg), 6))
    c = checksum(pseudo + seg) ^ (0x00FF if bad_csum else 0)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


@dataclass
class Seg:
    """A received TCP segment, taken apart."""
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    win: int
    urg: int
    payload: bytes
    csum_ok: bool
    frame: bytes

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


def parse(frame: bytes) -> Optional[Seg]:
    """A TCP segment from an Ethernet frame (IPv4 or IPv6, no extension headers)."""
    et = struct.unpack_from("!H", frame, 12)[0]
    if et == 0x0800:
        ihl = (frame[14] & 15) * 4
        tot = struct.unpack_from("!H", frame, 16)[0]
        if frame[23] != 6:
            return None
        ip = frame[14:14 + tot]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        seg = ip[ihl:]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    elif et == 0x86DD:
        plen = struct.unpack_from("!H", frame, 18)[0]
        if frame[20] != 6:
            return None
        ip = frame[14:14 + 40 + plen]
        src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
        seg = ip[40:]
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(seg), 6)
    else:
        return None
    sport, dport, seq, ack, off, flags, win, _, urg = struct.unpack_from("!HHIIBBHHH", seg)
    return Seg(src, dst, sport, dport, seq, ack, flags, win, urg, seg[(off >> 4) * 4:],
               checksum(pseudo + seg) == 0, frame)


def segments(frames) -> list[Seg]:
    return [s for s in (parse(f) for f in frames) if s is not None]


def payload_of(frames) -> bytes:
    return b"".join(s.payload for s in segments(frames))


@dataclass
class End:
    name: str
    port: int
    isn: int
    wscale: Optional[int] = None
    sent: int = 0            # offset of the next new byte this end sends
    fin_sent: bool = False


class Conn:
    """A TCP connection from guest ``client`` to ``server`` (the Kit's a and b), IPv4 or 6."""

    def __init__(self, kit: Kit, client: str = "a", server: str = "b", cport: int = 40000,
                 sport: int = 25, cisn: int = 1000, sisn: int = 900000, family: int = 4,
                 cwscale: Optional[int] = None, swscale: Optional[int] = None, win: int = 65535):
        self.kit = kit
        self.family = family
        self.win = win
        self.ends = {client: End(client, cport, cisn, cwscale), server: End(server, sport, sisn, swscale)}
        self.client, self.server = client, server

    def other(self, name: str) -> End:
        return self.ends[self.server if name == self.client else self.client]

    def seq(self, name: str, off: int) -> int:
        return (self.ends[name].isn + 1 + off) & 0xFFFFFFFF

    def ack_of(self, name: str) -> int:
        """What ``name`` acknowledges by default: everything the other end sent."""
        o = self.other(name)
        return self.seq(o.name, o.sent + (1 if o.fin_sent else 0))

    def segment(self, frm: str, flags: int = ACK, payload: bytes = b"", off: Optional[int] = None,
                seq: Optional[int] = None, ack: Optional[int] = None, win: Optional[int] = None,
                options: bytes = b"", urg: int = 0, bad_tcp_csum: bool = False,
                bad_ip_csum: bool = False, frag: Optional[int] = None) -> bytes:
        """One frame from ``frm``; ``off`` (stream offset) or ``seq`` places it (default:
        the next new byte); it acknowledges everything unless ``ack`` says otherwise."""
        me, peer = self.ends[frm], self.other(frm)
        if seq is None:
            seq = self.seq(frm, me.sent if off is None else off)
        if ack is None:
            ack = self.ack_of(frm) if flags & ACK else 0
        fam = self.family
        src = (IPS if fam == 4 else IP6S)[frm]
        dst = (IPS if fam == 4 else IP6S)[peer.name]
        seg = tcp_segment(src, dst, me.port, peer.port, seq, ack, flags,
                          self.win if win is None else win, payload, options, urg, fam, bad_tcp_csum)
        if fam == 4:
            ip = ipv4_header(src, dst, 6, len(seg), frag=0x4000 if frag is None else frag,
                             bad_csum=bad_ip_csum) + seg
            return eth(MACS[peer.name], MACS[frm], 0x0800, ip)
        ip = (struct.pack("!IHBB", 6 << 28, len(seg), 6, 64) + socket.inet_pton(socket.AF_INET6, src)
              + socket.inet_pton(socket.AF_INET6, dst) + seg)
        return eth(MACS[peer.name], MACS[frm], 0x86DD, ip)

    def data(self, frm: str, payload: bytes, off: Optional[int] = None, flags: int = ACK | PSH,
             advance: bool = True, **kw) -> bytes:
        """A data segment; with ``advance`` (and no ``off`` behind the send point) the
        sender's next offset moves past it."""
        me = self.ends[frm]
        o = me.sent if off is None else off
        f = self.segment(frm, flags, payload, off=o, **kw)
        if advance and o + len(payload) > me.sent:
            me.sent = o + len(payload)
        if flags & FIN:
            me.fin_sent = True
        return f

    def syn(self, **kw) -> bytes:
        c = self.ends[self.client]
        opts = b"\x01\x03\x03" + bytes([c.wscale]) if c.wscale is not None else b""
        kw.setdefault("seq", c.isn)
        kw.setdefault("ack", 0)
        return self.segment(self.client, SYN, options=opts, **kw)

    def synack(self, **kw) -> bytes:
        s = self.ends[self.server]
        opts = b"\x01\x03\x03" + bytes([s.wscale]) if s.wscale is not None else b""
        kw.setdefault("ack", (self.ends[self.client].isn + 1) & 0xFFFFFFFF)
        kw.setdefault("seq", s.isn)
        return self.segment(self.server, SYN | ACK, options=opts, **kw)

    def open(self) -> None:
        """The three-way handshake through the NI; each segment must get through."""
        k = self.kit
        for frm, frame in ((self.client, self.syn()), (self.server, self.synack()),
                           (self.client, self.segment(self.client, ACK))):
            to = self.other(frm).name
            k.send(frm, frame)
            got = k.recv(to, 2.0, 1)
            assert got == [frame], f"handshake segment from {frm} did not get through: {got}"

    def send(self, frm: str, *frames: bytes) -> None:
        self.kit.send(frm, *frames)

    def recv(self, name: str, wait: float = 0.3, count: int = 1000) -> list[Seg]:
        return segments(self.kit.recv(name, wait, count))


# ---------------------------------------------------------------------------
# Engine: the NI kernel's stream side, in-process
# ---------------------------------------------------------------------------

@dataclass
class EStream:
    id: int
    event: dict
    data: dict = field(default_factory=lambda: {FROM_GUEST: bytearray(), TO_GUEST: bytearray()})
    eof: dict = field(default_factory=lambda: {FROM_GUEST: False, TO_GUEST: False})
    closed: Optional[int] = None


class Engine:
    """Stream subscriptions installed straight into the fast path of NI ``ni``; the test
    plays the NI kernel: ``streams`` holds what was read, ``pass_``/``kill`` decide."""

    def __init__(self, kit: Kit, ni: str = "a", subs=((25, "both", True),), auto_pass: bool = False,
                 ring_subs=(), ring_slots: int = 4096, **ni_keys):
        from vhostni._fastpath import ffi, lib
        from vhostni.policy import DIRECTIONS, StreamMatch, parse_policy
        self.kit, self.ffi, self.lib = kit, ffi, lib
        d = kit.daemon
        self.port = d.nis[ni].port
        self.sw = d.switch._sw
        pol = parse_policy({"ni": dict(ni_keys)})
        self.policy = pol
        stream_subs, rings = [], []
        # ring_subs: stream subscriptions of a scanner ring (the test reads it: self.ring)
        self.ring_slot = d.switch.ring_open(self.port.index, ring_slots) if ring_subs else None
        for k, (port, direction, contain) in enumerate(list(subs) + list(ring_subs)):
            lo, hi = (port, port) if isinstance(port, int) else port
            dirs = DIRECTIONS[direction]
            stream_subs.append((StreamMatch((lo, hi), 0 if dirs == 3 else dirs), contain))
            rings.append(self.ring_slot + 1 if k >= len(subs) else 0)
        self.cpol = pol.compile([], stream_subs, stream_sub_rings=rings)
        self.port.set_policy(self.cpol)
        d._handlers[d.switch.punt_fd] = self.on_punts
        self.auto_pass = auto_pass
        self.streams: dict[int, EStream] = {}
        self.events: list[dict] = []
        self._ev = ffi.new("struct vn_stream_event *")
        self._punt = ffi.new("struct vn_punt *")
        self._ptr = ffi.new("const uint8_t **")

    def on_punts(self) -> None:
        lib, sw = self.lib, self.sw
        while lib.vn_punt_next(sw, self._punt):
            if self._punt.id:
                lib.vn_held_release(sw, self._punt.id, 1)
        ev = self._ev
        while lib.vn_stream_next(sw, ev):
            e = {"stream": ev.stream, "what": ev.what, "reason": ev.reason, "client": ev.client,
                 "subs": ev.subs, "avail": (ev.avail[0], ev.avail[1]), "eof": (ev.eof[0], ev.eof[1]),
                 "read": (ev.read[0], ev.read[1]), "hold": (ev.hold[0], ev.hold[1]),
                 "guest_port": ev.guest_port, "remote_port": ev.remote_port, "family": ev.family,
                 "midstream": ev.midstream}
            self.events.append(e)
            st = self.streams.get(ev.stream)
            if ev.what & lib.VN_STREAM_OPEN:
                st = self.streams[ev.stream] = EStream(ev.stream, e)
            if st is None:
                continue
            for i, d in ((0, FROM_GUEST), (1, TO_GUEST)):
                buf = st.data[d]
                while len(buf) < ev.avail[i]:
                    n = lib.vn_stream_read(sw, ev.stream, d, len(buf), self._ptr)
                    if n <= 0:
                        break
                    buf += self.ffi.buffer(self._ptr[0], n)[:]
                lib.vn_stream_consume(sw, ev.stream, d, len(buf))
                st.eof[d] = bool(ev.eof[i])
                if self.auto_pass and ev.hold[i]:
                    lib.vn_stream_pass(sw, ev.stream, d, len(buf))
            if ev.what & lib.VN_STREAM_CLOSED:
                st.closed = ev.reason

    # ---- the test's decisions
    def only(self) -> EStream:
        assert len(self.streams) == 1, self.streams
        return next(iter(self.streams.values()))

    def pass_(self, direction: int, upto: int, stream: Optional[int] = None) -> int:
        sid = stream if stream is not None else self.only().id
        rc = self.lib.vn_stream_pass(self.sw, sid, direction, upto)
        self.kit.step()
        return rc

    def kill(self, stream: Optional[int] = None) -> int:
        sid = stream if stream is not None else self.only().id
        rc = self.lib.vn_stream_kill(self.sw, sid)
        self.kit.step()
        return rc

    def cut(self, direction: int, start: int, end: int, stream: Optional[int] = None) -> int:
        sid = stream if stream is not None else self.only().id
        rc = self.lib.vn_stream_cut(self.sw, sid, direction, start, end)
        self.kit.step()
        return rc

    def inject(self, direction: int, at: int, data: bytes, stream: Optional[int] = None) -> int:
        sid = stream if stream is not None else self.only().id
        rc = self.lib.vn_stream_inject(self.sw, sid, direction, at, data, len(data))
        self.kit.step()
        return rc

    def more(self, direction: int, stream: Optional[int] = None) -> int:
        sid = stream if stream is not None else self.only().id
        rc = self.lib.vn_stream_more(self.sw, sid, direction)
        self.kit.step()
        return rc

    def housekeeping(self) -> None:
        self.lib.vn_tcp_housekeeping(self.sw)
        self.kit.step()

    def advance(self, seconds: float) -> None:
        """Moves the switch's clock on by ``seconds`` without waiting for them: from the first
        call on, the switch runs on a clock handed in (vn_switch_set_clock), starting from
        the system's monotonic clock (the one it read until then)."""
        now = getattr(self, "_clock_ns", 0) or time.monotonic_ns()
        self._clock_ns = now + int(seconds * 1e9)
        assert self.lib.vn_switch_set_clock(self.sw, self._clock_ns) == 0

    def stat(self, name: str) -> int:
        return int(self.port.stats()[name])

    def flows(self) -> int:
        return self.lib.vn_tcp_flows(self.sw, self.port.index)

    def bytes_kept(self) -> int:
        return int(self.lib.vn_tcp_bytes(self.sw, self.port.index))
