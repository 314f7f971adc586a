"""Sans-I/O codec of the vhost-user protocol (QEMU docs/interop/vhost-user.rst).

No sockets here: bytes and file-descriptor numbers in, typed messages out, and back.
The backend uses :func:`parse_header`, :func:`decode_request`, :func:`encode_reply`
and :func:`encode_ack`; a test frontend uses :func:`encode_request` and
:func:`decode_reply`.

Validation happens here, once, at the boundary: a :class:`Message` that comes out
of :func:`decode_request` has a payload of exactly the right size, exactly the
file descriptors its request carries, and bodies whose fields are in range (ring
indices, memory regions that neither wrap nor overlap).  What the codec cannot
know is the negotiated state (features, ring sizes, whether the memory table is
set): that stays with the device.

Wire format: every number is in the host's byte order.  vhost-user only runs
between processes on one host, and every supported host here is little-endian,
so the formats below say ``<`` explicitly rather than depend on ``=``.

File descriptors and errors
---------------------------
The caller receives fds with the bytes (SCM_RIGHTS) and passes them in.  If
:func:`decode_request` raises :class:`ProtocolError`, nothing was taken: the
caller still owns every fd it passed in and must close them (:func:`close_fds`).
If it returns a :class:`Message`, the message owns them until a handler takes
them with :meth:`Message.take_fds` (or :meth:`Message.take_fd`); whatever is
left is closed by :meth:`Message.close` (the message is a context manager).
A :class:`ProtocolError` never holds an fd.

A :class:`ProtocolError` from :func:`parse_header` means the byte stream can no
longer be framed: close the connection.  One from :func:`decode_request` means
the message was framed correctly but is invalid: the caller may NACK it (if it
asked for a reply) and go on, or close the connection.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Optional, Sequence, Union

__all__ = [
    # constants
    "Request", "ProtocolFeature", "VERSION", "VERSION_MASK", "REPLY", "NEED_REPLY",
    "HEADER_SIZE", "MAX_PAYLOAD", "MAX_REGIONS", "MAX_FDS", "MAX_RINGS", "MAX_QUEUE_SIZE",
    "VRING_F_LOG", "feature_mask",
    "VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM", "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
    "VIRTIO_NET_F_MTU", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_GUEST_TSO4", "VIRTIO_NET_F_GUEST_TSO6",
    "VIRTIO_NET_F_GUEST_ECN", "VIRTIO_NET_F_GUEST_UFO", "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_HOST_TSO6", "VIRTIO_NET_F_HOST_ECN", "VIRTIO_NET_F_HOST_UFO",
    "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS", "VIRTIO_NET_F_CTRL_VQ", "VIRTIO_NET_F_CTRL_RX",
    "VIRTIO_NET_F_CTRL_VLAN", "VIRTIO_NET_F_GUEST_ANNOUNCE", "VIRTIO_NET_F_MQ",
    "VIRTIO_NET_F_CTRL_MAC_ADDR", "VIRTIO_F_NOTIFY_ON_EMPTY", "VHOST_F_LOG_ALL",
    "VIRTIO_F_ANY_LAYOUT", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX",
    "VHOST_USER_F_PROTOCOL_FEATURES", "VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_RING_PACKED", "VIRTIO_F_IN_ORDER",
    # header and errors
    "ProtocolError", "Header", "parse_header",
    # bodies
    "Body", "Empty", "U64", "VringState", "VringAddr", "VringFile", "MemoryRegion", "MemoryTable",
    "SingleMemoryRegion", "Log", "Raw",
    # the request table and the two sides
    "RequestSpec", "REQUESTS", "reply_expected", "Message", "close_fds",
    "decode_request", "encode_reply", "encode_ack", "encode_request", "decode_reply",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------


class Request(enum.IntEnum):
    """Front-end requests (front-end -> back-end), with their wire numbers."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntFlag):
    """Protocol feature *masks* (``1 << VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
_KNOWN_FLAGS = VERSION_MASK | REPLY | NEED_REPLY

# Virtio feature *bit numbers* (the spec's #defines); use feature_mask() for masks.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# Bit 0 of VringAddr.flags: log writes to the used ring (VHOST_VRING_F_LOG).
VRING_F_LOG = 0x1


def feature_mask(*bits: int) -> int:
    """The u64 mask with the given feature bit numbers set."""
    mask = 0
    for bit in bits:
        if not 0 <= bit < 64:
            raise ValueError(f"feature bit {bit} out of range")
        mask |= 1 << bit
    return mask


HEADER_SIZE = 12

# The largest payload accepted.  The biggest fixed-shape message is SET_MEM_TABLE
# with 8 regions (8 + 8*32 = 264 bytes); the variable ones (GET/SET_CONFIG,
# crypto sessions) stay under 4 KiB because a virtio config space is smaller
# than that.  The header's size field is a u32: without a cap a hostile
# front-end could make the back-end allocate and wait for up to 4 GiB.
MAX_PAYLOAD = 4096

# At most this many regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS),
# hence at most this many fds on any message: size SCM_RIGHTS buffers for it and
# treat a truncated control message (MSG_CTRUNC) as an error.
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS

# Ring indices above 255 cannot be addressed by SET_VRING_KICK/CALL/ERR (8 bits),
# so no ring with a larger index can ever run; reject them everywhere.
MAX_RINGS = 256

# The virtio spec's upper bound on a queue's size.
MAX_QUEUE_SIZE = 32768

_U64_MAX = (1 << 64) - 1


class ProtocolError(Exception):
    """A message that breaks the vhost-user protocol.

    ``request`` is the request number (a :class:`Request` if known, an int if
    not, None if the header itself was unreadable); ``reason`` says what is
    wrong.  It never owns file descriptors.
    """

    def __init__(self, request: Optional[int], reason: str):
        self.request = request
        self.reason = reason
        super().__init__(f"{_request_name(request)}: {reason}")


def _request_name(request: Optional[int]) -> str:
    if request is None:
        return "vhost-user header"
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


# ---------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------

_HEADER = struct.Struct("<III")


@dataclass(frozen=True)
class Header:
    """The 12-byte header: request number, flags, payload size."""

    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def pack(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)


def parse_header(data: bytes) -> Header:
    """Parse and check a header: exactly 12 bytes, version 1, no unknown flag bits,
    size at most :data:`MAX_PAYLOAD`.  The request number is not checked here (a
    message with an unknown request can still be framed and skipped)."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(None, f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    request, flags, size = _HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(request, f"unsupported version {flags & VERSION_MASK}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(request, f"reserved flag bits set: {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(request, f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    try:
        request = Request(request)
    except ValueError:
        pass
    return Header(request, flags, size)


# ---------------------------------------------------------------------------
# Payload bodies
# ---------------------------------------------------------------------------
#
# Each body type packs to and unpacks from its exact wire bytes; unpack() checks
# the size and the fields that are wrong whatever was negotiated, and raises
# ValueError, which decode_request turns into a ProtocolError naming the request.


@dataclass(frozen=True)
class Empty:
    """No payload."""

    SIZE: ClassVar[int] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> "Empty":
        _check_size(data, 0)
        return cls()


@dataclass(frozen=True)
class U64:
    """A single u64 (features, protocol features, queue count, MTU, ack status...)."""

    value: int
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self._S.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> "U64":
        _check_size(data, cls.SIZE)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""

    index: int
    num: int
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> "VringState":
        _check_size(data, cls.SIZE)
        state = cls(*cls._S.unpack(data))
        _check_ring_index(state.index)
        return state


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``.  ``desc``, ``used`` and ``avail`` are front-end
    *user* addresses (translate them with the regions' ``userspace_addr``);
    ``log`` is a guest-physical address used only when ``flags & VRING_F_LOG``."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    SIZE: ClassVar[int] = 40
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> "VringAddr":
        _check_size(data, cls.SIZE)
        addr = cls(*cls._S.unpack(data))
        _check_ring_index(addr.index)
        if addr.flags & ~VRING_F_LOG:
            raise ValueError(f"unknown vring flags {addr.flags:#x}")
        return addr


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index in bits 0-7, bit 8 set when
    no fd is attached ("invalid fd": poll instead).  ``fd`` is the attached fd
    (owned by the Message, not by this body), None when ``invalid``."""

    index: int
    invalid: bool = False
    fd: Optional[int] = None
    SIZE: ClassVar[int] = 8
    INDEX_MASK: ClassVar[int] = 0xFF
    NOFD_FLAG: ClassVar[int] = 0x100

    def pack(self) -> bytes:
        return U64((self.index & self.INDEX_MASK) | (self.NOFD_FLAG if self.invalid else 0)).pack()

    @classmethod
    def unpack(cls, data: bytes) -> "VringFile":
        value = U64.unpack(data).value
        if value & ~(cls.INDEX_MASK | cls.NOFD_FLAG):
            raise ValueError(f"reserved bits set in {value:#x}")
        return cls(value & cls.INDEX_MASK, bool(value & cls.NOFD_FLAG))

    def attached_fds(self) -> list[int]:
        return [] if self.invalid or self.fd is None else [self.fd]


@dataclass(frozen=True)
class MemoryRegion:
    """One guest memory region: ``memory_size`` bytes at ``guest_phys_addr``,
    mapped by the front-end at ``userspace_addr``, found at ``mmap_offset`` in
    the region's fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int] = 32
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> "MemoryRegion":
        _check_size(data, cls.SIZE)
        region = cls(*cls._S.unpack(data))
        region.check()
        return region

    @property
    def guest_end(self) -> int:
        """One past the last guest-physical address."""
        return self.guest_phys_addr + self.memory_size

    @property
    def user_end(self) -> int:
        return self.userspace_addr + self.memory_size

    def check(self) -> None:
        """Raise ValueError unless the region is non-empty and none of its three
        ranges wraps past 2**64."""
        if self.memory_size == 0:
            raise ValueError("memory region of size 0")
        for name, start in (("guest", self.guest_phys_addr), ("user", self.userspace_addr),
                            ("mmap offset", self.mmap_offset)):
            if start + self.memory_size - 1 > _U64_MAX:
                raise ValueError(f"{name} range {start:#x}+{self.memory_size:#x} overflows u64")


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE's payload: ``nregions`` (u32), padding (u32), then that many
    regions (never padded to 8 on the wire by QEMU or DPDK, so the size is exact).
    ``fds`` holds one fd per region, in order: for encoding, the fds to attach;
    after decoding, the Message's fds (owned by the Message, not by this body)."""

    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...] = ()
    _COUNT: ClassVar[struct.Struct] = struct.Struct("<II")

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "fds", tuple(self.fds))

    def pack(self) -> bytes:
        return self._COUNT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> "MemoryTable":
        if len(data) < cls._COUNT.size:
            raise ValueError(f"payload is {len(data)} bytes, too short for a region count")
        nregions, _padding = cls._COUNT.unpack_from(data)
        if nregions > MAX_REGIONS:
            raise ValueError(f"{nregions} regions, at most {MAX_REGIONS} allowed")
        _check_size(data, cls._COUNT.size + nregions * MemoryRegion.SIZE)
        regions = tuple(
            MemoryRegion.unpack(data[off:off + MemoryRegion.SIZE])
            for off in range(cls._COUNT.size, len(data), MemoryRegion.SIZE))
        table = cls(regions)
        table.check_disjoint()
        return table

    def check_disjoint(self) -> None:
        """Raise ValueError if two regions overlap in guest-physical or in user
        address space (either would make address translation ambiguous)."""
        for name, start, end in (("guest-physical", "guest_phys_addr", "guest_end"),
                                 ("user", "userspace_addr", "user_end")):
            spans = sorted((getattr(r, start), getattr(r, end)) for r in self.regions)
            for (_s0, e0), (s1, _e1) in zip(spans, spans[1:]):
                if s1 < e0:
                    raise ValueError(f"regions overlap in {name} space at {s1:#x}")

    def attached_fds(self) -> list[int]:
        return list(self.fds)


