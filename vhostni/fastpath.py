"""Python face of the C fast path (csrc/, built by cffi into vhostni._fastpath).

Only configuration and counters cross this boundary; frames never do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from ._fastpath import ffi, lib

STAT_FIELDS = tuple(name for name, _ in ffi.typeof("struct vn_port_stats").fields)

RUN_TIMEOUT = lib.VN_RUN_TIMEOUT
RUN_WAKE = lib.VN_RUN_WAKE
ISOLATE_QUARANTINE = lib.VN_ISOLATE_QUARANTINE   # drop all but the policy's quarantine-allow rules
ISOLATE_LINK_DOWN = lib.VN_ISOLATE_LINK_DOWN     # drop everything, both ways


MAX_PORTS = lib.VN_MAX_PORTS
MAX_QUEUES = lib.VN_MAX_QUEUES      # virtqueues of a vhost port: 2 per queue pair


class SwitchFull(ValueError):
    """Every port slot of the switch is taken."""


class FastPathError(Exception):
    """A configuration call the fast path refused; ``code`` is the VN_E* value."""

    def __init__(self, what: str, code: int):
        self.code = code
        super().__init__(f"{what}: {ffi.string(lib.vn_strerror(code)).decode()}")


def _check(what: str, rc: int) -> int:
    if rc < 0:
        raise FastPathError(what, rc)
    return rc


@dataclass(frozen=True)
class Region:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


# ---- the NI kernel's side of the fast path (kernel.py, streams.py): punted frames, held
# frames and reconstructed TCP streams.  The kernel asks the C core through these methods
# only, never through the raw cffi ``lib``/``ffi`` or ``Switch._sw``.
MAX_SUBS = lib.VN_MAX_SUBS                  # frame subscriptions one NI's policy compiles
MAX_STREAM_SUBS = lib.VN_MAX_STREAM_SUBS    # stream subscriptions one NI's policy compiles


def strerror(code: int) -> str:
    """The fast path's words for a VN_E* code."""
    return ffi.string(lib.vn_strerror(code)).decode()


@dataclass(slots=True)
class Punt:
    """A frame a subscription matched (one vn_punt), copied out of the fast path."""
    id: int            # held frame id; 0 if only read subscriptions matched
    port: int          # the NI whose policy matched
    dir: int           # 1: from its guest, 2: to its guest
    subs: int          # bit i: compiled subscription i matched
    contain: int       # the matching subscriptions with contain rights
    time_ns: int
    data: bytes
    rings: int = 0     # bit k: scanner ring k got the frame too


@dataclass(slots=True)
class StreamEvent:
    """A stream opened, grew or closed (one vn_stream_event); pairs are per direction
    (index 0: from the guest, 1: to it)."""
    stream: int
    port: int
    opened: bool
    closed: bool
    reason: int        # VN_CLOSE_* when closed
    client: int        # 1: the guest connected out; 2: in
    subs: int          # bit i: stream subscription i matched (at open)
    family: int        # 4 or 6
    guest_addr: bytes  # 4 or 16 bytes
    remote_addr: bytes
    guest_port: int
    remote_port: int
    avail: tuple       # bytes readable in order
    eof: tuple         # the sender's FIN follows avail
    read: tuple        # directions read for subscriptions
    hold: tuple        # directions held for contain subscriptions
    midstream: bool    # adopted mid-stream: offset 0 is where the NI picked it up


FLOW_EVENTS = {"open": lib.VN_FLOW_EV_OPEN, "state": lib.VN_FLOW_EV_STATE,
               "close": lib.VN_FLOW_EV_CLOSE, "summary": lib.VN_FLOW_EV_SUMMARY}
