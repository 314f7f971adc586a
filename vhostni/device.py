"""The vhost-user virtio-net device of one NI: validated requests in, fast-path calls and
replies out.

One ``VhostUserDevice`` per NI, one ``handle()`` call per request.  Like libvhost-user it is
one dispatch table with one method per request; unlike it, every failure is answered (a
REPLY_ACK nack, or a closed connection when the frontend would otherwise assume success)
and never takes the daemon down.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

from .fastpath import FastPathError, Region, VhostPort
from .vhost_user import proto
from .vhost_user.proto import ProtocolFeature, Request

log = logging.getLogger("vhostni.device")

MAX_QUEUE_PAIRS = 8

# What the fast path implements.  Offloads can be switched off per daemon (--offloads off)
# to measure or to serve peers that mishandle them.
BASE_FEATURES = proto.feature_mask(
    proto.VIRTIO_NET_F_MRG_RXBUF,
    proto.VIRTIO_F_ANY_LAYOUT,
    proto.VIRTIO_RING_F_INDIRECT_DESC,
    proto.VIRTIO_RING_F_EVENT_IDX,
    proto.VHOST_USER_F_PROTOCOL_FEATURES,
    proto.VIRTIO_F_VERSION_1,
    proto.VIRTIO_NET_F_MTU,
    # several queue pairs (QEMU's netdev queues=N): QEMU keeps this bit only if the backend
    # offers it; the control queue that sets the pairs in use is QEMU's own
    proto.VIRTIO_NET_F_MQ,
    # dirty-page logging while QEMU migrates the guest (SET_LOG_BASE with LOG_SHMFD)
    proto.VHOST_F_LOG_ALL,
)
OFFLOAD_FEATURES = proto.feature_mask(
    proto.VIRTIO_NET_F_CSUM,
    proto.VIRTIO_NET_F_GUEST_CSUM,
    proto.VIRTIO_NET_F_GUEST_TSO4,
    proto.VIRTIO_NET_F_GUEST_TSO6,
    proto.VIRTIO_NET_F_GUEST_ECN,
    proto.VIRTIO_NET_F_HOST_TSO4,
    proto.VIRTIO_NET_F_HOST_TSO6,
    proto.VIRTIO_NET_F_HOST_ECN,
)
PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ | ProtocolFeature.RARP | ProtocolFeature.REPLY_ACK | ProtocolFeature.NET_MTU
    | ProtocolFeature.LOG_SHMFD
)



_MEM_LIMIT: Optional[int] = None


def guest_memory_limit() -> int:
    """The most guest memory one NI may map: four times the host's (at least 16 GiB)."""
    global _MEM_LIMIT
    if _MEM_LIMIT is None:
        total = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        total = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
        _MEM_LIMIT = max(4 * total, 16 << 30)
    return _MEM_LIMIT


def _eventfd(fd: Optional[int], what: str, probe: bool = False) -> Optional[int]:
    """``fd`` if it is an eventfd in counter mode (what virtio's kicks and calls are), else it is closed
    and the request refused: a pipe or file would make the one data-plane thread of every NI block on
    a write, spin on a read at end of file, or (a semaphore eventfd) drain a counter of 2^64 one by one."""
    if fd is None:
        return None
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = f.read()
    except OSError as exc:
        proto.close_fds([fd])
        raise _Refused(f"{what} fd: cannot tell what it is ({exc})") from None
    if kind != "anon_inode:[eventfd]" or re.search(r"^eventfd-semaphore:\s*1\s*$", info, re.M):
        proto.close_fds([fd])
        raise _Refused(f"{what} fd is not an eventfd in counter mode ({kind})")
    if probe:
        # kernels before 6.6 do not say whether an eventfd is a semaphore: ask it.  Add 2 and read:
        # a counter hands back all it holds (2 or more), a semaphore 1.  (Nothing else reads a kick
        # fd, and a kick consumed here is no loss: a new ring is serviced once anyway.)
        try:
            os.set_blocking(fd, False)
            os.eventfd_write(fd, 2)
            got = os.eventfd_read(fd)
        except OSError as exc:        # EAGAIN: a counter about to overflow
            proto.close_fds([fd])
            raise _Refused(f"{what} fd: an eventfd that cannot be used ({exc})") from None
        if got < 2:
            proto.close_fds([fd])
            raise _Refused(f"{what} fd is an eventfd in semaphore mode")
    return fd