@dataclass(frozen=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding, then one region."""

    region: MemoryRegion
    SIZE: ClassVar[int] = 8 + MemoryRegion.SIZE

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> "SingleMemoryRegion":
        _check_size(data, cls.SIZE)
        return cls(MemoryRegion.unpack(data[8:]))


@dataclass(frozen=True)
class Log:
    """SET_LOG_BASE payload with LOG_SHMFD: size and offset of the dirty log in the attached fd."""

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int] = 16
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> "Log":
        _check_size(data, cls.SIZE)
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class Raw:
    """The uninterpreted payload of a request this codec does not model (config
    space, crypto, inflight, IOTLB, shared objects, device state).  Its size is
    still checked against the request's rule."""

    data: bytes

    def pack(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def unpack(cls, data: bytes) -> "Raw":
        return cls(bytes(data))


Body = Union[Empty, U64, VringState, VringAddr, VringFile, MemoryTable, SingleMemoryRegion, Log, Raw]


def _check_size(data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise ValueError(f"payload is {len(data)} bytes, expected {expected}")


def _check_ring_index(index: int) -> None:
    if index >= MAX_RINGS:
        raise ValueError(f"ring index {index} out of range (max {MAX_RINGS - 1})")


# ---------------------------------------------------------------------------
# The request table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """What one request carries.

    ``body``: payload type; ``sizes``: for Raw bodies, the allowed payload sizes
    (a range); ``fds``: allowed number of attached fds (a range; SET_MEM_TABLE
    and SET_VRING_KICK/CALL/ERR are checked against their payload as well);
    ``reply``: the body type of the reply every such request gets, or None when
    it gets one only as a REPLY_ACK (NEED_REPLY set and REPLY_ACK negotiated).
    """

    body: type
    reply: Optional[type] = None
    fds: range = range(0, 1)
    sizes: Optional[range] = None


_ONE_FD = range(1, 2)
_RAW_ANY = range(0, MAX_PAYLOAD + 1)

REQUESTS: dict[Request, RequestSpec] = {
    Request.GET_FEATURES: RequestSpec(Empty, reply=U64),
    Request.SET_FEATURES: RequestSpec(U64),
    Request.SET_OWNER: RequestSpec(Empty),
    Request.RESET_OWNER: RequestSpec(Empty),
    Request.SET_MEM_TABLE: RequestSpec(MemoryTable, fds=range(0, MAX_REGIONS + 1)),
    # With LOG_SHMFD (the only form QEMU uses) the back-end also replies (empty).
    Request.SET_LOG_BASE: RequestSpec(Log, fds=_ONE_FD),
    Request.SET_LOG_FD: RequestSpec(Empty, fds=_ONE_FD),
    Request.SET_VRING_NUM: RequestSpec(VringState),
    Request.SET_VRING_ADDR: RequestSpec(VringAddr),
    Request.SET_VRING_BASE: RequestSpec(VringState),
    Request.GET_VRING_BASE: RequestSpec(VringState, reply=VringState),
    Request.SET_VRING_KICK: RequestSpec(VringFile, fds=range(0, 2)),
    Request.SET_VRING_CALL: RequestSpec(VringFile, fds=range(0, 2)),
    Request.SET_VRING_ERR: RequestSpec(VringFile, fds=range(0, 2)),
    Request.GET_PROTOCOL_FEATURES: RequestSpec(Empty, reply=U64),
    Request.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    Request.GET_QUEUE_NUM: RequestSpec(Empty, reply=U64),
    Request.SET_VRING_ENABLE: RequestSpec(VringState),
    Request.SEND_RARP: RequestSpec(U64),  # the guest's MAC in the first 6 bytes
    Request.NET_SET_MTU: RequestSpec(U64),
    Request.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=_ONE_FD),
    Request.IOTLB_MSG: RequestSpec(Raw, reply=U64, sizes=range(32, 33)),
    Request.SET_VRING_ENDIAN: RequestSpec(VringState),
    Request.GET_CONFIG: RequestSpec(Raw, reply=Raw, sizes=range(12, MAX_PAYLOAD + 1)),
    Request.SET_CONFIG: RequestSpec(Raw, sizes=range(12, MAX_PAYLOAD + 1)),
    Request.CREATE_CRYPTO_SESSION: RequestSpec(Raw, reply=Raw, sizes=_RAW_ANY),
    Request.CLOSE_CRYPTO_SESSION: RequestSpec(U64),
    Request.POSTCOPY_ADVISE: RequestSpec(Empty, reply=Empty),  # the reply carries a userfaultfd
    Request.POSTCOPY_LISTEN: RequestSpec(Empty),
    Request.POSTCOPY_END: RequestSpec(Empty, reply=U64),
    Request.GET_INFLIGHT_FD: RequestSpec(Raw, reply=Raw, sizes=range(24, 25)),
    Request.SET_INFLIGHT_FD: RequestSpec(Raw, fds=_ONE_FD, sizes=range(24, 25)),
    Request.GPU_SET_SOCKET: RequestSpec(Empty, fds=_ONE_FD),
    Request.RESET_DEVICE: RequestSpec(Empty),
    Request.VRING_KICK: RequestSpec(VringState),
    Request.GET_MAX_MEM_SLOTS: RequestSpec(Empty, reply=U64),
    Request.ADD_MEM_REG: RequestSpec(SingleMemoryRegion, fds=_ONE_FD),
    # The spec lets a back-end accept (and must then close) one stray fd here.
    Request.REM_MEM_REG: RequestSpec(SingleMemoryRegion, fds=range(0, 2)),
    Request.SET_STATUS: RequestSpec(U64),
    Request.GET_STATUS: RequestSpec(Empty, reply=U64),
    Request.GET_SHARED_OBJECT: RequestSpec(Raw, reply=U64, sizes=range(16, 17)),
    Request.SET_DEVICE_STATE_FD: RequestSpec(Raw, reply=U64, fds=_ONE_FD, sizes=range(8, 9)),
    Request.CHECK_DEVICE_STATE: RequestSpec(Empty, reply=U64),
}


def reply_expected(request: int, need_reply: bool, protocol_features: int) -> bool:
    """Whether the back-end must answer this request, given the negotiated
    protocol features: always for requests with a reply body (GET_FEATURES,
    GET_PROTOCOL_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM, ...), for SET_LOG_BASE
    under LOG_SHMFD, and for any other request only when it set NEED_REPLY and
    REPLY_ACK was negotiated."""
    spec = REQUESTS.get(request)
    if spec is not None and spec.reply is not None:
        return True
    if request == Request.SET_LOG_BASE and protocol_features & ProtocolFeature.LOG_SHMFD:
        return True
    return need_reply and bool(protocol_features & ProtocolFeature.REPLY_ACK)


# ---------------------------------------------------------------------------
# Back-end side: requests in, replies out
# ---------------------------------------------------------------------------


@dataclass
class Message:
    """A validated request.  Owns ``fds`` until they are taken; see the module doc."""

    request: Request
    flags: int
    body: Body
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def take_fds(self) -> list[int]:
        """Hand every fd over to the caller (who must close them); the message keeps none."""
        fds, self.fds = self.fds, []
        return fds

    def take_fd(self) -> Optional[int]:
        """The single attached fd, handed over to the caller; None if there is none."""
        fds = self.take_fds()
        if len(fds) > 1:  # decode_request never lets this happen
            close_fds(fds[1:])
        return fds[0] if fds else None

    def close(self) -> None:
        """Close the fds nobody took."""
        close_fds(self.take_fds())

    def __enter__(self) -> "Message":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def decode_request(header: Header, payload: bytes, fds: Sequence[int] = ()) -> Message:
    """Validate one request (front-end -> back-end) and type its payload.

    ``header`` comes from :func:`parse_header`, ``payload`` is its ``size`` bytes,
    ``fds`` the fds received with the message.  Raises :class:`ProtocolError` on
    any violation; the caller then still owns ``fds`` and must close them."""
    request = header.request
    try:
        request = Request(request)
    except ValueError:
        raise ProtocolError(request, "unknown request") from None
    if header.is_reply:
        raise ProtocolError(request, "reply flag set on a request")
    if len(payload) != header.size:
        raise ProtocolError(request, f"payload is {len(payload)} bytes, header says {header.size}")
    spec = REQUESTS[request]
    if spec.sizes is not None and len(payload) not in spec.sizes:
        raise ProtocolError(request, f"payload of {len(payload)} bytes, expected "
                                     f"{spec.sizes.start}..{spec.sizes.stop - 1}")
    try:
        body = spec.body.unpack(payload)
    except (ValueError, struct.error) as exc:
        raise ProtocolError(request, str(exc)) from None

    nfds = len(fds)
    if nfds not in spec.fds:
        raise ProtocolError(request, f"{nfds} fds attached, expected "
                                     f"{_describe_range(spec.fds)}")
    if isinstance(body, MemoryTable):
        if nfds != len(body.regions):
            raise ProtocolError(request, f"{nfds} fds attached for {len(body.regions)} regions")
        body = MemoryTable(body.regions, tuple(fds))
    elif isinstance(body, VringFile):
        expected = 0 if body.invalid else 1
        if nfds != expected:
            raise ProtocolError(request, f"{nfds} fds attached, expected {expected} "
                                         f"({'no-fd flag set' if body.invalid else 'no-fd flag clear'})")
        if not body.invalid:
            body = VringFile(body.index, False, fds[0])
    elif request == Request.SET_VRING_NUM and not 1 <= body.num <= MAX_QUEUE_SIZE:
        raise ProtocolError(request, f"queue size {body.num} out of range 1..{MAX_QUEUE_SIZE}")
    elif request == Request.SET_VRING_ENABLE and body.num not in (0, 1):
        raise ProtocolError(request, f"enable value {body.num} is neither 0 nor 1")
    return Message(request, header.flags, body, list(fds))


def _describe_range(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}..{r.stop - 1}"


def _encode(request: int, flags: int, payload: bytes) -> bytes:
    return Header(int(request), flags, len(payload)).pack() + payload


def encode_reply(request: int, body: Body) -> bytes:
    """A reply (back-end -> front-end) carrying ``body``: version 1, REPLY flag."""
    return _encode(request, VERSION | REPLY, body.pack())


def encode_ack(request: int, ok: bool) -> bytes:
    """The REPLY_ACK answer to a request sent with NEED_REPLY: u64 0 on success,
    1 on failure."""
    return encode_reply(request, U64(0 if ok else 1))


# ---------------------------------------------------------------------------
# Front-end side: requests out, replies in
# ---------------------------------------------------------------------------


def encode_request(request: int, body: Optional[Body] = None, need_reply: bool = False,
                   fds: Optional[Sequence[int]] = None) -> tuple[bytes, list[int]]:
    """A request (front-end -> back-end) and the fds to send with it.

    The fds default to those the body carries (VringFile.fd, MemoryTable.fds);
    pass ``fds`` to attach others (SET_LOG_FD, SET_BACKEND_REQ_FD, or a test that
    wants to attach the wrong ones).  The body is not validated: a test frontend
    must be able to send malformed messages."""
    if body is None:
        body = Empty()
    if fds is None:
        fds = body.attached_fds() if hasattr(body, "attached_fds") else []
    flags = VERSION | (NEED_REPLY if need_reply else 0)
    return _encode(request, flags, body.pack()), list(fds)


def decode_reply(header: Header, payload: bytes) -> Body:
    """Type the payload of a reply (back-end -> front-end) to ``header.request``:
    its reply body (see :data:`REQUESTS`), or a U64 ack for requests without one.
    Raises :class:`ProtocolError` if it is not a reply or has the wrong size."""
    request = header.request
    try:
        request = Request(request)
    except ValueError:
        raise ProtocolError(request, "reply to an unknown request") from None
    if not header.is_reply:
        raise ProtocolError(request, "reply flag missing")
    if len(payload) != header.size:
        raise ProtocolError(request, f"payload is {len(payload)} bytes, header says {header.size}")
    reply_type = REQUESTS[request].reply
    if reply_type is None:
        # A REPLY_ACK, or SET_LOG_BASE's empty acknowledgement under LOG_SHMFD.
        reply_type = Empty if request == Request.SET_LOG_BASE and not payload else U64
    try:
        return reply_type.unpack(payload)
    except (ValueError, struct.error) as exc:
        raise ProtocolError(request, f"bad reply: {exc}") from None