FLOW_EVENT_NAMES = {v: k for k, v in FLOW_EVENTS.items()}
# the flow state bits (csrc/vhostni.h VN_FLOW_*), by the names scanners see
FLOW_STATES = {"syn": lib.VN_FLOW_SYN, "synack": lib.VN_FLOW_SYNACK,
               "established": lib.VN_FLOW_ESTABLISHED, "reset": lib.VN_FLOW_RESET,
               "fin_initiator": lib.VN_FLOW_FIN_INIT, "fin_responder": lib.VN_FLOW_FIN_RESP,
               "unanswered": lib.VN_FLOW_UNANSWERED, "incomplete": lib.VN_FLOW_INCOMPLETE,
               "answered": lib.VN_FLOW_ANSWERED, "icmp_error": lib.VN_FLOW_ICMP_ERROR,
               "midstream": lib.VN_FLOW_MIDSTREAM}
FLOW_END_REASONS = {lib.VN_FLOW_END_IDLE: "idle", lib.VN_FLOW_END_FIN: "fin",
                    lib.VN_FLOW_END_RESET: "reset", lib.VN_FLOW_END_UNANSWERED: "unanswered",
                    lib.VN_FLOW_END_GONE: "gone"}


@dataclass(slots=True)
class FlowEvent:
    """A flow opened, changed state, closed or was summarised (one vn_flow_event); pairs
    are per direction (index 0: from the guest, 1: to it), times Unix ns."""
    flow: int
    port: int
    kind: str          # open, state, close, summary
    change: str        # state: the FLOW_STATES name that became true; else ""
    reason: str        # close: FLOW_END_REASONS; else ""
    state: tuple       # FLOW_STATES names true now
    family: int
    proto: int
    initiator: int     # 1: the guest sent the first packet; 2: the remote did
    guest_addr: bytes
    remote_addr: bytes
    guest_port: int
    remote_port: int
    packets: tuple
    bytes: tuple
    start_ns: int
    last_ns: int
    time_ns: int
    icmp_type: int     # the last ICMP error that answered it; -1: none
    icmp_code: int
    icmp_from: bytes


