"""The scanner's side of the shared-memory rings (csrc/vnring.h is the ABI; read it first).

The NI kernel hands a scanner four file descriptors ($VHOSTNI_RING_FDS =
"ni,sc,kick_scanner,kick_ni"): region A (the NI's header, the descriptor ring and the
bytes of the frames this scanner's subscriptions matched: a sealed memfd the scanner can
only map read-only), region B (the scanner's words and its decision ring), and two
eventfds.  :class:`Ring` maps both regions, validates the NI's header, and turns
descriptors into :class:`RingFrame` objects whose ``data`` is a memoryview into region A:
no copy.  Decisions are buffered and published in batches.  The Scanner class
(``vhostni.scanner``) drives it; a scanner rarely needs this module directly.

Memory ordering: every shared word is one naturally aligned 4- or 8-byte location, read
and written with a single ``struct`` access on the mapping (one load or store).  The SDK
targets x86-64, whose memory model (TSO) makes every load an acquire and every store a
release; the one reordering TSO allows, a later load passing an earlier store, is what
the want_kick protocol must forbid, so :func:`full_barrier` issues a locked instruction
(glibc's ``pthread_spin_trylock`` on x86-64 is one ``lock cmpxchg``, executed whether or not
it takes the lock: a full barrier, and no system call, so it works under the lockdown)
between the store that publishes and the load of the other side's want_kick.  Elsewhere Ring raises
ScannerError rather than run without the barrier.

Nothing the NI wrote is trusted to be sane: a header or descriptor that points outside
the region, indices that jump, a slot count that is not a power of two, all raise
ScannerError (the NI is not the attacker here, but a scanner must fail clearly, never
crash or read outside what it mapped).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct
import time
from dataclasses import dataclass
from typing import Optional

from .wire import CUT, FROM_GUEST, PASS, TO_GUEST, Frame

ENV = "VHOSTNI_RING_FDS"
MAGIC = 0x31524E56                  # "VNR1"
VERSION = 1
KIND_FRAME = 1
KIND_STREAM_OPEN, KIND_STREAM_DATA, KIND_STREAM_END, KIND_STREAM_CLOSE = 2, 3, 4, 5
STREAM_PASS = 0x10                  # verdict of a stream pass: STREAM_PASS | direction
F_HELD = 1
DATA_ALIGN = 64
BROKEN = {0: "none", 1: "desc_cons went back or past desc_prod",
          2: "dec_prod went back or more than dec_slots ahead",
          3: "a decision for a descriptor never given", 4: "a verdict neither pass nor cut"}

# struct vnr_ni: the first 64 bytes (fixed at start), then the NI's running words
NI_HEAD = struct.Struct("<IIIIQQQQQQ")
NI_SIZE = 256                       # sizeof(struct vnr_ni)
NI_DESC_PROD = 64
NI_DEC_CONS = 128
NI_WANT_KICK = 192
NI_BROKEN = 196
# struct vnr_desc
DESC = struct.Struct("<QQIIBBB5x")
# struct vnr_sc and the decision ring
SC_DESC_CONS = 0
SC_DEC_PROD = 64
SC_WANT_KICK = 128
DEC_OFF = 256
DEC = struct.Struct("<QII")           # seq (a stream pass: the offset), verdict, handle
# struct vnr_stream (the head of a stream descriptor's bytes) and struct vnr_stream_open
STREAM_HDR = struct.Struct("<QQII8x")
STREAM_OPEN = struct.Struct("<BBBBB3xHHHxx16s16s")
CLOSE_REASONS = {1: "fin", 2: "rst", 3: "killed", 4: "idle", 5: "bypass", 6: "gone", 7: "overrun"}
U64 = struct.Struct("<Q")           # for eventfd counters and records, never for index words
U32 = struct.Struct("<I")
MAX_SLOTS = 1 << 24                 # sanity bound on a header's slot counts
assert NI_HEAD.size == 64 and DESC.size == 32 and DEC.size == 16


@dataclass(frozen=True)
class RingStream:
    """A stream descriptor (kinds 2..5): which stream (the NI's id, and the ring's handle
    its passes name), the offset, and for DATA a read-only view of the bytes; for OPEN the
    connection (``info``); for CLOSE the reason."""
    seq: int
    kind: int
    direction: int
    held: bool
    time: float
    stream: int
    handle: int
    offset: int
    data: memoryview
    reason: str = ""
    info: Optional[dict] = None


class RingError(Exception):
    """A ring the NI handed over is unusable (the SDK reports it as ScannerError)."""


class RingUnsupported(RingError):
    """This machine cannot run the SDK's side of a ring: frames stay on the socket."""


