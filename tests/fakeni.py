"""A fake NI for the scanner side of the shared-memory rings (csrc/vnring.h): it makes the
two memfds and eventfds exactly as the ABI says (region A sealed so the scanner can only
map it read-only), publishes descriptors, reads decisions, and can be made to lie (bad
headers, descriptors out of bounds, indices that jump) to attack the scanner's side.

Also a fake kernel socket (hello, replies) so that the SDK's Scanner, or a scanner in C,
can be driven with no daemon at all."""
from __future__ import annotations

import fcntl
import os
import select
import socket
import threading
from typing import Optional

from vhostni.scanner import ring as R
from vhostni.scanner import wire

F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 1, 2, 4, 8, 16
SLOT_BYTES = 2048                   # the fake's data area: one fixed 2 KiB slot per descriptor
PAGE = 4096


def _round(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


class FakeNI:
    def __init__(self, desc_slots: int = 64, dec_slots: int = 16, slot_bytes: int = SLOT_BYTES,
                 header: Optional[dict] = None, seal: bool = True):
        import mmap
        self.desc_slots, self.dec_slots, self.slot_bytes = desc_slots, dec_slots, slot_bytes
        self.desc_off = PAGE
        self.data_off = _round(self.desc_off + desc_slots * R.DESC.size)
        self.data_size = desc_slots * slot_bytes
        self.size = self.data_off + self.data_size
        self.sc_size = _round(R.DEC_OFF + dec_slots * R.DEC.size)
        self.fd_ni = os.memfd_create("vnr-ni", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        self.fd_sc = os.memfd_create("vnr-sc", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.fd_ni, self.size)
        os.ftruncate(self.fd_sc, self.sc_size)
        self.a = mmap.mmap(self.fd_ni, self.size)
        self.b = mmap.mmap(self.fd_sc, self.sc_size)
        h = dict(magic=R.MAGIC, version=R.VERSION, desc_slots=desc_slots, dec_slots=dec_slots,
                 desc_off=self.desc_off, data_off=self.data_off, data_size=self.data_size,
                 size=self.size, sc_size=self.sc_size)
        h.update(header or {})
        R.NI_HEAD.pack_into(self.a, 0, h["magic"], h["version"], h["desc_slots"], h["dec_slots"],
                            h["desc_off"], h["data_off"], h["data_size"], h["size"], h["sc_size"], 0)
        if seal:
            fcntl.fcntl(self.fd_ni, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            fcntl.fcntl(self.fd_sc, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
        self.kick_scanner = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kick_ni = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wa = R.Words(self.a, R.NI_SIZE)      # index words, stored whole
        self.wb = R.Words(self.b, R.DEC_OFF)
        self.desc_prod = 0
        self.dec_cons = 0
        self.decisions: list = []           # (seq, verdict) in the order read
        self.kicks = 0                      # kicks this NI sent the scanner

    @property
    def fds(self) -> tuple:
        return (self.fd_ni, self.fd_sc, self.kick_scanner, self.kick_ni)

    def env(self) -> str:
        return ",".join(map(str, self.fds))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.wa.release()
        self.wb.release()
        self.a.close()
        self.b.close()

    # ---- the scanner's words
    def desc_cons(self) -> int:
        return self.wb.u64(R.SC_DESC_CONS)

    def scanner_wants_kick(self) -> bool:
        return bool(self.wb.u32(R.SC_WANT_KICK))

    # ---- publishing
    def room(self) -> int:
        return self.desc_cons() + self.desc_slots - self.desc_prod

    def write_desc(self, i: int, data: bytes = b"", direction: int = wire.FROM_GUEST,
                   held: bool = True, time_ns: int = 0, *, seq: Optional[int] = None,
                   off: Optional[int] = None, length: Optional[int] = None, kind: int = R.KIND_FRAME) -> None:
        slot = i & (self.desc_slots - 1)
        doff = slot * self.slot_bytes if off is None else off
        if off is None:
            self.a[self.data_off + doff:self.data_off + doff + len(data)] = data
        R.DESC.pack_into(self.a, self.desc_off + slot * R.DESC.size, i if seq is None else seq,
                         time_ns, doff, len(data) if length is None else length, kind, direction,
                         R.F_HELD if held else 0)

    def publish(self, frames: list) -> list:
        """Publishes (data, direction, held[, time_ns]) tuples as descriptors (room must
        allow) and kicks the scanner if it asked; returns their seqs."""
        assert len(frames) <= self.room(), "the fake NI has no room"
        seqs = []
        for f in frames:
            self.write_desc(self.desc_prod, *f)
            seqs.append(self.desc_prod)
            self.desc_prod += 1
        self.set_desc_prod(self.desc_prod)
        return seqs

    def publish_raw(self, records: list) -> list:
        """Publishes (kind, direction, flags, bytes) descriptors as given (stream records)."""
        seqs = []
        for kind, direction, flags, data in records:
            self.write_desc(self.desc_prod, data, direction, bool(flags & R.F_HELD), kind=kind)
            seqs.append(self.desc_prod)
            self.desc_prod += 1
        self.set_desc_prod(self.desc_prod)
        return seqs

    def read_raw_decisions(self) -> list:
        """Decisions as (seq, verdict, handle): stream passes carry a handle."""
        prod = self.wb.u64(R.SC_DEC_PROD)
        got = [R.DEC.unpack_from(self.b, R.DEC_OFF + (i & (self.dec_slots - 1)) * R.DEC.size)
               for i in range(self.dec_cons, prod)]
        self.dec_cons = prod
        self.wa.set_u64(R.NI_DEC_CONS, prod)
        return got

    def set_desc_prod(self, v: int) -> None:
        self.wa.set_u64(R.NI_DESC_PROD, v)
        R.full_barrier()
        if self.scanner_wants_kick():
            os.write(self.kick_scanner, R.U64.pack(1))
            self.kicks += 1

    # ---- decisions
    def read_decisions(self) -> list:
        prod = self.wb.u64(R.SC_DEC_PROD)
        assert self.dec_cons <= prod <= self.dec_cons + self.dec_slots, (self.dec_cons, prod)
        got = []
        for i in range(self.dec_cons, prod):
            seq, verdict, _handle = R.DEC.unpack_from(self.b, R.DEC_OFF + (i & (self.dec_slots - 1)) * R.DEC.size)
            got.append((seq, verdict))
        self.dec_cons = prod
        self.wa.set_u64(R.NI_DEC_CONS, prod)
        self.decisions += got
        return got

    def sleep_for_decisions(self, timeout: float) -> bool:
        """The NI's side of want_kick: sleeps until the scanner kicks (True) or timeout."""
        self.wa.set_u32(R.NI_WANT_KICK, 1)
        try:
            r, _, _ = select.select([self.kick_ni], [], [], timeout)
            if r:
                os.read(self.kick_ni, 8)
            return bool(r)
        finally:
            self.wa.set_u32(R.NI_WANT_KICK, 0)


class FakeKernel:
    """The socket side: a SEQPACKET pair, a hello, replies on demand."""

    def __init__(self, config: Optional[dict] = None, hello: Optional[dict] = None):
        self.sock, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.hello = {"op": "hello", "version": 1, "scanner": "s", "ni": "n", "config": config or {},
                      "injections": [], "stream_injections": [], "checkpoint_max": 0,
                      "checkpoint": None, "clock": "system", **(hello or {})}
        self.send(self.hello)

    def send(self, body: dict) -> None:
        self.sock.send(wire.encode_control(body))

    def reply(self, id: int, ok: bool = True, error: str = "") -> None:
        self.send({"op": "reply", "id": id, "ok": ok, **({} if ok else {"error": error})})

    def recv(self, timeout: float = 10.0):
        r, _, _ = select.select([self.sock], [], [], timeout)
        assert r, "the scanner sent nothing"
        return wire.decode(self.sock.recv(wire.MAX_MESSAGE))

    def recv_control(self, op: str, timeout: float = 10.0) -> dict:
        while True:
            msg = self.recv(timeout)
            if isinstance(msg, wire.Control) and msg.body.get("op") == op:
                return msg.body

    def close(self) -> None:
        self.sock.close()
        self.child.close()


class Thread(threading.Thread):
    """A thread whose exception re-raises in join()."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.exc, self.result = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:       # noqa: BLE001 - re-raised in join
            self.exc = exc

    def join(self, timeout=30):
        super().join(timeout)
        assert not self.is_alive(), "thread hung"
        if self.exc is not None:
            raise self.exc
        return self.result