class _KernelSide:
    """Switch methods for the NI kernel (mixed into Switch)."""
    _sw: object

    def _scratch(self, name: str, ctype: str):
        buf = self.__dict__.get(name)
        if buf is None:
            buf = self.__dict__[name] = ffi.new(ctype)
        return buf

    def next_punt(self) -> Optional[Punt]:
        """The next frame waiting for the kernel, or None."""
        p = self._scratch("_punt", "struct vn_punt *")
        if not lib.vn_punt_next(self._sw, p):
            return None
        return Punt(p.id, p.port, p.dir, p.subs, p.contain, p.time_ns,
                    bytes(ffi.buffer(p.data, p.len)), p.rings)

    def release_held(self, held_id: int, passed: bool) -> None:
        """Decides a held frame: it leaves the NI (``passed``) or is dropped, whoever else
        holds it."""
        lib.vn_held_release(self._sw, held_id, 1 if passed else 0)

    def decide_held(self, held_id: int, passed: bool) -> None:
        """The NI kernel's own decision on a frame it was punted: a cut is final; a pass
        lets the frame go once every scanner ring holding it passed it too."""
        lib.vn_held_decide(self._sw, held_id, 1 if passed else 0)

    # ---- scanner rings (csrc/ring.c, ABI csrc/vnring.h)
    def ring_open(self, port: int, desc_slots: int = 4096, dec_slots: int = 4096,
                  data_bytes: int = 4 << 20) -> int:
        """Opens a scanner ring on ``port``; returns its slot (its fds: ring_info)."""
        r = lib.vn_chan_open(self._sw, port, desc_slots, dec_slots, data_bytes)
        if r < 0:
            raise FastPathError("ring open", r)
        return r

    def ring_close(self, port: int, slot: int, passed: bool) -> None:
        """Closes a ring: what its scanner still owed gets ``passed`` (or is cut)."""
        lib.vn_chan_close(self._sw, port, slot, 1 if passed else 0)

    def ring_info(self, port: int, slot: int) -> Optional[dict]:
        info = self._scratch("_rinfo", "struct vn_chan_info *")
        if lib.vn_chan_info(self._sw, port, slot, info) != lib.VN_OK:
            return None
        return {name: int(getattr(info, name)) for name, _ in ffi.typeof("struct vn_chan_info").fields}

    def stream_ring_part(self, stream: int, port: int, slot: int) -> Optional[dict]:
        """Ring ``slot``'s part in a live stream: read/hold (direction bits), and per
        direction ([0] from the guest) how far it passed, was given, and the NI released."""
        part = self._scratch("_rpart", "struct vn_stream_ring_part *")
        if lib.vn_stream_ring_part(self._sw, stream, port, slot, part) != lib.VN_OK:
            return None
        return {"read": part.read, "hold": part.hold,
                "passed": (int(part.passed[0]), int(part.passed[1])),
                "given": (int(part.given[0]), int(part.given[1])),
                "released": (int(part.released[0]), int(part.released[1]))}

    def stream_ring_pass(self, stream: int, port: int, slot: int, direction: int, upto: int) -> int:
        return lib.vn_stream_ring_pass(self._sw, stream, port, slot, direction, upto)

    def step(self, timeout_ms: int) -> int:
        """One turn of the data-plane loop: wait up to ``timeout_ms`` for an event (a
        scanner's kick included), then one pass."""
        return lib.vn_switch_step(self._sw, timeout_ms)

    def ring_deadline(self) -> float:
        """The earliest hold deadline of a frame or stream chunk on a scanner ring, in
        seconds on the switch's clock (the monotonic clock, or the time handed in), or inf."""
        t = lib.vn_chan_deadline(self._sw)
        return float("inf") if t == 2**64 - 1 else t / 1e9

    def ring_poll(self) -> int:
        """Applies the rings' decisions and hold timeouts now; returns decisions applied."""
        return lib.vn_chan_poll(self._sw)

    def next_stream_event(self) -> Optional[StreamEvent]:
        """The next stream event waiting for the kernel, or None."""
        ev = self._scratch("_sev", "struct vn_stream_event *")
        if not lib.vn_stream_next(self._sw, ev):
            return None
        n = 4 if ev.family == 4 else 16
        return StreamEvent(
            int(ev.stream), ev.port, bool(ev.what & lib.VN_STREAM_OPEN),
            bool(ev.what & lib.VN_STREAM_CLOSED), ev.reason, ev.client, ev.subs, ev.family,
            bytes(ev.guest_addr[0:n]), bytes(ev.remote_addr[0:n]), ev.guest_port, ev.remote_port,
            (int(ev.avail[0]), int(ev.avail[1])), (bool(ev.eof[0]), bool(ev.eof[1])),
            (bool(ev.read[0]), bool(ev.read[1])), (bool(ev.hold[0]), bool(ev.hold[1])),
            bool(ev.midstream))

    def stream_read(self, stream: int, direction: int, offset: int) -> bytes:
        """In-order bytes of a stream direction from ``offset`` (one contiguous piece,
        copied); empty when none are readable there."""
        ptr = self._scratch("_sptr", "const uint8_t **")
        n = lib.vn_stream_read(self._sw, stream, direction, offset, ptr)
        return ffi.buffer(ptr[0], n)[:] if n > 0 else b""

    def stream_consume(self, stream: int, direction: int, upto: int) -> None:
        """The kernel has read a direction up to ``upto``."""
        lib.vn_stream_consume(self._sw, stream, direction, upto)

    def stream_pass(self, stream: int, direction: int, upto: int) -> None:
        """A held direction may go on up to byte ``upto``."""
        lib.vn_stream_pass(self._sw, stream, direction, upto)

    def stream_kill(self, stream: int) -> None:
        """Ends a connection (forged RSTs both ways)."""
        lib.vn_stream_kill(self._sw, stream)

    def stream_more(self, stream: int, direction: int) -> None:
        """Acknowledges held bytes of a direction on the receiver's behalf."""
        lib.vn_stream_more(self._sw, stream, direction)

    def stream_cut(self, stream: int, direction: int, start: int, end: int) -> int:
        """Drops bytes [start, end) of a held direction; a VN_E* code (< 0) if refused."""
        return lib.vn_stream_cut(self._sw, stream, direction, start, end)

    def stream_inject(self, stream: int, direction: int, offset: int, data: bytes) -> int:
        """Inserts ``data`` before byte ``offset``; a VN_E* code (< 0) if refused."""
        return lib.vn_stream_inject(self._sw, stream, direction, offset, data, len(data))

    def tcp_flows(self, port: int) -> int:
        """TCP connections the fast path tracks for a port."""
        return lib.vn_tcp_flows(self._sw, port)

    def tcp_bytes(self, port: int) -> int:
        """Bytes of frames the fast path keeps for a port's TCP connections."""
        return int(lib.vn_tcp_bytes(self._sw, port))

    def tcp_housekeeping(self) -> None:
        """Idle timers and retransmissions of the TCP engine, and the flow stage's expiry."""
        lib.vn_tcp_housekeeping(self._sw)
        lib.vn_flow_housekeeping(self._sw)

    def next_flow_event(self) -> Optional[FlowEvent]:
        """The next flow event waiting for the kernel, or None."""
        ev = self._scratch("_fev", "struct vn_flow_event *")
        if not lib.vn_flow_next(self._sw, ev):
            return None
        n = 4 if ev.family == 4 else 16
        st = ev.state
        return FlowEvent(
            int(ev.flow), ev.port, FLOW_EVENT_NAMES.get(ev.kind, "?"),
            next((k for k, v in FLOW_STATES.items() if v == ev.change), ""),
            FLOW_END_REASONS.get(ev.reason, "") if ev.kind == lib.VN_FLOW_EV_CLOSE else "",
            tuple(k for k, v in FLOW_STATES.items() if st & v), ev.family, ev.proto,
            ev.initiator, bytes(ev.guest_addr[0:n]), bytes(ev.remote_addr[0:n]),
            ev.guest_port, ev.remote_port, (int(ev.packets[0]), int(ev.packets[1])),
            (int(ev.bytes[0]), int(ev.bytes[1])), int(ev.start_ns), int(ev.last_ns),
            int(ev.time_ns), ev.icmp_type, ev.icmp_code, bytes(ev.icmp_from[0:n]))

    def flow_count(self, port: int) -> int:
        """Flows in the flow table of a port (0 while its policy has the stage off)."""
        return max(0, lib.vn_flow_count(self._sw, port))