class CloseConnection(Exception):
    """The frontend broke the protocol in a way we cannot answer: drop the connection."""


@dataclass
class DeviceCounters:
    messages: int = 0
    errors: int = 0
    sessions: int = 0
    last_error: str = ""


@dataclass
class VhostUserDevice:
    name: str
    port: VhostPort
    offloads: bool = True
    counters: DeviceCounters = field(default_factory=DeviceCounters)
    # set by the daemon: called with the guest MAC from SEND_RARP
    on_rarp: Optional[Callable[[bytes], None]] = None
    # Live migration: a second frontend on the NI's socket (the destination QEMU) is a
    # *standby* session.  It negotiates (features, protocol features, owner, call fds,
    # ring enables: all kept in the session) without touching the port; the first request
    # that configures the device (memory table, rings, log) calls on_promote, which makes
    # it the NI's active session or raises CloseConnection.
    standby: bool = False
    on_promote: Optional[Callable[["VhostUserDevice"], None]] = None

    def __post_init__(self) -> None:
        self.features_offered = BASE_FEATURES | (OFFLOAD_FEATURES if self.offloads else 0)
        self.deferred_calls: dict[int, Optional[int]] = {}
        self._reset_session()

    def _reset_session(self) -> None:
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mtu: Optional[int] = None
        self.bases: dict[int, int] = {}           # GET_VRING_BASE answers given while active
        self.deferred_enable: dict[int, bool] = {}
        self._close_deferred()

    def _close_deferred(self) -> None:
        proto.close_fds(fd for fd in self.deferred_calls.values() if fd is not None)
        self.deferred_calls = {}

    # ---- connection lifetime
    def connected(self) -> None:
        self.counters.sessions += 1
        self._reset_session()

    def disconnected(self) -> None:
        """The frontend went away (QEMU quit, crashed or will reconnect): forget its memory,
        rings and fds; the NI keeps its place on the switch.  A standby session never
        configured the port: only its own state goes."""
        if not self.standby:
            self.port.reset()
        self._reset_session()

    def activate(self) -> None:
        """This (standby) session takes the port over (the caller reset it): what it
        negotiated while standby is applied."""
        self.standby = False
        if self.features:
            self._apply_features(self.features)
        for q, fd in self.deferred_calls.items():
            self.port.set_vring_call(q, fd)          # takes the fd
        self.deferred_calls = {}
        for q, on in self.deferred_enable.items():
            self.port.set_vring_enable(q, on)
        self.deferred_enable = {}

    def demote(self) -> None:
        """Another session took the port over; this one stays connected as the standby."""
        self.standby = True

    # ---- requests
    def handle(self, msg: proto.Message) -> Optional[bytes]:
        """Executes one validated request; returns the reply bytes, or None.
        Raises CloseConnection when the connection must be dropped."""
        self.counters.messages += 1
        log.debug("%s: %s %s", self.name, msg.request.name, msg.body)
        handler = self._HANDLERS.get(msg.request)
        try:
            if self.standby and handler is not None:
                local = self._STANDBY_HANDLERS.get(msg.request)
                if local is not None:
                    handler = local
                elif self.on_promote is None:
                    raise CloseConnection("a standby session cannot configure the device")
                else:
                    self.on_promote(self)     # raises CloseConnection if refused
            if handler is None:
                raise _Refused(f"{msg.request.name} is not supported")
            body = handler(self, msg)
        except (_Refused, FastPathError) as exc:
            self.counters.errors += 1
            self.counters.last_error = f"{msg.request.name}: {exc}"
            log.warning("%s: refused %s: %s", self.name, msg.request.name, exc)
            msg.close()
            if proto.REQUESTS[msg.request].reply is not None:
                raise CloseConnection(str(exc)) from None
            if msg.need_reply and self.protocol_features & ProtocolFeature.REPLY_ACK:
                return proto.encode_ack(msg.request, False)
            raise CloseConnection(str(exc)) from None
        finally:
            msg.close()
        if body is not None:
            return proto.encode_reply(msg.request, body)
        if msg.need_reply and self.protocol_features & ProtocolFeature.REPLY_ACK:
            return proto.encode_ack(msg.request, True)
        return None

    def _queue(self, index: int) -> int:
        if index >= 2 * MAX_QUEUE_PAIRS:
            raise _Refused(f"queue {index} beyond the {2 * MAX_QUEUE_PAIRS} this device has")
        return index

    def _get_features(self, msg):
        return proto.U64(self.features_offered)

    def _set_features(self, msg):
        f = msg.body.value
        if f & ~self.features_offered:
            raise _Refused(f"features {f & ~self.features_offered:#x} were not offered")
        self.features = f
        self._apply_features(f)

    def _apply_features(self, f: int) -> None:
        self.port.set_features(f)
        if not f & (1 << proto.VHOST_USER_F_PROTOCOL_FEATURES):
            # without protocol features there is no SET_VRING_ENABLE: rings are enabled
            # (QEMU enables them before SET_FEATURES when it does negotiate them)
            for q in range(2 * MAX_QUEUE_PAIRS):
                self.port.set_vring_enable(q, True)

    def _set_owner(self, msg):
        self.owner = True

    def _reset_owner(self, msg):
        self.port.reset()
        self._reset_session()

    def _get_protocol_features(self, msg):
        return proto.U64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg):
        f = msg.body.value
        if f & ~PROTOCOL_FEATURES:
            raise _Refused(f"protocol features {f & ~PROTOCOL_FEATURES:#x} were not offered")
        self.protocol_features = f

    def _get_queue_num(self, msg):
        return proto.U64(MAX_QUEUE_PAIRS)

    def _set_mem_table(self, msg):
        table = msg.body
        fds = msg.take_fds()
        total = sum(r.memory_size for r in table.regions)
        if total > guest_memory_limit():
            # sparse files cost the frontend nothing, but the daemon's address space is every NI's
            proto.close_fds(fds)
            raise _Refused(f"guest memory of {total} bytes: more than {guest_memory_limit()} "
                           "(four times this host's memory) for one NI")
        try:
            self.port.set_mem_table(
                [Region(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in table.regions],
                fds,
            )
        finally:
            proto.close_fds(fds)  # mapped (or refused): the fds are no longer needed

    def _set_vring_num(self, msg):
        self.port.set_vring_num(self._queue(msg.body.index), msg.body.num)

    def _set_vring_addr(self, msg):
        b = msg.body
        q = self._queue(b.index)
        self.port.set_vring_addr(q, b.desc, b.used, b.avail)
        # QEMU re-sends the address with VRING_F_LOG set when a migration starts (and
        # without when it ends); b.log is the used ring's guest-physical address
        self.port.set_vring_log(q, bool(b.flags & proto.VRING_F_LOG), b.log)

    def _set_log_base(self, msg):
        if not self.protocol_features & ProtocolFeature.LOG_SHMFD:
            raise _Refused("SET_LOG_BASE without LOG_SHMFD")
        fd = msg.take_fd()
        try:
            self.port.set_log(fd, msg.body.mmap_size, msg.body.mmap_offset)
        finally:
            proto.close_fds([fd])
        # under LOG_SHMFD the frontend waits for a reply (libvhost-user sends a u64 0)
        return proto.U64(0)

    def _set_vring_base(self, msg):
        self.port.set_vring_base(self._queue(msg.body.index), msg.body.num)

    def _get_vring_base(self, msg):
        q = self._queue(msg.body.index)
        self.bases[q] = self.port.get_vring_base(q)
        return proto.VringState(q, self.bases[q])

    # ---- a standby session: kept in the session, the port untouched
    def _standby_set_features(self, msg):
        f = msg.body.value
        if f & ~self.features_offered:
            raise _Refused(f"features {f & ~self.features_offered:#x} were not offered")
        self.features = f

    def _standby_get_vring_base(self, msg):
        # the source QEMU, demoted after the hand-over, asking again: what it was told
        q = self._queue(msg.body.index)
        return proto.VringState(q, self.bases.get(q, 0))

    def _standby_set_vring_call(self, msg):
        q = self._queue(msg.body.index)
        fd = _eventfd(msg.take_fd(), "call")
        old = self.deferred_calls.pop(q, None)
        if old is not None:
            proto.close_fds([old])
        self.deferred_calls[q] = fd

    def _standby_set_vring_enable(self, msg):
        self.deferred_enable[self._queue(msg.body.index)] = bool(msg.body.num)

    def _standby_reset_owner(self, msg):
        self._reset_session()

    def _set_vring_kick(self, msg):
        q = self._queue(msg.body.index)
        fd = _eventfd(msg.take_fd(), "kick", probe=True)
        self.port.set_vring_kick(q, fd)

    def _set_vring_call(self, msg):
        q = self._queue(msg.body.index)
        self.port.set_vring_call(q, _eventfd(msg.take_fd(), "call"))

    def _set_vring_err(self, msg):
        self._queue(msg.body.index)
        proto.close_fds(msg.take_fds())  # we report errors by breaking the port, not this fd

    def _set_vring_enable(self, msg):
        self.port.set_vring_enable(self._queue(msg.body.index), bool(msg.body.num))

    def _send_rarp(self, msg):
        mac = struct.pack("<Q", msg.body.value)[:6]
        if self.on_rarp is not None:
            self.on_rarp(mac)

    def _net_set_mtu(self, msg):
        mtu = msg.body.value
        if not 68 <= mtu <= 65535:
            raise _Refused(f"MTU {mtu} out of range 68..65535")
        self.mtu = mtu

    _HANDLERS = {
        Request.GET_FEATURES: _get_features,
        Request.SET_FEATURES: _set_features,
        Request.SET_OWNER: _set_owner,
        Request.RESET_OWNER: _reset_owner,
        Request.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Request.GET_QUEUE_NUM: _get_queue_num,
        Request.SET_MEM_TABLE: _set_mem_table,
        Request.SET_VRING_NUM: _set_vring_num,
        Request.SET_VRING_ADDR: _set_vring_addr,
        Request.SET_VRING_BASE: _set_vring_base,
        Request.SET_LOG_BASE: _set_log_base,
        Request.GET_VRING_BASE: _get_vring_base,
        Request.SET_VRING_KICK: _set_vring_kick,
        Request.SET_VRING_CALL: _set_vring_call,
        Request.SET_VRING_ERR: _set_vring_err,
        Request.SET_VRING_ENABLE: _set_vring_enable,
        Request.SEND_RARP: _send_rarp,
        Request.NET_SET_MTU: _net_set_mtu,
    }


# What a standby session may do without taking the port over.  Everything else that has a
# handler (SET_MEM_TABLE, SET_VRING_NUM/ADDR/BASE/KICK, SET_LOG_BASE, SEND_RARP) promotes it.
VhostUserDevice._STANDBY_HANDLERS = {
    Request.GET_FEATURES: VhostUserDevice._get_features,
    Request.SET_FEATURES: VhostUserDevice._standby_set_features,
    Request.SET_OWNER: VhostUserDevice._set_owner,
    Request.RESET_OWNER: VhostUserDevice._standby_reset_owner,
    Request.GET_PROTOCOL_FEATURES: VhostUserDevice._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: VhostUserDevice._set_protocol_features,
    Request.GET_QUEUE_NUM: VhostUserDevice._get_queue_num,
    Request.GET_VRING_BASE: VhostUserDevice._standby_get_vring_base,
    Request.SET_VRING_CALL: VhostUserDevice._standby_set_vring_call,
    Request.SET_VRING_ERR: VhostUserDevice._set_vring_err,
    Request.SET_VRING_ENABLE: VhostUserDevice._standby_set_vring_enable,
    Request.NET_SET_MTU: VhostUserDevice._net_set_mtu,
}


class _Refused(Exception):
    pass


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request a migrated guest's NIC announces itself with."""
    return (b"\xff" * 6 + mac + b"\x80\x35"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3)
            + mac + b"\0" * 4 + mac + b"\0" * 4).ljust(60, b"\0")
