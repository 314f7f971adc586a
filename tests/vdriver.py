"""A virtio-net *driver* and vhost-user *front-end* simulator, for tests only.

It plays the two parts a VM plays against a vhost-user backend, with no VM:

* QEMU's part: guest RAM in memfd regions (one or several, optionally sharing
  one fd at different mmap offsets), kick/call eventfds, a vhost-user
  connection and the setup sequence QEMU performs (all through the sans-I/O
  codec in ``vhostni.vhost_user.proto``);
* the guest driver's part: split virtqueues laid out in that memory, TX chains
  in several layouts, RX buffers, mergeable-buffer reassembly, notification
  suppression (EVENT_IDX or the NO_NOTIFY flag) as Linux does it.

Quick use::

    drv = VirtioNetDriver.connect("/tmp/ni.sock")       # full QEMU-like setup
    drv.post_rx_buffers(64, 2048)
    drv.send_frame(frame)                                  # TX on queue 1, kicked
    for hdr, frame in drv.recv_frames(timeout=2.0): ...
    drv.close()

For hostile tests, everything below the convenience calls is reachable:
``drv.mem`` (read/write any guest-physical address), ``drv.queues[i]``
(``write_desc``, ``put_avail``, ``set_avail_idx``, ``kick``), ``drv.frontend``
(``send`` / ``send_raw`` any message with any fds, ``recv_reply``,
``peer_closed``).

The driver also checks the *device*: a used id that was never made available,
a used length beyond the buffer, a used index that runs ahead of what was
offered, or a bad ``num_buffers`` raises :class:`DeviceError`.

Ordering: every virtio field is little-endian.  Ring entries are written before
the index that publishes them; CPython stores happen in program order and x86
keeps stores ordered, so that is enough for store->store.  The two places that
need store->load ordering (publish avail idx, then read avail_event; publish
used_event, then re-read used idx) go through :func:`full_barrier`.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from vhostni.vhost_user import proto as vu
from vhostni.vhost_user.proto import Request

PAGE = mmap.PAGESIZE
MiB = 1 << 20

# Split virtqueue layout (virtio 1.x, 2.7).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")

# virtio-net header (virtio 1.x, 5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

RX_QUEUE, TX_QUEUE = 0, 1

# What this driver asks for by default (intersected with what the device offers).
DEFAULT_FEATURES = vu.feature_mask(
    vu.VIRTIO_F_VERSION_1, vu.VIRTIO_NET_F_MRG_RXBUF, vu.VIRTIO_RING_F_INDIRECT_DESC,
    vu.VIRTIO_RING_F_EVENT_IDX, vu.VIRTIO_NET_F_MAC, vu.VIRTIO_NET_F_STATUS,
    vu.VIRTIO_NET_F_CSUM, vu.VIRTIO_NET_F_GUEST_CSUM, vu.VIRTIO_NET_F_HOST_TSO4,
    vu.VIRTIO_NET_F_HOST_TSO6, vu.VIRTIO_NET_F_GUEST_TSO4, vu.VIRTIO_NET_F_GUEST_TSO6,
    vu.VHOST_USER_F_PROTOCOL_FEATURES)
DEFAULT_PROTOCOL_FEATURES = vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.LOG_SHMFD

_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (store->load included).  Acquiring a lock is a
    LOCK-prefixed atomic in CPython's lock implementation, which x86 orders
    like MFENCE; there is no direct way to emit a fence from Python."""
    with _barrier_lock:
        pass


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio's vring_need_event(): did idx cross event_idx between old and new?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class DeviceError(AssertionError):
    """The backend broke a virtio rule, as seen from the driver."""