class Switch(_KernelSide):
    """The L2 switch and its ports; one per daemon.  Not thread-safe: one thread owns it."""

    def __init__(self) -> None:
        self._sw = lib.vn_switch_new()
        if self._sw == ffi.NULL:
            raise MemoryError("vn_switch_new")
        self._sink_out = ffi.new("struct vn_sink_frame *")

    def close(self) -> None:
        if self._sw != ffi.NULL:
            lib.vn_switch_free(self._sw)
            self._sw = ffi.NULL

    def __enter__(self) -> "Switch":
        return self

    def set_clock(self, now_ns: int) -> None:
        """Runs the switch on a time handed in (ns; replay on a capture's timestamps) instead
        of the system clocks, from now on.  It never goes back (nor to 0, the system's), nor past
        VN_CLOCK_MAX_NS (where its timers could overflow): ValueError."""
        if not 0 <= now_ns <= lib.VN_CLOCK_MAX_NS:
            raise ValueError(f"the switch's clock runs from 0 to {lib.VN_CLOCK_MAX_NS} ns, not {now_ns}")
        if lib.vn_switch_set_clock(self._sw, now_ns) != lib.VN_OK:
            raise ValueError("the switch's clock does not go back")

    def ports_broken(self) -> int:
        """How many ports are broken now: one C call whatever the port count, so an idle
        daemon's housekeeping need not ask every port."""
        return lib.vn_ports_broken(self._sw)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ports
    def add_vhost_port(self) -> "VhostPort":
        return VhostPort(self, self._slot("add vhost port", lib.vn_port_add_vhost(self._sw)))

    @staticmethod
    def _slot(what: str, rc: int) -> int:
        if rc == lib.VN_ERANGE:
            raise SwitchFull(f"the switch is full: one daemon serves at most {MAX_PORTS} ports "
                             "(NIs and uplinks); run another daemon for more (vhostni@.service "
                             "runs one per tenant)")
        return _check(what, rc)

    def add_tap_port(self, fd: int, vnet_hdr_len: int) -> "Port":
        """Adds a TAP uplink; the switch takes ownership of ``fd``."""
        return Port(self, self._slot("add tap port", lib.vn_port_add_tap(self._sw, fd, vnet_hdr_len)))

    def add_sink_port(self) -> "Port":
        """Adds a sink port (offline replay): frames enter through ``Port.inject_from`` (the
        full ingress path, policy included), frames delivered to it queue for
        :meth:`sink_frames`."""
        return Port(self, self._slot("add sink port", lib.vn_port_add_sink(self._sw)))

    def sink_frames(self) -> Iterator[tuple[int, bytes]]:
        """(port index, frame) for each frame delivered to a sink port since the last call,
        in delivery order."""
        out = self._sink_out
        while lib.vn_sink_next(self._sw, out):
            yield out.port, bytes(ffi.buffer(out.data, out.len))

    # ---- the data plane loop
    def set_wake_fd(self, fd: int) -> None:
        _check("set wake fd", lib.vn_switch_set_wake_fd(self._sw, fd))

    def run(self, timeout_ms: int, poll: bool = False) -> int:
        """Forwards frames (GIL released) until timeout or the wake fd is readable."""
        return _check("run", lib.vn_switch_run(self._sw, timeout_ms, 1 if poll else 0))

    @property
    def punt_fd(self) -> int:
        """Readable while frames wait for the NI kernel."""
        return lib.vn_punt_fd(self._sw)

    def service(self) -> int:
        """One non-blocking pass over every port; returns frames forwarded."""
        return _check("service", lib.vn_switch_service(self._sw))


