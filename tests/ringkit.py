"""A scanner's end of a ring (csrc/vnring.h) written from the ABI alone, with no SDK: tests
drive the NI's side (csrc/ring.c) with it, well-behaved or hostile (it writes any value it
likes into region B)."""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

NI_HDR = struct.Struct("<IIIIQQQQQQ")
DESC = struct.Struct("<QQIIBBB5x")
DEC = struct.Struct("<QII")
DEC_OFF = 256
HELD = 1


@dataclass
class Desc:
    seq: int
    time_ns: int
    data: int
    len: int
    kind: int
    dir: int
    flags: int

    @property
    def held(self) -> bool:
        return bool(self.flags & HELD)


class RawRing:
    def __init__(self, info: dict):
        self.info = info
        self.a = mmap.mmap(info["ni_fd"], 0, mmap.MAP_SHARED, mmap.PROT_READ)
        (self.magic, self.version, self.desc_slots, self.dec_slots, self.desc_off, self.data_off,
         self.data_size, self.size, self.sc_size, _) = NI_HDR.unpack_from(self.a, 0)
        self.b = mmap.mmap(info["sc_fd"], self.sc_size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        # index words are loaded and stored whole, through casts: struct.pack_into zeroes a
        # field before writing it, and the NI would catch the torn index
        self.aq, self.ai = self._words(self.a)
        self.bq, self.bi = self._words(self.b)
        self.seen = 0            # descriptors read
        self.dec_prod = 0

    @staticmethod
    def _words(m) -> tuple:
        head = memoryview(m)[:256]
        return head.cast("Q"), head.cast("I")

    # NI words
    @property
    def desc_prod(self) -> int:
        return self.aq[64 // 8]

    @property
    def dec_cons(self) -> int:
        return self.aq[128 // 8]

    @property
    def ni_want_kick(self) -> int:
        return self.ai[192 // 4]

    @property
    def broken(self) -> int:
        return self.ai[196 // 4]

    # reading
    def desc(self, seq: int) -> Desc:
        off = self.desc_off + DESC.size * (seq & (self.desc_slots - 1))
        return Desc(*DESC.unpack_from(self.a, off))

    def data(self, d: Desc) -> bytes:
        start = self.data_off + d.data
        return bytes(self.a[start:start + d.len])

    def poll(self) -> list[Desc]:
        prod = self.desc_prod
        got = [self.desc(q) for q in range(self.seen, prod)]
        self.seen = prod
        return got

    # scanner words (any value: hostile tests write nonsense on purpose)
    def set_desc_cons(self, v: int) -> None:
        self.bq[0] = v

    def set_dec_prod(self, v: int) -> None:
        self.bq[64 // 8] = v
        self.dec_prod = v

    def set_want_kick(self, v: int) -> None:
        self.bi[128 // 4] = v

    def write_dec(self, index: int, seq: int, verdict: int) -> None:
        struct.pack_into("<QII", self.b, DEC_OFF + DEC.size * (index & (self.dec_slots - 1)),
                         seq, verdict, 0)

    def decide(self, *pairs) -> None:
        """Publishes decisions (seq, verdict) ... in one batch."""
        for seq, verdict in pairs:
            self.write_dec(self.dec_prod, seq, verdict)
            self.dec_prod += 1
        self.set_dec_prod(self.dec_prod)

    def consume(self, upto: int | None = None) -> None:
        self.set_desc_cons(self.seen if upto is None else upto)

    def kicks_pending(self) -> int:
        try:
            return os.eventfd_read(self.info["kick_scanner_fd"])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for w in (self.aq, self.ai, self.bq, self.bi):
            w.release()
        self.a.close()
        self.b.close()


# ---- stream descriptors (kinds 2..5): a struct vnr_stream heads their bytes
STREAM_HDR = struct.Struct("<QQII8x")
STREAM_OPEN = struct.Struct("<BBBBB3xHHHxx16s16s")
OPEN, DATA, END, CLOSE = 2, 3, 4, 5
STREAM_PASS = 0x10


@dataclass
class StreamDesc:
    desc: Desc
    stream: int
    offset: int
    handle: int
    reason: int
    payload: bytes
    open: dict | None = None


def stream_desc(ring: RawRing, d: Desc) -> StreamDesc:
    raw = ring.data(d)
    stream, offset, handle, reason = STREAM_HDR.unpack_from(raw, 0)
    body, info = raw[STREAM_HDR.size:], None
    if d.kind == OPEN:
        fam, client, read, held, mid, gp, rp, sp, ga, ra = STREAM_OPEN.unpack_from(body, 0)
        info = {"family": fam, "client": client, "read": read, "held": held, "midstream": mid,
                "guest_port": gp, "remote_port": rp, "server_port": sp,
                "guest_addr": ga[:4] if fam == 4 else ga, "remote_addr": ra[:4] if fam == 4 else ra}
        body = b""
    return StreamDesc(d, stream, offset, handle, reason, body, info)


def stream_pass(ring: RawRing, handle: int, direction: int, upto: int) -> None:
    """Publishes one stream pass (VNR_STREAM_PASS | direction up to ``upto``)."""
    ring.write_dec(ring.dec_prod, upto, STREAM_PASS | direction)
    struct.pack_into("<I", ring.b, DEC_OFF + DEC.size * (ring.dec_prod & (ring.dec_slots - 1)) + 12, handle)
    ring.set_dec_prod(ring.dec_prod + 1)