@dataclass(frozen=True)
class RingFrame(Frame):
    """A frame delivered on the ring: ``data`` is a read-only memoryview into region A,
    valid until the scanner asks for its next event (or next batch); ``bytes(frame.data)``
    keeps a copy.  ``number`` is the descriptor's seq, which its decision names."""


_barrier_lock = ctypes.c_int(0)
_libc = ctypes.CDLL(None)


def full_barrier() -> None:
    """A full memory barrier (x86-64: a locked instruction, via glibc's spin lock)."""
    _libc.pthread_spin_trylock(ctypes.byref(_barrier_lock))
    _libc.pthread_spin_unlock(ctypes.byref(_barrier_lock))


class Words:
    """Single-copy-atomic loads and stores of a region's index words (64-bit at multiples
    of 8, 32-bit at multiples of 4, within the first ``span`` bytes).

    ``struct.pack_into`` cannot be used for a word the other side reads concurrently: it
    zeroes the field before it writes it (and the standard-size codes go byte by byte),
    so the NI could read an index of 0, or half of one, and rightly break the ring.  A
    memoryview cast to ``Q``/``I`` loads and stores each element with one aligned move."""

    def __init__(self, buf, span: int):
        head = memoryview(buf)[:span]
        self._q = head.cast("Q")
        self._i = head.cast("I")
        head.release()

    def u64(self, off: int) -> int:
        return self._q[off >> 3]

    def set_u64(self, off: int, value: int) -> None:
        self._q[off >> 3] = value

    def u32(self, off: int) -> int:
        return self._i[off >> 2]

    def set_u32(self, off: int, value: int) -> None:
        self._i[off >> 2] = value

    def release(self) -> None:
        self._q.release()
        self._i.release()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_fds(value: str) -> tuple[int, int, int, int]:
    """The four descriptors of $VHOSTNI_RING_FDS ("ni,sc,kick_scanner,kick_ni")."""
    try:
        fds = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise RingError(f"${ENV} is not four descriptor numbers: {value!r}") from None
    if len(fds) != 4 or any(fd < 0 for fd in fds):
        raise RingError(f"${ENV} is not four descriptor numbers: {value!r}")
    return fds  # type: ignore[return-value]