class Port:
    def __init__(self, switch: Switch, index: int):
        self.switch = switch
        self.index = index

    @property
    def _sw(self):
        return self.switch._sw

    def stats(self) -> dict[str, int]:
        st = lib.vn_port_stats(self._sw, self.index)
        if st == ffi.NULL:
            raise FastPathError("stats", lib.VN_ENOPORT)
        return {name: int(getattr(st, name)) for name in STAT_FIELDS}

    def stat(self, name: str) -> int:
        """One counter of stats(), without building the whole dict (a loop that polls one)."""
        if name not in STAT_FIELDS:
            raise KeyError(name)
        st = lib.vn_port_stats(self._sw, self.index)
        if st == ffi.NULL:
            raise FastPathError("stats", lib.VN_ENOPORT)
        return int(getattr(st, name))

    def broken_reason(self) -> Optional[str]:
        code = lib.vn_port_broken(self._sw, self.index)
        return ffi.string(lib.vn_broken_reason(code)).decode() if code > 0 else None

    def set_mac(self, mac: bytes) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        _check("set mac", lib.vn_port_set_mac(self._sw, self.index, mac))

    def sink_discard(self, on: bool = True) -> None:
        """A sink port that counts what it is delivered and keeps nothing (benchmarks)."""
        rc = lib.vn_port_sink_discard(self._sw, self.index, 1 if on else 0)
        if rc != lib.VN_OK:
            raise FastPathError("sink discard", rc)

    def inject_batch(self, frames: bytes, lens) -> int:
        """Sends frames laid end to end in ``frames`` (``lens``: their lengths, a cffi
        ``uint32_t[]`` or a list) into the switch from this port; returns how many went in."""
        if not isinstance(lens, ffi.CData):
            lens = ffi.new("uint32_t[]", list(lens))
        rc = lib.vn_port_inject_batch(self._sw, self.index, ffi.from_buffer(frames), lens, len(lens))
        if rc < 0:
            raise FastPathError("inject batch", rc)
        return rc

    def remove(self) -> None:
        if self.index >= 0:
            lib.vn_port_remove(self._sw, self.index)
            self.index = -1

    # A MAC learned outside the policy (QEMU's NIC, over QMP): anti-spoofing uses it when the
    # installed policy names no MAC of its own.
    fallback_mac: Optional[bytes] = None
    _cpolicy = None                 # the last policy installed, to re-apply a new fallback
    _sigstage = None                # the signature stage installed (kept alive while it is)
    _cpolicy_own_mac = False

    def set_policy(self, cpolicy) -> None:
        """Installs a compiled ``struct vn_policy`` (see vhostni.policy).  The port's isolation
        (quarantine, link down) is kept whatever the policy says."""
        own = bool(cpolicy.mac_set)
        if not own and self.fallback_mac is not None:
            cpolicy.mac_set = 1
            cpolicy.mac[0:6] = self.fallback_mac
        _check("set policy", lib.vn_port_set_policy(self._sw, self.index, cpolicy))
        self._cpolicy, self._cpolicy_own_mac = cpolicy, own

    def set_sigstage(self, stage) -> None:
        """Installs a compiled signature stage (vhostni.signatures.stage.Stage; None: none) at
        once: new connections use it, open ones finish with the stage they started with."""
        _check("set signature stage",
               lib.vn_port_set_sigstage(self._sw, self.index, stage.ptr if stage is not None else ffi.NULL))
        self._sigstage = stage

    def sig_alerts(self, limit: int = 4096) -> list:
        """The signature stage's matches since the last call (``struct vn_sig_alert`` copies)."""
        out = []
        for _ in range(limit):
            a = ffi.new("struct vn_sig_alert *")
            if not lib.vn_sig_alerts_next(self._sw, self.index, a):
                break
            out.append(a)
        return out

    def sig_rule_counts(self, n: int) -> tuple[list[int], list[int]]:
        """Per rule of the installed stage (its index order): matches, drops."""
        m = ffi.new("uint64_t[]", max(n, 1))
        d = ffi.new("uint64_t[]", max(n, 1))
        k = lib.vn_sig_rule_counts(self._sw, self.index, m, d, n)
        return [int(m[i]) for i in range(max(k, 0))], [int(d[i]) for i in range(max(k, 0))]

    def set_fallback_mac(self, mac: Optional[bytes]) -> None:
        """The MAC anti-spoofing falls back to when the policy names none (None: forget it);
        applied to the installed policy at once."""
        if mac is not None and len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.fallback_mac = mac
        c = self._cpolicy
        if c is None or self._cpolicy_own_mac:
            return
        c.mac_set = 1 if mac is not None else 0
        c.mac[0:6] = mac if mac is not None else bytes(6)
        _check("set policy", lib.vn_port_set_policy(self._sw, self.index, c))

    # ---- isolation (see VN_ISOLATE_* in csrc/vhostni.h)
    def set_isolation(self, bits: int) -> None:
        _check("set isolation", lib.vn_port_set_isolation(self._sw, self.index, bits))

    @property
    def isolation(self) -> int:
        return _check("isolation", lib.vn_port_isolation(self._sw, self.index))

    def clear_policy(self) -> None:
        lib.vn_held_release_port(self._sw, self.index, 0)
        self._cpolicy = None
        _check("clear policy", lib.vn_port_clear_policy(self._sw, self.index))

    def inject(self, direction: int, frame: bytes) -> None:
        """Sends a pre-registered frame to this NI's guest (VN_DIR_TO_GUEST) or from it."""
        _check("inject", lib.vn_port_inject(self._sw, self.index, direction, frame, len(frame)))

    def inject_from(self, frame: bytes) -> None:
        """Sends ``frame`` into the switch as if this port had received it."""
        _check("inject", lib.vn_port_inject_from(self._sw, self.index, frame, len(frame)))