@dataclass
class VirtioNetHdr:
    """``struct virtio_net_hdr`` (10 bytes) / ``virtio_net_hdr_mrg_rxbuf`` (12 bytes)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    _S = struct.Struct("<BBHHHHH")

    def pack(self, size: int = 12) -> bytes:
        data = self._S.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                            self.csum_start, self.csum_offset, self.num_buffers)
        return data[:size]

    @classmethod
    def unpack(cls, data: bytes) -> "VirtioNetHdr":
        if len(data) == 10:
            data = data + b"\0\0"
        return cls(*cls._S.unpack(data))


# ---------------------------------------------------------------------------
# Guest memory
# ---------------------------------------------------------------------------


@dataclass
class GuestRegion:
    gpa: int
    size: int
    uva: int
    fd: int
    mmap_offset: int
    mm: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def describe(self) -> vu.MemoryRegion:
        return vu.MemoryRegion(self.gpa, self.size, self.uva, self.mmap_offset)


class GuestMemory:
    """Guest RAM: memfd-backed regions at chosen guest-physical addresses.

    ``layout`` lists (gpa, size) pairs (page multiples).  Each region gets its
    own memfd unless ``shared_fd``, in which case all live in one memfd at
    increasing, non-zero mmap offsets (QEMU does that when one memory backend
    is split around a hole).  User addresses are synthetic, ``uva_base + gpa``
    with a per-region skew, so a backend that mixes up guest-physical and user
    addresses fails loudly.  Reads and writes may straddle gpa-adjacent regions.
    """

    def __init__(self, layout: Sequence[tuple[int, int]] = ((0, 32 * MiB),), *,
                 shared_fd: bool = False, uva_base: int = 0x7F3A_0000_0000):
        self.regions: list[GuestRegion] = []
        total = sum(size for _, size in layout)
        shared = self._shared_fd = None
        if shared_fd:
            shared = self._shared_fd = os.memfd_create("vdriver-guest", os.MFD_CLOEXEC)
            os.ftruncate(shared, PAGE + total)
        offset = PAGE
        try:
            for i, (gpa, size) in enumerate(layout):
                if gpa % PAGE or size % PAGE or size <= 0:
                    raise ValueError(f"region {gpa:#x}+{size:#x} is not page-aligned")
                if shared is None:
                    fd, mmap_offset = os.memfd_create(f"vdriver-guest{i}", os.MFD_CLOEXEC), 0
                    os.ftruncate(fd, size)
                else:
                    fd, mmap_offset = shared, offset
                    offset += size
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=mmap_offset)
                uva = uva_base + gpa + (i + 1) * 0x1_0000_0000
                self.regions.append(GuestRegion(gpa, size, uva, fd, mmap_offset, mm))
        except BaseException:
            self.close()
            raise
        self.regions.sort(key=lambda r: r.gpa)
        self._next_free = {id(r): r.gpa for r in self.regions}

    # -- description for SET_MEM_TABLE --
    def table(self) -> vu.MemoryTable:
        return vu.MemoryTable([r.describe() for r in self.regions], tuple(r.fd for r in self.regions))

    def boundaries(self) -> list[int]:
        """Guest-physical addresses where one region ends and the next begins."""
        return [a.end for a, b in zip(self.regions, self.regions[1:]) if a.end == b.gpa]

    # -- translation --
    def region_at(self, gpa: int) -> GuestRegion:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        raise ValueError(f"guest address {gpa:#x} is not in guest memory")

    def uva(self, gpa: int) -> int:
        """The front-end user address of a guest-physical address (for SET_VRING_ADDR)."""
        r = self.region_at(gpa)
        return r.uva + (gpa - r.gpa)

    # -- access --
    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            r = self.region_at(gpa)
            n = min(length, r.end - gpa)
            out += r.mm[gpa - r.gpa:gpa - r.gpa + n]
            gpa, length = gpa + n, length - n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        data = memoryview(bytes(data))
        while data:
            r = self.region_at(gpa)
            n = min(len(data), r.end - gpa)
            r.mm[gpa - r.gpa:gpa - r.gpa + n] = data[:n]
            gpa, data = gpa + n, data[n:]

    def read_u16(self, gpa: int) -> int:
        return U16.unpack(self.read(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, U16.pack(value & 0xFFFF))

    # -- allocation of fixed structures (rings); never freed --
    def alloc(self, size: int, align: int = 16) -> int:
        """Carve ``size`` bytes out of the first region with room (never straddling)."""
        for r in self.regions:
            start = -(-self._next_free[id(r)] // align) * align
            if start + size <= r.end:
                self._next_free[id(r)] = start + size
                return start
        raise MemoryError(f"no region has {size} free bytes")

    def free_extents(self) -> list[tuple[int, int]]:
        """What alloc() has not handed out, as (start, end), adjacent regions merged."""
        out: list[tuple[int, int]] = []
        for r in self.regions:
            start = self._next_free[id(r)]
            if start >= r.end:
                continue
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], r.end)
            else:
                out.append((start, r.end))
        return out

    def close(self) -> None:
        for r in self.regions:
            r.mm.close()
            if r.fd != self._shared_fd:
                os.close(r.fd)
        if self._shared_fd is not None:
            os.close(self._shared_fd)
            self._shared_fd = None
        self.regions = []


class Arena:
    """First-fit allocator of guest-physical extents for packet buffers.
    Allocations may straddle gpa-adjacent regions: the device must cope."""

    def __init__(self, extents: Iterable[tuple[int, int]]):
        self.free = sorted(extents)

    def alloc(self, size: int, align: int = 16) -> int:
        size = max(size, 1)
        for i, (start, end) in enumerate(self.free):
            base = -(-start // align) * align
            if base + size <= end:
                pieces = [(s, e) for s, e in ((start, base), (base + size, end)) if e > s]
                self.free[i:i + 1] = pieces
                return base
        raise MemoryError(f"arena has no {size} free bytes")

    def release(self, base: int, size: int) -> None:
        size = max(size, 1)
        self.free.append((base, base + size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, e in self.free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.free = merged


# ---------------------------------------------------------------------------
# Split virtqueue, driver side
# ---------------------------------------------------------------------------


@dataclass
class Chain:
    """What the driver remembers about a buffer it made available."""

    head: int
    descs: list[int]                     # ring descriptor indices used
    buffers: list[tuple[int, int, bool]]  # (gpa, len, device-writable), in chain order
    allocations: list[tuple[int, int]]   # arena extents to release (incl. indirect table)


class Virtqueue:
    """One split virtqueue, as the driver sees it.

    Layout: descriptor table (16 * size, align 16); avail ring (flags, idx,
    ring[size], used_event); used ring (flags, idx, ring[size] of (id, len),
    avail_event).  The low-level methods write exactly what they are told.
    """

    def __init__(self, mem: GuestMemory, index: int, size: int, *, event_idx: bool,
                 desc: Optional[int] = None, avail: Optional[int] = None, used: Optional[int] = None):
        self.mem, self.index, self.size, self.event_idx = mem, index, size, event_idx
        self.desc = desc if desc is not None else mem.alloc(16 * size, 16)
        self.avail = avail if avail is not None else mem.alloc(6 + 2 * size, 2)
        self.used = used if used is not None else mem.alloc(6 + 8 * size, 4)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.always_kick = False
        self.reset()

    def reset(self) -> None:
        """Zero the rings and forget every outstanding buffer."""
        self.mem.write(self.desc, bytes(16 * self.size))
        self.mem.write(self.avail, bytes(6 + 2 * self.size))
        self.mem.write(self.used, bytes(6 + 8 * self.size))
        self.free_descs = list(range(self.size))
        self.avail_idx = 0          # driver's shadow of avail->idx
        self.kicked_idx = 0         # avail idx at the last kick decision
        self.last_used = 0          # next used entry the driver will read
        self.outstanding: dict[int, Chain] = {}

    def addr(self, log: bool = False) -> vu.VringAddr:
        """SET_VRING_ADDR payload: user addresses of the three parts; with ``log``, the
        VRING_F_LOG flag and the used ring's guest-physical address (as QEMU sends it while
        a migration logs dirty pages)."""
        return vu.VringAddr(self.index, vu.VRING_F_LOG if log else 0, self.mem.uva(self.desc),
                            self.mem.uva(self.used), self.mem.uva(self.avail), self.used if log else 0)

    # -- low-level hooks (no checks: hostile tests use them directly) --
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: Optional[int] = None) -> None:
        """Write descriptor ``i`` of the ring's table, or of an indirect ``table`` at that gpa."""
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF,
                                                flags & 0xFFFF, next & 0xFFFF))

    def read_desc(self, i: int, table: Optional[int] = None) -> tuple[int, int, int, int]:
        base = self.desc if table is None else table
        return DESC.unpack(self.mem.read(base + 16 * i, 16))

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        """Publish ``idx`` as avail->idx (any value: it may jump past the ring size)."""
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def put_avail(self, heads: Iterable[int], publish: bool = True) -> None:
        """Write ``heads`` into the next avail slots, then (if ``publish``) bump avail->idx."""
        idx = self.avail_idx
        for head in heads:
            self.write_avail_entry(idx, head)
            idx = (idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, idx)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(self.used + 4 + 8 * (slot % self.size), 8))

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def kick(self, force: bool = False) -> bool:
        """Notify the device of new avail entries unless it suppressed notifications
        (EVENT_IDX: avail_event; otherwise VIRTQ_USED_F_NO_NOTIFY).  Returns whether it kicked."""
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        full_barrier()   # avail->idx must be visible before we read the device's wishes
        if not (force or self.always_kick):
            if self.event_idx:
                if not vring_need_event(self.avail_event(), new, old):
                    return False
            elif self.used_flags() & VIRTQ_USED_F_NO_NOTIFY:
                return False
        os.eventfd_write(self.kick_fd, 1)
        return True

    def clear_call(self) -> int:
        """Consume pending interrupts; returns how many were signalled (0 if none)."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    # -- driver logic --
    def add_chain(self, buffers: Sequence[tuple[int, int, bool]], *, indirect: bool = False,
                  allocations: Optional[list[tuple[int, int]]] = None, arena: Optional[Arena] = None) -> int:
        """Write a descriptor chain for ``buffers`` [(gpa, len, writable)] and return its
        head (not yet made available: call :meth:`make_available`)."""
        allocations = list(allocations or [])
        if indirect:
            if arena is None:
                raise ValueError("an indirect table needs an arena")
            table = arena.alloc(16 * len(buffers), 16)
            allocations.append((table, 16 * len(buffers)))
            for i, (gpa, length, writable) in enumerate(buffers):
                last = i == len(buffers) - 1
                self.write_desc(i, gpa, length, (0 if last else VIRTQ_DESC_F_NEXT)
                                | (VIRTQ_DESC_F_WRITE if writable else 0), 0 if last else i + 1, table=table)
            head = self._take_descs(1)[0]
            self.write_desc(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
            descs = [head]
        else:
            descs = self._take_descs(len(buffers))
            for i, (d, (gpa, length, writable)) in enumerate(zip(descs, buffers)):
                last = i == len(buffers) - 1
                self.write_desc(d, gpa, length, (0 if last else VIRTQ_DESC_F_NEXT)
                                | (VIRTQ_DESC_F_WRITE if writable else 0), 0 if last else descs[i + 1])
            head = descs[0]
        self.outstanding[head] = Chain(head, descs, list(buffers), allocations)
        return head

    def _take_descs(self, n: int) -> list[int]:
        if n > len(self.free_descs):
            raise MemoryError(f"queue {self.index}: {n} descriptors wanted, {len(self.free_descs)} free")
        taken, self.free_descs = self.free_descs[:n], self.free_descs[n:]
        return taken

    def make_available(self, heads: Iterable[int]) -> None:
        self.put_avail(heads, publish=True)

    def pop_used(self) -> list[tuple[Chain, int]]:
        """Take every new used entry, checking the device's behaviour; returns
        (chain, written length) pairs and frees their descriptors (the caller
        releases the chains' arena allocations)."""
        used_idx = self.used_idx()
        pending = (used_idx - self.last_used) & 0xFFFF
        if pending > len(self.outstanding):
            raise DeviceError(f"queue {self.index}: used idx {used_idx} is {pending} ahead of "
                              f"{self.last_used}, but only {len(self.outstanding)} buffers are out")
        out = []
        for _ in range(pending):
            head, length = self.read_used_elem(self.last_used)
            chain = self.outstanding.pop(head, None)
            if chain is None:
                raise DeviceError(f"queue {self.index}: used id {head} was not available")
            writable = sum(n for _, n, w in chain.buffers if w)
            if length > writable:
                raise DeviceError(f"queue {self.index}: used len {length} > {writable} writable bytes")
            self.free_descs.extend(chain.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
            out.append((chain, length))
        if self.event_idx:
            self.set_used_event(self.last_used)   # interrupt me on the next one
        return out

    def wait_call(self, timeout: float, poll: Optional[float] = 0.05) -> bool:
        """Wait for an interrupt (or, if ``poll``, at most that long: the caller
        re-reads the used ring anyway).  Returns whether one arrived."""
        wait = timeout if poll is None else min(timeout, poll)
        ready, _, _ = select.select([self.call_fd], [], [], max(wait, 0))
        return bool(ready) and self.clear_call() > 0

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# vhost-user front-end (the socket; messages through the codec)
# ---------------------------------------------------------------------------


class VhostUserFrontend:
    """QEMU's end of the vhost-user socket."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.protocol_features = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> "VhostUserFrontend":
        """Connect to a listening backend, retrying until ``timeout`` (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return cls(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def accept(cls, path: str, timeout: float = 5.0) -> "VhostUserFrontend":
        """Listen at ``path`` and take the first backend that connects (QEMU's
        ``server=on``: the backend is the client)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(timeout)
            sock, _ = listener.accept()
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return cls(sock, timeout)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (with fds as SCM_RIGHTS on the first byte) exactly as given."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, request: int, body: Optional[vu.Body] = None, need_reply: bool = False,
             fds: Optional[Sequence[int]] = None) -> None:
        data, fds = vu.encode_request(request, body, need_reply, fds)
        self.send_raw(data, fds)

    def _recv_exact(self, n: int) -> tuple[bytes, list[int]]:
        buf, fds = bytearray(), []
        while len(buf) < n:
            data, anc, flags, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * vu.MAX_FDS))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array("i", payload[:len(payload) - len(payload) % 4]))
            if not data:
                vu.close_fds(fds)
                raise ConnectionError("backend closed the vhost-user connection")
            buf += data
        return bytes(buf), fds

    def recv_reply(self) -> tuple[vu.Header, vu.Body]:
        """Read one reply and type it (fds sent with replies are closed: none is used here)."""
        data, fds = self._recv_exact(vu.HEADER_SIZE)
        header = vu.parse_header(data)
        payload, more = self._recv_exact(header.size) if header.size else (b"", [])
        vu.close_fds(fds + more)
        return header, vu.decode_reply(header, payload)

    def call(self, request: int, body: Optional[vu.Body] = None, need_reply: bool = False,
             fds: Optional[Sequence[int]] = None) -> Optional[vu.Body]:
        """Send a request; if the protocol says the backend answers it, read and return
        the answer (a REPLY_ACK with a non-zero status raises)."""
        self.send(request, body, need_reply, fds)
        if not vu.reply_expected(request, need_reply, self.protocol_features):
            return None
        header, reply = self.recv_reply()
        if header.request != request:
            raise vu.ProtocolError(header.request, f"reply to the wrong request (sent {request!r})")
        if vu.REQUESTS[Request(request)].reply is None and isinstance(reply, vu.U64) and reply.value:
            raise vu.ProtocolError(request, f"backend NACKed it (status {reply.value})")
        return reply

    def peer_closed(self, timeout: float = 0.0) -> bool:
        """Whether the backend has hung up (EOF), waiting up to ``timeout``.  Unread
        data means it is still talking: not closed."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# The virtio-net driver
# ---------------------------------------------------------------------------


class VirtioNetDriver:
    """A virtio-net guest driver plus its VMM, against a vhost-user backend.

    Parameters: ``regions`` [(gpa, size)] and ``shared_fd`` shape guest memory
    (see :class:`GuestMemory`); ``queue_size``; ``queue_pairs``; ``features``
    and ``protocol_features``: what the driver wants (intersected with the
    offer); ``ack_all``: set NEED_REPLY on every setup message that allows it
    (when REPLY_ACK is negotiated), instead of only on SET_MEM_TABLE as QEMU
    does; ``ring_addrs`` {queue: (desc, avail, used)} to place rings at given
    guest-physical addresses.  :meth:`connect` builds one and runs :meth:`setup`.
    """

    def __init__(self, frontend: VhostUserFrontend, *,
                 regions: Sequence[tuple[int, int]] = ((0, 32 * MiB),), shared_fd: bool = False,
                 queue_size: int = 256, queue_pairs: int = 1,
                 features: int = DEFAULT_FEATURES, protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 ack_all: bool = False, ring_addrs: Optional[dict[int, tuple[int, int, int]]] = None):
        self.frontend = frontend
        self.mem = GuestMemory(regions, shared_fd=shared_fd)
        self.queue_size, self.queue_pairs = queue_size, queue_pairs
        self.wanted_features, self.wanted_protocol_features = features, protocol_features
        self.ack_all = ack_all
        self.tx_wait = 2.0   # seconds send_frame waits for free descriptors
        self.ring_addrs = dict(ring_addrs or {})
        self.features = 0
        self.device_features = 0
        self.queues: list[Virtqueue] = []
        self.arena: Optional[Arena] = None
        self._rx_partial: list[tuple[Chain, int]] = []

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0, setup: bool = True, **kwargs) -> "VirtioNetDriver":
        """Connect to the backend listening at ``path`` and (by default) set it up."""
        return cls.over(VhostUserFrontend.connect(path, timeout), setup=setup, **kwargs)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float = 5.0, setup: bool = True,
                    **kwargs) -> "VirtioNetDriver":
        """Drive a backend over an already connected socket (e.g. one end of a
        socketpair whose other end an in-process backend serves)."""
        return cls.over(VhostUserFrontend(sock, timeout), setup=setup, **kwargs)

    @classmethod
    def over(cls, frontend: VhostUserFrontend, *, setup: bool = True, **kwargs) -> "VirtioNetDriver":
        drv = cls(frontend, **kwargs)
        if setup:
            try:
                drv.setup()
            except BaseException:
                drv.close(graceful=False)
                raise
        return drv

    # -- negotiation state --
    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def hdr_len(self) -> int:
        """virtio-net header size: 12 with VERSION_1 or MRG_RXBUF, else 10."""
        return 12 if self.has(vu.VIRTIO_F_VERSION_1) or self.has(vu.VIRTIO_NET_F_MRG_RXBUF) else 10

    def _ack(self) -> bool:
        return self.ack_all and bool(self.frontend.protocol_features & vu.ProtocolFeature.REPLY_ACK)

    # -- the QEMU-like setup sequence --
    def setup(self) -> None:
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, SET_FEATURES,
        SET_MEM_TABLE, then per ring SET_VRING_NUM/BASE/ADDR/KICK/CALL, then SET_VRING_ENABLE."""
        self.negotiate()
        event_idx = self.has(vu.VIRTIO_RING_F_EVENT_IDX)
        for i in range(2 * self.queue_pairs):
            desc, avail, used = self.ring_addrs.get(i, (None, None, None))
            self.queues.append(Virtqueue(self.mem, i, self.queue_size, event_idx=event_idx,
                                         desc=desc, avail=avail, used=used))
        self.arena = Arena(self.mem.free_extents())
        self.start_queues()

    def negotiate(self) -> None:
        """The first half of setup: features, protocol features, owner, memory table."""
        fe = self.frontend
        self.device_features = fe.call(Request.GET_FEATURES).value
        if (self.device_features & self.wanted_features) >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = fe.call(Request.GET_PROTOCOL_FEATURES).value
            fe.call(Request.SET_PROTOCOL_FEATURES, vu.U64(offered & self.wanted_protocol_features))
            fe.protocol_features = offered & self.wanted_protocol_features
            if fe.protocol_features & vu.ProtocolFeature.MQ:
                max_queues = fe.call(Request.GET_QUEUE_NUM).value
                if max_queues < self.queue_pairs:
                    raise RuntimeError(f"backend supports {max_queues} queue pairs, {self.queue_pairs} wanted")
        fe.call(Request.SET_OWNER, need_reply=self._ack())
        self.features = self.device_features & self.wanted_features
        fe.call(Request.SET_FEATURES, vu.U64(self.features), need_reply=self._ack())
        reply_ack = bool(fe.protocol_features & vu.ProtocolFeature.REPLY_ACK)
        fe.call(Request.SET_MEM_TABLE, self.mem.table(), need_reply=reply_ack)

    def start_queues(self, bases: Optional[Sequence[int]] = None) -> None:
        """The second half: each ring's NUM/BASE/ADDR/KICK/CALL, then enable them all."""
        for q, base in zip(self.queues, bases or [0] * len(self.queues)):
            self.start_queue(q, base)
        if self.has(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            for q in self.queues:
                self.set_vring_enable(q.index, True)

    def reconnect(self, path: Optional[str] = None, *, sock: Optional[socket.socket] = None,
                  timeout: float = 5.0, kick: bool = True) -> None:
        """What QEMU (``reconnect=N``) does when a backend comes back after dying: a
        new connection, the same guest memory and rings, and each ring's base set
        to its *used* index, so buffers the dead backend took but never used are
        offered again.  Then (if ``kick``) kick every ring."""
        self.frontend.close()
        self.frontend = VhostUserFrontend(sock, timeout) if sock is not None \
            else VhostUserFrontend.connect(path, timeout)
        self.negotiate()
        self.start_queues([q.used_idx() for q in self.queues])
        if kick:
            for q in self.queues:
                q.kick(force=True)

    def start_queue(self, q: Virtqueue, base: int = 0) -> None:
        fe, ack = self.frontend, self._ack()
        fe.call(Request.SET_VRING_NUM, vu.VringState(q.index, q.size), need_reply=ack)
        fe.call(Request.SET_VRING_BASE, vu.VringState(q.index, base), need_reply=ack)
        fe.call(Request.SET_VRING_ADDR, q.addr(), need_reply=ack)
        fe.call(Request.SET_VRING_KICK, vu.VringFile(q.index, False, q.kick_fd), need_reply=ack)
        fe.call(Request.SET_VRING_CALL, vu.VringFile(q.index, False, q.call_fd), need_reply=ack)

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index`` and return the backend's next avail index for it."""
        reply = self.frontend.call(Request.GET_VRING_BASE, vu.VringState(index, 0))
        if reply.index != index:
            raise vu.ProtocolError(Request.GET_VRING_BASE, f"reply for ring {reply.index}, asked {index}")
        return reply.num

    # -- live migration: the dirty log, as QEMU keeps it --
    def start_logging(self, size: Optional[int] = None, offset: int = 0) -> None:
        """What QEMU does when a migration starts: SET_LOG_BASE with a memfd bitmap (one
        bit per 4 KiB guest page; by default just big enough for guest memory, rounded up
        to 8 bytes as QEMU's u64 chunks are), SET_FEATURES with VHOST_F_LOG_ALL, and every
        ring's address again with VRING_F_LOG."""
        if size is None:
            end = max(r.end for r in self.mem.regions)
            size = -(-end // (PAGE * 64)) * 8
        fd = os.memfd_create("vdriver-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, offset + size)
            log_map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.frontend.call(Request.SET_LOG_BASE, vu.Log(size, offset), fds=[fd])
        finally:
            os.close(fd)
        self.stop_logging(send=False)
        self.log_map, self.log_offset, self.log_size = log_map, offset, size
        self.features |= 1 << vu.VHOST_F_LOG_ALL
        self.frontend.call(Request.SET_FEATURES, vu.U64(self.features), need_reply=self._ack())
        for q in self.queues:
            self.frontend.call(Request.SET_VRING_ADDR, q.addr(log=True), need_reply=self._ack())

    def dirty_pages(self, clear: bool = True) -> set[int]:
        """Guest page numbers (gpa >> 12) whose bits the backend set; cleared (as QEMU's
        sync does) unless ``clear`` is False."""
        log_map = getattr(self, "log_map", None)
        if log_map is None:
            return set()
        data = log_map[self.log_offset:self.log_offset + self.log_size]
        if clear:
            log_map[self.log_offset:self.log_offset + self.log_size] = bytes(self.log_size)
        return {8 * i + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}

    def stop_logging(self, send: bool = True, unmap: bool = True) -> None:
        """The end of a migration: features without LOG_ALL, rings without VRING_F_LOG
        (``unmap`` False: keep the bitmap for dirty_pages to look at)."""
        if send:
            self.features &= ~(1 << vu.VHOST_F_LOG_ALL)
            self.frontend.call(Request.SET_FEATURES, vu.U64(self.features), need_reply=self._ack())
            for q in self.queues:
                self.frontend.call(Request.SET_VRING_ADDR, q.addr(), need_reply=self._ack())
        if unmap and getattr(self, "log_map", None) is not None:
            self.log_map.close()
            self.log_map = None

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.frontend.call(Request.SET_VRING_ENABLE, vu.VringState(index, int(enable)), need_reply=self._ack())

    # -- TX --
    def send_frame(self, frame: bytes, vnet_hdr: Optional[VirtioNetHdr] = None, *,
                   layout: str = "separate", indirect: bool = False, chunk: int = 64,
                   header_pieces: Sequence[int] = (1, 5), addr: Optional[int] = None,
                   queue: int = TX_QUEUE, kick: bool = True) -> int:
        """Put one frame on a TX queue and kick; returns the chain's head.

        ``layout``: "combined" (header and frame in one descriptor), "separate"
        (header, then frame; what Linux does without ANY_LAYOUT), "split_header"
        (the header cut at ``header_pieces`` offsets, e.g. 1 and 5 -> 1+4+rest
        bytes, then the frame), "scattered" (header+frame cut into ``chunk``-byte
        descriptors).  ``indirect`` puts the chain in an indirect table.  The
        bytes lie contiguously at ``addr`` if given (e.g. across a region
        boundary), else in the arena.
        """
        hdr = (vnet_hdr or VirtioNetHdr()).pack(self.hdr_len)
        data = hdr + bytes(frame)
        q = self.queues[queue]
        self._wait_for_descs(q, 1 if indirect else 2 + len(data) // max(chunk, 1))
        allocations = []
        if addr is None:
            addr = self.arena.alloc(len(data))
            allocations.append((addr, len(data)))
        self.mem.write(addr, data)
        if layout == "combined":
            cuts = [len(data)]
        elif layout == "separate":
            cuts = [len(hdr), len(data)]
        elif layout == "split_header":
            cuts = sorted({c for c in header_pieces if 0 < c < len(hdr)} | {len(hdr), len(data)})
        elif layout == "scattered":
            cuts = list(range(chunk, len(data), chunk)) + [len(data)]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        starts = [0] + cuts[:-1]
        buffers = [(addr + s, e - s, False) for s, e in zip(starts, cuts) if e > s or len(cuts) == 1]
        head = q.add_chain(buffers, indirect=indirect, allocations=allocations, arena=self.arena)
        q.make_available([head])
        if kick:
            q.kick()
        return head

    def _wait_for_descs(self, q: Virtqueue, wanted: int) -> None:
        """Like a driver whose TX ring is full: reclaim, and if that is not enough,
        wait up to ``tx_wait`` seconds for the device to use buffers (a full ring
        is then the device's fault, and add_chain raises MemoryError)."""
        deadline = time.monotonic() + self.tx_wait
        while True:
            self.reclaim_tx(q.index)
            if len(q.free_descs) >= min(wanted, q.size) or time.monotonic() > deadline:
                return
            if q.kicked_idx != q.avail_idx:
                q.kick(force=True)
            q.wait_call(deadline - time.monotonic())

    def reclaim_tx(self, queue: int = TX_QUEUE) -> list[tuple[int, int]]:
        """Take back TX buffers the device has used; returns (head, len) pairs."""
        out = []
        for chain, length in self.queues[queue].pop_used():
            self._release(chain)
            out.append((chain.head, length))
        return out

    def wait_tx_done(self, timeout: float = 2.0, queue: int = TX_QUEUE) -> bool:
        """Wait until the device has used every TX buffer; returns whether it did."""
        q = self.queues[queue]
        deadline = time.monotonic() + timeout
        while True:
            self.reclaim_tx(queue)
            if not q.outstanding:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            q.wait_call(remaining)

    # -- RX --
    def post_rx_buffers(self, n: int, size: int = 2048, *, chain: int = 1, indirect: bool = False,
                        queue: int = RX_QUEUE, kick: bool = True) -> list[int]:
        """Make ``n`` receive buffers available, each a chain of ``chain``
        device-writable descriptors of ``size`` bytes."""
        q = self.queues[queue]
        heads = []
        for _ in range(n):
            buffers, allocations = [], []
            for _ in range(chain):
                gpa = self.arena.alloc(size)
                allocations.append((gpa, size))
                buffers.append((gpa, size, True))
            heads.append(q.add_chain(buffers, indirect=indirect, allocations=allocations, arena=self.arena))
        q.make_available(heads)
        if kick:
            q.kick()
        return heads

    def recv_frames(self, timeout: float = 1.0, count: int = 1, queue: int = RX_QUEUE,
                    poll: Optional[float] = 0.05) -> list[tuple[VirtioNetHdr, bytes]]:
        """Collect received frames until ``count`` of them or ``timeout`` seconds.

        Waits on the call eventfd (re-checking the used ring every ``poll``
        seconds unless ``poll`` is None, which makes a missing interrupt a
        timeout).  Mergeable buffers are joined using ``num_buffers``.  Used RX
        buffers are not re-posted."""
        q = self.queues[queue]
        frames: list[tuple[VirtioNetHdr, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            for chain, length in q.pop_used():
                frame = self._rx_used(chain, length)
                if frame is not None:
                    frames.append(frame)
            if len(frames) >= count:
                return frames
            full_barrier()   # used_event written by pop_used() before re-reading used idx
            if q.used_idx() != q.last_used:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return frames
            q.wait_call(remaining, poll)

    def _rx_used(self, chain: Chain, length: int) -> Optional[tuple[VirtioNetHdr, bytes]]:
        data = self._read_chain(chain, length)
        self._release(chain)
        mergeable = self.has(vu.VIRTIO_NET_F_MRG_RXBUF)
        if not self._rx_partial:
            if length < self.hdr_len:
                raise DeviceError(f"RX used len {length} is shorter than the {self.hdr_len}-byte header")
            hdr = VirtioNetHdr.unpack(data[:self.hdr_len])
            if not mergeable:
                return hdr, data[self.hdr_len:]
            if hdr.num_buffers == 0:
                raise DeviceError("RX header has num_buffers 0")
        self._rx_partial.append((data, length))
        first = self._rx_partial[0][0]
        hdr = VirtioNetHdr.unpack(first[:self.hdr_len])
        if len(self._rx_partial) < hdr.num_buffers:
            return None
        joined = b"".join(d for d, _ in self._rx_partial)
        self._rx_partial = []
        return hdr, joined[self.hdr_len:]

    def _read_chain(self, chain: Chain, length: int) -> bytes:
        out = bytearray()
        for gpa, n, writable in chain.buffers:
            if not writable or len(out) >= length:
                continue
            out += self.mem.read(gpa, min(n, length - len(out)))
        return bytes(out)

    def _release(self, chain: Chain) -> None:
        for base, size in chain.allocations:
            self.arena.release(base, size)

    # -- teardown --
    def stop(self) -> list[int]:
        """What QEMU does when the guest stops the device: disable the rings (if
        protocol features were negotiated), then GET_VRING_BASE each; returns the bases."""
        if self.has(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            for q in self.queues:
                self.set_vring_enable(q.index, False)
        return [self.get_vring_base(q.index) for q in self.queues]

    def close(self, graceful: bool = True) -> None:
        """Stop the rings (if ``graceful`` and the backend is still there), then
        close the connection, the eventfds and guest memory."""
        try:
            if graceful and self.queues and not self.frontend.peer_closed():
                self.stop()
        except (OSError, vu.ProtocolError):
            pass
        finally:
            self.frontend.close()
            for q in self.queues:
                q.close()
            self.stop_logging(send=False)
            self.mem.close()

    def __enter__(self) -> "VirtioNetDriver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