class Ring:
    """Both regions of one scanner's ring, mapped, with the scanner's cursors.

    ``poll()`` returns the frames published since the last poll; ``consume(upto)`` gives
    back the bytes of descriptors below ``upto``; ``decide(seq, verdict)`` buffers a
    decision and ``flush()`` publishes the buffered ones; ``wait(timeout, fds)`` sleeps
    until the NI publishes more (or one of ``fds`` is readable)."""

    DEC_WAIT = 5.0          # seconds flush() waits for the NI to read a full decision ring
    SPIN = 20e-6            # seconds wait() looks for descriptors before it sleeps

    def __init__(self, fds: tuple[int, int, int, int]):
        if platform.machine() != "x86_64":
            raise RingUnsupported(f"the rings need x86-64's memory model (this is {platform.machine()})")
        self.fd_ni, self.fd_sc, self.kick_scanner, self.kick_ni = fds
        self.a: Optional[mmap.mmap] = None
        self.b: Optional[mmap.mmap] = None
        try:
            self._map()
        except BaseException:
            self.close()
            raise
        self.polled = self.wb.u64(SC_DESC_CONS)    # next descriptor to read
        self.consumed = self.polled
        self.dec_prod = self.wb.u64(SC_DEC_PROD)
        self.decisions: list = []         # (seq, verdict, handle) not yet written
        self.streams = False              # the kernel puts our streams on the ring too
        self.kicks_sent = 0
        self.waits = 0

    def _map(self) -> None:
        try:
            size_a = os.fstat(self.fd_ni).st_size
            size_b = os.fstat(self.fd_sc).st_size
        except OSError as exc:
            raise RingError(f"cannot stat the ring's regions: {exc}") from None
        if size_a < NI_SIZE:
            raise RingError(f"region A of {size_a} bytes is smaller than its header")
        try:
            self.a = mmap.mmap(self.fd_ni, size_a, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise RingError(f"cannot map region A: {exc}") from None
        (magic, version, self.desc_slots, self.dec_slots, self.desc_off, self.data_off,
         self.data_size, size, self.sc_size, _) = NI_HEAD.unpack_from(self.a, 0)
        if magic != MAGIC:
            raise RingError(f"bad ring magic {magic:#x}")
        if version != VERSION:
            raise RingError(f"ring version {version}, this SDK speaks {VERSION}")
        for name, n in (("desc_slots", self.desc_slots), ("dec_slots", self.dec_slots)):
            if not _is_pow2(n) or n > MAX_SLOTS:
                raise RingError(f"{name} {n} is not a power of two up to {MAX_SLOTS}")
        if size > size_a:
            raise RingError(f"region A's header says {size} bytes, the memfd has {size_a}")
        if self.desc_off < NI_SIZE or self.desc_off % 8 or self.desc_off + self.desc_slots * DESC.size > size:
            raise RingError(f"descriptor ring at {self.desc_off} does not fit region A")
        if self.data_off < NI_SIZE or self.data_off + self.data_size > size:
            raise RingError(f"data area [{self.data_off}, +{self.data_size}) does not fit region A")
        if self.sc_size < DEC_OFF + self.dec_slots * DEC.size or self.sc_size > size_b:
            raise RingError(f"region B of {self.sc_size} bytes (memfd {size_b}) cannot hold "
                            f"{self.dec_slots} decisions")
        try:
            self.b = mmap.mmap(self.fd_sc, self.sc_size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise RingError(f"cannot map region B: {exc}") from None
        self.view = memoryview(self.a)
        self.wa = Words(self.a, NI_SIZE)
        self.wb = Words(self.b, DEC_OFF)
        self.data_end = self.data_off + self.data_size
        for fd in (self.kick_scanner, self.kick_ni):
            try:
                os.set_blocking(fd, False)
            except OSError as exc:
                raise RingError(f"bad kick eventfd {fd}: {exc}") from None
        desc_prod = self.wa.u64(NI_DESC_PROD)
        desc_cons = self.wb.u64(SC_DESC_CONS)
        if not desc_cons <= desc_prod <= desc_cons + self.desc_slots:
            raise RingError(f"ring starts with desc_cons {desc_cons}, desc_prod {desc_prod}")

    def close(self) -> None:
        """Unmaps the regions (only once no frame's view is alive: views pin the mapping)."""
        if getattr(self, "view", None) is not None:
            try:
                self.view.release()
            except BufferError:
                return
            self.view = None
        for name in ("wa", "wb"):
            words = getattr(self, name, None)
            if words is not None:
                words.release()
                setattr(self, name, None)
        for m in (self.a, self.b):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass
        self.a = self.b = None

    # ---- the NI's words
    def broken(self) -> int:
        return self.wa.u32(NI_BROKEN)

    def _check_broken(self) -> None:
        why = self.broken()
        if why:
            raise RingError(f"the NI stopped reading this ring: {BROKEN.get(why, why)}")

    def available(self) -> int:
        """How many descriptors are published and not yet polled."""
        return self.wa.u64(NI_DESC_PROD) - self.polled

    # ---- descriptors
    def poll(self, limit: Optional[int] = None) -> list:
        """The frames published since the last poll (at most ``limit``), in order."""
        prod = self.wa.u64(NI_DESC_PROD)
        start = self.polled
        if prod == start:
            return []
        if not start < prod <= self.consumed + self.desc_slots:
            raise RingError(f"desc_prod jumped to {prod} (read up to {start}, consumed "
                            f"{self.consumed}, {self.desc_slots} slots)")
        if limit is not None and prod - start > limit:
            prod = start + limit
        a, view, mask, off = self.a, self.view, self.desc_slots - 1, self.desc_off
        base, size = self.data_off, self.data_size
        unpack = DESC.unpack_from
        out = []
        for i in range(start, prod):
            seq, time_ns, data, length, kind, direction, flags = unpack(a, off + (i & mask) * 32)
            if seq != i:
                raise RingError(f"descriptor {i} says seq {seq}")
            if data + length > size:
                raise RingError(f"descriptor {i}: bytes [{data}, +{length}) outside the "
                                f"data area of {size}")
            if kind != KIND_FRAME and self.streams and KIND_STREAM_OPEN <= kind <= KIND_STREAM_CLOSE:
                out.append(self._stream_desc(i, kind, direction, flags, time_ns, base + data, length))
                continue
            if kind != KIND_FRAME or direction not in (FROM_GUEST, TO_GUEST):
                raise RingError(f"descriptor {i}: kind {kind}, direction {direction}")
            out.append(RingFrame(seq, direction, bool(flags & F_HELD), time_ns / 1e9,
                                 view[base + data:base + data + length]))
        self.polled = prod
        return out

    def _stream_desc(self, i, kind, direction, flags, time_ns, at, length) -> RingStream:
        if length < STREAM_HDR.size or (kind == KIND_STREAM_OPEN and length < STREAM_HDR.size + STREAM_OPEN.size):
            raise RingError(f"descriptor {i}: a stream record of {length} bytes")
        if kind in (KIND_STREAM_DATA, KIND_STREAM_END) and direction not in (FROM_GUEST, TO_GUEST):
            raise RingError(f"descriptor {i}: stream direction {direction}")
        stream, offset, handle, reason = STREAM_HDR.unpack_from(self.a, at)
        info = None
        if kind == KIND_STREAM_OPEN:
            fam, client, read, held, mid, gport, rport, sport, ga, ra = STREAM_OPEN.unpack_from(
                self.a, at + STREAM_HDR.size)
            if fam not in (4, 6):
                raise RingError(f"descriptor {i}: stream family {fam}")
            import ipaddress
            n = 4 if fam == 4 else 16
            dirs = {FROM_GUEST: "from_guest", TO_GUEST: "to_guest"}
            info = {"stream": stream, "family": fam, "client": "guest" if client == FROM_GUEST else "remote",
                    "guest": [str(ipaddress.ip_address(ga[:n])), gport],
                    "remote": [str(ipaddress.ip_address(ra[:n])), rport], "port": sport,
                    "midstream": bool(mid), "read": [v for d, v in dirs.items() if read & d],
                    "held": [v for d, v in dirs.items() if held & d]}
        body = self.view[at + STREAM_HDR.size:at + length] if kind == KIND_STREAM_DATA else self.view[at:at]
        return RingStream(i, kind, direction, bool(flags & F_HELD), time_ns / 1e9, stream, handle, offset,
                          body, CLOSE_REASONS.get(reason, "closed") if kind == KIND_STREAM_CLOSE else "", info)

    def consume(self, upto: int) -> None:
        """Gives the bytes of every descriptor below ``upto`` back to the NI (their views
        must no longer be read: the NI reuses them)."""
        if upto > self.polled:
            upto = self.polled
        if upto > self.consumed:
            self.consumed = upto
            self.wb.set_u64(SC_DESC_CONS, upto)

    # ---- decisions
    def decide(self, seq: int, verdict: int) -> None:
        if verdict not in (PASS, CUT):
            raise ValueError(f"verdict must be PASS or CUT, not {verdict!r}")
        self.decisions.append((seq, verdict, 0))

    def stream_pass(self, handle: int, direction: int, upto: int) -> None:
        """Buffers a stream pass: every byte of ``direction`` below ``upto`` may go."""
        self.decisions.append((min(upto, (1 << 64) - 1), STREAM_PASS | direction, handle))

    def flush(self) -> None:
        """Writes every buffered decision and publishes them (one store of dec_prod per
        batch), kicking the NI if it sleeps; waits, at most DEC_WAIT seconds, for the NI
        to read decisions while the decision ring is full."""
        pending = self.decisions
        if not pending:
            return
        self.decisions = []
        b, mask, slots = self.b, self.dec_slots - 1, self.dec_slots
        prod = self.dec_prod
        i = 0
        while i < len(pending):
            cons = self.wa.u64(NI_DEC_CONS)
            if not cons <= prod <= cons + slots:
                self._check_broken()
                raise RingError(f"dec_cons {cons} is not within {slots} of dec_prod {prod}")
            room = cons + slots - prod
            if room == 0:
                self._publish(prod)
                self._wait_dec_cons(prod - slots)
                continue
            for seq, verdict, handle in pending[i:i + room]:
                DEC.pack_into(b, DEC_OFF + (prod & mask) * 16, seq, verdict, handle)
                prod += 1
            i += room
        self._publish(prod)

    def _publish(self, prod: int) -> None:
        if prod == self.dec_prod:
            return
        self.wb.set_u64(SC_DEC_PROD, prod)
        self.dec_prod = prod
        full_barrier()                  # the store above before the load below
        if self.wa.u32(NI_WANT_KICK):
            self.kick(self.kick_ni)

    def kick(self, fd: int) -> None:
        try:
            os.write(fd, U64.pack(1))
            self.kicks_sent += 1
        except BlockingIOError:
            pass                        # the counter is saturated: the NI will wake anyway

    def _wait_dec_cons(self, above: int) -> None:
        deadline = time.monotonic() + self.DEC_WAIT
        pause = 0.00005
        while self.wa.u64(NI_DEC_CONS) <= above:
            self._check_broken()
            if time.monotonic() > deadline:
                raise RingError(f"the NI read no decision for {self.DEC_WAIT} s while the "
                                f"decision ring was full")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    # ---- sleeping
    def wait(self, timeout: Optional[float], fds: list) -> list:
        """Sleeps until the NI publishes descriptors (want_kick protocol), one of ``fds``
        is readable or ``timeout`` seconds pass; returns the readable ones of ``fds``
        (empty: woken by the ring or the timeout)."""
        if timeout is None or timeout > 0:
            # the NI's next burst usually follows within microseconds: look a moment before
            # sleeping (a sleep and a wake-up cost tens of them), yielding the CPU between
            # looks, since the NI may need this very CPU to make that burst
            end = time.perf_counter() + self.SPIN
            while time.perf_counter() < end:
                if self.available():
                    return []
                os.sched_yield()
        self.wb.set_u32(SC_WANT_KICK, 1)
        full_barrier()                  # want_kick stored before desc_prod is read again
        try:
            if self.available():
                return []
            self.waits += 1
            r, _, _ = select.select([self.kick_scanner] + fds, [], [],
                                    None if timeout is None else max(0.0, timeout))
        finally:
            self.wb.set_u32(SC_WANT_KICK, 0)
        if self.kick_scanner in r:
            try:
                os.read(self.kick_scanner, 8)
            except BlockingIOError:
                pass
            r.remove(self.kick_scanner)
        return r