class VhostPort(Port):
    """The device state of one vhost-user NIC, as its frontend configures it."""

    _qstats = None

    def queue_stats(self) -> list[dict]:
        """What each queue pair carried: ``in_frames``/``in_bytes`` the guest sent on the
        pair's transmit queue, ``out_frames``/``out_bytes`` the switch put on its receive
        queue, and ``ready`` (both rings run now: the guest enabled the pair).  Pairs 0 up
        to the last one the frontend configured or that ever carried a frame."""
        if self._qstats is None:
            self._qstats = ffi.new("struct vn_queue_stats[]", MAX_QUEUES)
        qs = self._qstats
        _check("queue stats", lib.vn_port_queue_stats(self._sw, self.index, qs, MAX_QUEUES))
        pairs = []
        for i in range(MAX_QUEUES // 2):
            rx, tx = qs[2 * i], qs[2 * i + 1]
            pairs.append({"pair": i, "in_frames": int(tx.frames), "in_bytes": int(tx.bytes),
                          "out_frames": int(rx.frames), "out_bytes": int(rx.bytes),
                          "ready": bool(rx.ready and tx.ready)})
        used = [i for i in range(MAX_QUEUES // 2)
                if qs[2 * i].num or qs[2 * i + 1].num or qs[2 * i].frames or qs[2 * i + 1].frames]
        return pairs[:used[-1] + 1] if used else []

    def set_features(self, features: int) -> None:
        _check("set features", lib.vn_dev_set_features(self._sw, self.index, features))

    def set_mem_table(self, regions: Sequence[Region], fds: Sequence[int]) -> None:
        """Maps the regions (replacing the old table only on success).  The fds stay the
        caller's to close."""
        n = len(regions)
        specs = ffi.new("struct vn_region_spec[]", max(n, 1))
        for i, r in enumerate(regions):
            specs[i].guest_phys_addr = r.guest_phys_addr
            specs[i].memory_size = r.memory_size
            specs[i].userspace_addr = r.userspace_addr
            specs[i].mmap_offset = r.mmap_offset
        cfds = ffi.new("int[]", list(fds) or [-1])
        _check("set mem table", lib.vn_dev_set_mem(self._sw, self.index, n, specs, cfds))

    def reset(self) -> None:
        _check("reset", lib.vn_dev_reset(self._sw, self.index))

    def set_log(self, fd: int, size: int, offset: int) -> None:
        """Maps the dirty-page log of a live migration (SET_LOG_BASE); size 0 unmaps it.
        ``fd`` stays the caller's to close."""
        _check("set log base", lib.vn_dev_set_log(self._sw, self.index, fd, size, offset))

    def set_vring_log(self, q: int, on: bool, used_gpa: int = 0) -> None:
        """VHOST_VRING_F_LOG: log used-ring writes at guest-physical ``used_gpa``."""
        _check(f"vring {q} log", lib.vn_vq_set_log(self._sw, self.index, q, 1 if on else 0, used_gpa))

    def set_vring_num(self, q: int, num: int) -> None:
        _check(f"vring {q} num", lib.vn_vq_set_num(self._sw, self.index, q, num))

    def set_vring_addr(self, q: int, desc: int, used: int, avail: int) -> None:
        _check(f"vring {q} addr", lib.vn_vq_set_addr(self._sw, self.index, q, desc, used, avail))

    def set_vring_base(self, q: int, base: int) -> None:
        _check(f"vring {q} base", lib.vn_vq_set_base(self._sw, self.index, q, base))

    def get_vring_base(self, q: int) -> int:
        return _check(f"vring {q} get base", lib.vn_vq_get_base(self._sw, self.index, q))

    def set_vring_kick(self, q: int, fd: Optional[int]) -> None:
        """Takes ownership of ``fd`` (None: the frontend will not kick; the ring is polled)."""
        _check(f"vring {q} kick", lib.vn_vq_set_kick(self._sw, self.index, q, -1 if fd is None else fd))

    def set_vring_call(self, q: int, fd: Optional[int]) -> None:
        """Takes ownership of ``fd``."""
        _check(f"vring {q} call", lib.vn_vq_set_call(self._sw, self.index, q, -1 if fd is None else fd))

    def vring_started(self, q: int) -> bool:
        return bool(_check(f"vring {q} started", lib.vn_vq_started(self._sw, self.index, q)))

    def set_vring_enable(self, q: int, enable: bool) -> None:
        _check(f"vring {q} enable", lib.vn_vq_set_enable(self._sw, self.index, q, 1 if enable else 0))


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
