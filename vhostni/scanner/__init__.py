"""The scanner SDK: write a vhostni scanner like a socket program.

    from vhostni.scanner import Scanner

    sc = Scanner.connect()                       # the NI kernel started us; seccomp from here on
    sc.subscribe({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, contain=True)
    for frame in sc.frames():
        if looks_bad(frame.data):
            sc.cut(frame)
            sc.alert("bad SYN", dst=...)
        else:
            sc.pass_(frame)

``frame.data`` is a read-only memoryview of the frame's bytes, valid until the scanner asks
for its next event: when the kernel gives the scanner a shared-memory ring
($VHOSTNI_RING_FDS, see :mod:`vhostni.scanner.ring` and csrc/vnring.h), it points into the
ring and decisions are published in batches; ``sc.frames_batch()`` takes every frame there
is in one call.  Copy (``bytes(frame.data)``) what you keep, and compare with ``bytes``:
``b"x" in view`` is always False.

A scanner is an untrusted process: it gets only the traffic its subscriptions match and its
policy allows, decides held frames (pass or cut), sends alerts to the administrator and
injects frames (or, into streams it holds, bytes) the administrator pre-registered.  This
package imports nothing of the NI kernel; the wire format is documented in
:mod:`vhostni.scanner.wire`.

Reconstructed TCP streams work like accepting connections on a listening socket::

    sc = Scanner.connect()
    sc.subscribe_stream(port=25, direction="from_guest", contain=True)
    while True:
        stream = sc.accept()                     # a new connection (handshake done)
        while (data := stream.read()) is not None:
            if b"EICAR" in data.data:
                stream.kill()                    # forged RSTs to both ends
            else:
                stream.pass_(data)               # these bytes may go on

or, for a scanner watching many connections at once, one loop over every event::

    for ev in sc.events():
        if isinstance(ev, StreamData):
            sc.pass_(ev)

Bytes arrive in order, without gaps or overlaps, exactly as the receiver will get them
(the NI kernel reassembles conservatively); a held chunk's bytes reach the receiver only
after every scanner holding them passed them.

A scanner holding a direction may also edit it, on bytes it has not passed yet and in
stream order: ``stream.cut(direction, offset, length)`` removes bytes (and counts as its
pass of them), ``stream.inject(direction, offset, name)`` inserts bytes the administrator
pre-registered (``Scanner.stream_injections``); the NI rewrites sequence numbers so both
ends see a consistent connection.  Replacing a range::

    stream.inject(FROM_GUEST, start, "notice")       # before byte ``start``
    stream.cut(FROM_GUEST, start, end - start)       # then drop [start, end)
    stream.pass_(FROM_GUEST, message_end)            # and let the rest go

Aggregate detectors (scans, worms, SYN bombs) need not see every packet: the NI's flow
stage keeps one entry per flow (5-tuple, both directions) and reports it as it opens,
changes state (established, reset, unanswered, icmp_error, ...), is summarised and closes::

    sc.subscribe_flows(events=["open", "state"], proto="tcp", direction="from_guest")
    for ev in sc.flows():
        if ev.change == "unanswered":
            failures[ev.guest[0]] += 1

This needs a ``flows`` right in the scanner's policy (``[[scanner.allow]] flows = true``).

State that must outlive the scanner process (a crash, a kill, a daemon restart) is kept by
the NI kernel, for this scanner of this NI only::

    sc = Scanner.connect()
    state = sc.restore() or {"attack": False}     # what the last run saved, or None
    ...
    sc.checkpoint(state)                         # bytes, or anything json.dumps takes

The kernel keeps only the latest checkpoint, at most ``sc.checkpoint_max`` bytes (64 KiB
unless the policy says less), writes it to the daemon's ``--state-dir`` at most about once
a second, and forgets it when the scanner is removed from the policy.  A checkpoint is
ordered with the scanner's other messages: one sent before a decision is kept before the
decision takes effect.
"""
from __future__ import annotations

import collections
import json
import os
import select
import socket
import time
from typing import Iterator, Optional, Union

from dataclasses import dataclass

from . import wire
from .ring import (ENV as ENV_RING, KIND_STREAM_CLOSE, KIND_STREAM_DATA, KIND_STREAM_END,
                   KIND_STREAM_OPEN, Ring, RingError, RingFrame, RingStream, RingUnsupported,
                   parse_fds)
from .wire import CUT, FROM_GUEST, PASS, PASS_ALL, TO_GUEST, Frame

__all__ = ["Scanner", "Frame", "ScannerError", "Refused", "FROM_GUEST", "TO_GUEST", "Stream",
           "StreamOpened", "StreamData", "StreamEnd", "StreamClosed", "FlowEvent", "PASS_ALL"]

ENV_FD = "VHOSTNI_SCANNER_FD"


class ScannerError(Exception):
    """The NI kernel went away or spoke nonsense."""


class Refused(ScannerError):
    """The NI kernel refused a request (outside this scanner's rights, or malformed)."""


def _direction(d: Union[int, str]) -> int:
    if isinstance(d, str):
        if d not in wire.DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(wire.DIRECTIONS)}")
        return wire.DIRECTIONS[d]
    if d not in (FROM_GUEST, TO_GUEST):
        raise ValueError(f"bad direction {d!r}")
    return d


class Stream:
    """One reconstructed TCP connection.  Directions are FROM_GUEST (bytes the guest sends)
    and TO_GUEST; offsets count each direction's bytes from 0."""

    def __init__(self, sc: "Scanner", body: dict):
        self._sc = sc
        self.id: int = body["stream"]
        self.family: int = body.get("family", 4)
        self.client: str = body.get("client", "guest")        # who connected: guest or remote
        self.guest: tuple = tuple(body.get("guest") or ("", 0))
        self.remote: tuple = tuple(body.get("remote") or ("", 0))
        self.port: int = body.get("port", 0)                    # the server port
        # picked up mid-stream (the NI restarted, say): offset 0 is where the NI joined it,
        # not the connection's first byte
        self.midstream: bool = bool(body.get("midstream", False))
        self.reads = {wire.DIRECTIONS[d] for d in body.get("read", []) if d in wire.DIRECTIONS}
        self.holds = {wire.DIRECTIONS[d] for d in body.get("held", []) if d in wire.DIRECTIONS}
        self.received = {FROM_GUEST: 0, TO_GUEST: 0}            # bytes read so far
        self.ended: dict[int, int] = {}                         # direction -> where its FIN is
        self.closed = False
        self.reason: Optional[str] = None
        self._ring_handle: Optional[int] = body.get("_ring_handle")   # it came on the ring
        self._killed = False

    @property
    def tuple(self) -> tuple:
        """("tcp", client address, client port, server address, server port)."""
        c, s = (self.guest, self.remote) if self.client == "guest" else (self.remote, self.guest)
        return ("tcp", c[0], c[1], s[0], s[1])

    def read(self, timeout: Optional[float] = None) -> Optional["StreamData"]:
        """The next bytes of this stream (either direction), or None once it is closed (or
        when ``timeout`` seconds pass).  Other streams' events stay queued meanwhile."""
        while True:
            ev = self._sc._next_event(
                lambda e: isinstance(e, (StreamData, StreamEnd, StreamClosed)) and e.stream is self,
                timeout)
            if ev is None or isinstance(ev, StreamClosed):
                return None
            if isinstance(ev, StreamData):
                return ev

    def pass_(self, direction: Union[int, str, "StreamData"], offset: Optional[int] = None) -> None:
        """Lets every byte of ``direction`` below ``offset`` go on (default: all read so
        far); ``pass_(data)`` passes up to the end of a chunk."""
        if isinstance(direction, StreamData):
            direction, offset = direction.direction, direction.end
        d = _direction(direction)
        upto = self.received[d] if offset is None else int(offset)
        if self._killed:
            return
        if self._ring_handle is not None:
            self._sc._ring_stream_pass(self._ring_handle, d, upto)
            return
        self._sc.sock.send(wire.encode_stream_pass(self.id, d, upto))

    def pass_all(self, direction: Union[int, str, None] = None) -> None:
        """Lets this direction (default: both) go on from now on without holding it."""
        if self._killed:
            return
        for d in ((FROM_GUEST, TO_GUEST) if direction is None else (_direction(direction),)):
            if self._ring_handle is not None:
                self._sc._ring_stream_pass(self._ring_handle, d, PASS_ALL)
            else:
                self._sc.sock.send(wire.encode_stream_pass(self.id, d, PASS_ALL))

    def kill(self) -> None:
        """Ends the connection: the NI forges RSTs to both ends and drops what it holds."""
        self._sc.sock.send(wire.encode_control(wire.StreamKill(self.id).body()))
        # a later pass on the ring would reach the NI before the kill reaches the kernel
        # (the NI applies ring passes on its own loop): there are none after a kill
        self._killed = True

    def cut(self, direction: Union[int, str], offset: int, length: int) -> None:
        """Removes bytes [offset, offset+length) of a direction this scanner holds: the
        receiver never gets them, and the NI rewrites the sequence numbers of everything
        after them (and the acknowledgements coming back) so that neither end notices a
        gap.  The cut is this scanner's decision on those bytes: it counts as its pass of
        them, there is nothing to pass for them afterwards.  Only bytes this scanner has not
        passed yet can be cut, and edits of one direction go in stream order (each at or
        after the end of the previous one).  Waits for the NI kernel's answer; raises
        Refused if the cut is not possible (outside this scanner's rights, already passed,
        the stream closed, too many edits outstanding)."""
        try:
            body = wire.StreamCut(self.id, _direction(direction), int(offset), int(length)).body()
        except wire.RequestError as exc:       # as the kernel would have answered it
            raise Refused(exc.reason) from None
        self._sc._request(body)

    def inject(self, direction: Union[int, str], offset: int, injection: Union[int, str]) -> None:
        """Inserts pre-registered bytes before byte ``offset`` of a direction this scanner
        holds: ``injection`` is an index into, or a name from, ``Scanner.stream_injections``
        (the policy's ``[[scanner.inject]] stream`` entries; a scanner never chooses the
        bytes themselves).  The receiver gets them between bytes offset-1 and offset; the NI
        sends them and retransmits them until they are acknowledged.  Same rules as
        :meth:`cut`: bytes not passed yet, in stream order (to replace a range, inject at
        its start, then cut it).  Raises Refused if not possible."""
        which = injection if isinstance(injection, str) else int(injection)
        try:
            body = wire.StreamInject(self.id, _direction(direction), int(offset), which).body()
        except wire.RequestError as exc:       # as the kernel would have answered it
            raise Refused(exc.reason) from None
        self._sc._request(body)

    def more(self, direction: Union[int, str]) -> None:
        """Tells the NI kernel a decision needs more bytes of ``direction``."""
        self._sc.sock.send(wire.encode_control(wire.StreamMore(self.id, _direction(direction)).body()))

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.tuple}{' closed' if self.closed else ''}>"


@dataclass(frozen=True)
class StreamOpened:
    stream: Stream


@dataclass(frozen=True)
class StreamData:
    stream: Stream
    direction: int
    offset: int
    data: bytes
    held: bool           # a pass is owed for these bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True)
class _RingOpened(StreamOpened):
    seq: int = -1           # its ring descriptor (its bytes go back once it is taken)


@dataclass(frozen=True)
class _RingData(StreamData):
    """Stream bytes that came on the ring: ``data`` is a copy (bytes: ``in``, ``+``, regular
    expressions and keeping it all work as on the socket), ``view`` the zero-copy view of the
    ring's bytes, valid until the scanner asks for its next event."""
    seq: int = -1
    view: Optional[memoryview] = None


@dataclass(frozen=True)
class StreamEnd:
    """The sender of ``direction`` finished (FIN) after ``offset`` bytes."""
    stream: Stream
    direction: int
    offset: int


@dataclass(frozen=True)
class StreamClosed:
    stream: Stream
    reason: str          # fin, rst, killed, idle, bypass, gone, timeout, overrun, scanner


@dataclass(frozen=True)
class _RingEnd(StreamEnd):
    seq: int = -1


@dataclass(frozen=True)
class _RingClosed(StreamClosed):
    seq: int = -1


def _ring_seq(ev) -> Optional[int]:
    """The ring descriptor an event came in (None: the socket)."""
    if type(ev) is RingFrame:
        return ev.number
    return getattr(ev, "seq", None)


def _num(v, default=0):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _pair(v) -> tuple:
    return (_num(v[0]), _num(v[1])) if isinstance(v, list) and len(v) == 2 else (0, 0)


def _endpoint(v) -> tuple:
    return (str(v[0]), _num(v[1])) if isinstance(v, list) and len(v) == 2 else ("", 0)


@dataclass(frozen=True)
class FlowEvent:
    """An event of the NI's flow stage (see :mod:`vhostni.scanner.wire`, ``flow``): pairs
    are (from the guest, to the guest); times are Unix seconds on the NI's clock."""
    event: str           # open, state, close, summary
    flow: int            # the flow's id, never reused
    family: int
    proto: int
    initiator: str       # guest or remote: who sent the first packet
    guest: tuple         # (address, port); ICMP echo-like: the identifier as port
    remote: tuple
    state: frozenset     # syn, synack, established, reset, unanswered, icmp_error, ...
    change: Optional[str]    # state events: what just became true
    reason: Optional[str]    # close events: idle, fin, reset, unanswered, gone
    packets: tuple
    bytes: tuple
    start: float
    last: float
    time: float
    icmp: Optional[dict]     # the ICMP error that answered it: type, code, from

    @classmethod
    def from_body(cls, b: dict) -> "FlowEvent":
        icmp = b.get("icmp")
        return cls(str(b.get("event")), _num(b.get("flow")), _num(b.get("family"), 4),
                   _num(b.get("proto")), str(b.get("initiator")), _endpoint(b.get("guest")),
                   _endpoint(b.get("remote")),
                   frozenset(x for x in b.get("state") or () if isinstance(x, str)),
                   b.get("change"), b.get("reason"), _pair(b.get("packets")),
                   _pair(b.get("bytes")), float(_num(b.get("start"))), float(_num(b.get("last"))),
                   float(_num(b.get("time"))), icmp if isinstance(icmp, dict) else None)


Event = Union[Frame, StreamOpened, StreamData, StreamEnd, StreamClosed, FlowEvent]


@dataclass(frozen=True)
class _Sync:
    """A ``sync`` from the kernel, in its place among the events (see _answer_syncs)."""
    id: object


class Scanner:
    #: buffered ring decisions published at once when this many are waiting (they are also
    #: published whenever the scanner waits for an event and before a sync is answered)
    RING_BATCH = 64

    def __init__(self, sock: socket.socket, lockdown: bool = True,
                 ring_fds: Optional[tuple] = None, ring_streams: bool = False):
        self.sock = sock
        self.ring: Optional[Ring] = None      # frames on the shared-memory ring (see _start_ring)
        self._ring_barrier = False            # a checkpoint was sent: barrier before the next flush
        self._ring_next = 0                   # 1 + the seq of the last ring frame handed out
        self._pending: collections.deque = collections.deque()     # events not yet taken
        # capture clock: the time ticks had told when each queued ring frame was taken in (a
        # tick on the socket and a frame on the ring are not ordered by one stream: a frame
        # taken in after a tick came after it)
        self._told = 0.0
        self._after_tick: dict = {}
        self._controls: collections.deque = collections.deque()    # replies not yet awaited
        self.streams: dict[int, Stream] = {}
        self._next_id = 0
        hello = self._wait_control(lambda b: b.get("op") == "hello", timeout=30)
        self.name: str = hello.get("scanner", "")
        self.ni: str = hello.get("ni", "")
        self.config: dict = hello.get("config") or {}
        self.injections: list = hello.get("injections") or []                # frames
        self.stream_injections: list = hello.get("stream_injections") or []  # stream bytes
        # "capture": the NI runs on a time handed in (offline replay on a capture's clock);
        # clock(), time() and every timeout then follow the frames' times and ``tick``s
        self.clock_mode: str = "capture" if hello.get("clock") == "capture" else "system"
        now = hello.get("now")            # capture clock: the latest time the kernel told
        self._now: float = float(now) if isinstance(now, (int, float)) and not isinstance(now, bool) else 0.0
        cmax = hello.get("checkpoint_max", 0)
        self.checkpoint_max: int = cmax if isinstance(cmax, int) and not isinstance(cmax, bool) else 0
        self._restored: Optional[wire.Checkpoint] = None
        if hello.get("checkpoint") is not None:
            # the kernel sends the saved checkpoint right behind the hello
            deadline = time.monotonic() + 30
            while self._restored is None:
                left = deadline - time.monotonic()
                msg = self._recv(left) if left > 0 else None
                if msg is None:
                    raise ScannerError("the NI kernel announced a checkpoint but did not send it")
                self._ingest(msg)
        self.ring_streams = bool(ring_streams)
        if ring_fds is not None:
            self._start_ring(ring_fds)
        if lockdown:
            from . import seccomp
            seccomp.lockdown()

    @classmethod
    def connect(cls, fd: Optional[int] = None, lockdown: bool = True,
                streams_on_ring: bool = False) -> "Scanner":
        """Attaches to the socket the NI kernel gave this process (``$VHOSTNI_SCANNER_FD``)
        and, unless ``lockdown=False``, installs the SDK's seccomp allow-list: do any start-up
        that needs files (in the sandbox's read-only view) before calling this.  The process
        is confined already (the launcher's namespaces and filter); this filter stacks on
        top of the launcher's and takes away files and new sockets too."""
        ring_fds = None
        if fd is None:
            try:
                fd = int(os.environ[ENV_FD])
            except (KeyError, ValueError):
                raise ScannerError(f"not started by a vhostni NI kernel (${ENV_FD} unset)") from None
            if os.environ.get(ENV_RING):
                try:
                    ring_fds = parse_fds(os.environ[ENV_RING])
                except RingError as exc:
                    raise ScannerError(str(exc)) from None
        sock = socket.socket(fileno=fd)
        return cls(sock, lockdown=lockdown, ring_fds=ring_fds, ring_streams=streams_on_ring)

    def _start_ring(self, fds: tuple) -> None:
        """Maps the shared-memory ring the kernel gave this process and asks the kernel to
        deliver frames on it (``{"op": "ring", "version": 1}``).  A kernel that refuses
        (an older one) keeps sending frames on the socket; a ring whose header does not
        hold together raises ScannerError.  Runs before the lockdown: mapping needs mmap of
        new files, which nothing does afterwards."""
        try:
            ring = Ring(tuple(fds))
        except RingUnsupported:
            return                          # not asked for: frames stay on the socket
        except RingError as exc:
            raise ScannerError(f"bad ring from the NI kernel: {exc}") from None
        try:
            self._request(wire.RingRequest(wire.RING_VERSION, streams=self.ring_streams).body())
        except Refused:
            ring.close()
            return
        ring.streams = self.ring_streams
        self.ring = ring
        self._ring_next = ring.polled

    # ---- receiving
    def _recv(self, timeout: Optional[float]) -> Optional[wire.Message]:
        if timeout is not None:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                return None
        data = self.sock.recv(wire.MAX_MESSAGE)
        if not data:
            raise ScannerError("the NI kernel closed the connection")
        try:
            return wire.decode(data)
        except wire.WireError as exc:
            raise ScannerError(f"bad message from the NI kernel: {exc}") from None

    # ---- time
    def clock(self) -> float:
        """Seconds on the NI's clock, for measuring intervals (rates, timeouts): the system's
        monotonic clock, or, when the NI runs on a capture's timestamps (offline replay with
        ``--clock capture``), the capture's time as the kernel has told it so far.  A
        scanner that times things with this (and not ``time.monotonic()``) sees a replayed
        capture at its own pace, however fast it is fed."""
        return self._now if self.clock_mode == "capture" else time.monotonic()

    def time(self) -> float:
        """Unix time on the NI's clock (``time.time()``, or the capture's time)."""
        return self._now if self.clock_mode == "capture" else time.time()

    def _ingest(self, msg: wire.Message) -> None:
        """Turns a message from the kernel into an event (or a reply someone awaits)."""
        if isinstance(msg, Frame):
            if self.clock_mode == "capture":
                self._now = max(self._now, msg.time)
            # a view, as ring frames have: a scanner behaves the same on either path
            self._pending.append(Frame(msg.number, msg.direction, msg.held, msg.time,
                                       memoryview(msg.data)))
        elif isinstance(msg, wire.Checkpoint):
            self._restored = msg
        elif isinstance(msg, wire.StreamData):
            st = self.streams.get(msg.stream)
            if st is None:
                return
            st.received[msg.direction] = max(st.received[msg.direction], msg.offset + len(msg.data))
            self._pending.append(StreamData(st, msg.direction, msg.offset, msg.data, msg.held))
        elif isinstance(msg, wire.Control):
            b = msg.body
            op = b.get("op")
            sid = b.get("stream")
            if op == "stream_open" and isinstance(sid, int):
                st = Stream(self, b)
                self.streams[sid] = st
                self._pending.append(StreamOpened(st))
            elif op == "stream_end" and sid in self.streams:
                st = self.streams[sid]
                d = wire.DIRECTIONS.get(b.get("direction"), FROM_GUEST)
                st.ended[d] = b.get("offset", 0)
                self._pending.append(StreamEnd(st, d, st.ended[d]))
            elif op == "stream_close" and sid in self.streams:
                st = self.streams.pop(sid)
                st.closed, st.reason = True, str(b.get("reason"))
                self._pending.append(StreamClosed(st, st.reason))
            elif op == "flow":
                ev = FlowEvent.from_body(b)
                if self.clock_mode == "capture":
                    self._now = max(self._now, ev.time)
                self._pending.append(ev)
            elif op == "sync":
                # the kernel sends a sync after the frames it published on the ring before
                # it: take them in first, so that they come before the sync
                if self.ring is not None:
                    self._ring_poll()
                self._pending.append(_Sync(b.get("id")))
            elif op == "tick":
                now = b.get("now")
                if isinstance(now, (int, float)) and not isinstance(now, bool):
                    self._now = max(self._now, float(now))
                    self._told = max(self._told, float(now))
            elif op not in ("stream_end", "stream_close"):
                self._controls.append(b)

    def _wait_control(self, want, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for b in self._controls:
                if want(b):
                    self._controls.remove(b)
                    return b
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScannerError("the NI kernel did not answer in time")
            msg = self._recv(left)
            if msg is not None:
                self._ingest(msg)

    def _next_event(self, want, timeout: Optional[float]):
        """The first queued event ``want`` accepts (others stay queued), reading more as
        needed; None if ``timeout`` seconds pass."""
        capture = self.clock_mode == "capture"
        # on a capture's clock the timeout runs on it: it passes when a frame or tick says
        # so, not after wall seconds (a replay may feed a minute of capture in a millisecond,
        # or take a second over one frame)
        deadline = None if timeout is None else self.clock() + timeout
        ring = self.ring
        if ring is not None:
            # the events handed out before are done with: their bytes go back to the NI (up
            # to the first ring event still queued: a scanner may take events out of order)
            ring.consume(self._ring_low())
            pending = self._pending
            if (pending and type(pending[0]) is RingFrame and want(pending[0])
                    and not (capture and self._after_tick)):
                ev = pending.popleft()          # the common case, in short
                self._ring_next = ev.number + 1
                return ev
        seen = 0
        while True:
            if self._answer_syncs():
                seen = 0
            for i in range(seen, len(self._pending)):
                ev = self._pending[i]
                if not isinstance(ev, _Sync) and want(ev):
                    seq = _ring_seq(ev)
                    if seq is not None:
                        if (capture and deadline is not None
                                and self._after_tick.get(seq, 0.0) >= deadline):
                            return None     # time ran out (a tick said so) before it came
                        self._after_tick.pop(seq, None)
                        self._ring_next = seq + 1
                    del self._pending[i]
                    return ev
            seen = len(self._pending)
            if ring is not None and self._sock_fill():
                continue                    # socket messages first: a sync, a tick, stream data
            if ring is not None and self._ring_poll():
                continue                    # (before the deadline: a timeout of 0 takes what is there)
            left = None if deadline is None else deadline - self.clock()
            if left is not None and left <= 0:
                return None                 # (a tick may have moved the clock past it)
            if ring is None:
                msg = self._recv(None if capture else left)
                if msg is None:
                    return None
                self._ingest(msg)
                continue
            self._ring_flush()              # about to sleep: the NI gets our decisions first
            if len(self._pending) != seen:
                continue                    # a barrier's wait took in events (a sync): no sleep
            if ring.wait(None if capture else left, [self.sock]):
                msg = self._recv(None)
                if msg is not None:
                    self._ingest(msg)

    # ---- the ring
    def _ring_poll(self, limit: Optional[int] = None) -> int:
        """Queues the frames the NI published on the ring since the last poll."""
        try:
            frames = self.ring.poll(limit)
        except RingError as exc:
            raise ScannerError(f"bad ring from the NI kernel: {exc}") from None
        tmax = max((f.time for f in frames), default=0.0)
        if frames and any(type(f) is RingStream for f in frames):
            frames = [self._ring_stream_event(f) if type(f) is RingStream else f for f in frames]
            frames = [f for f in frames if f is not None]
        if frames:
            if self.clock_mode == "capture":
                self._now = max(self._now, tmax)
                if self._told:
                    if len(self._after_tick) > 4096:    # taken by frames_batch: forget them
                        self._after_tick = {k: v for k, v in self._after_tick.items()
                                            if k >= self._ring_next}
                    for f in frames:
                        self._after_tick[_ring_seq(f)] = self._told
            self._pending.extend(frames)
        return len(frames)

    def _ring_stream_event(self, d: RingStream):
        """The event of one stream descriptor from the ring (None: a stream we never
        opened, whose bytes we leave)."""
        if d.kind == KIND_STREAM_OPEN:
            st = Stream(self, dict(d.info, _ring_handle=d.handle))
            self.streams[d.stream] = st
            return _RingOpened(st, seq=d.seq)
        st = self.streams.get(d.stream)
        if st is None:
            return None
        if d.kind == KIND_STREAM_DATA:
            st.received[d.direction] = max(st.received[d.direction], d.offset + len(d.data))
            return _RingData(st, d.direction, d.offset, bytes(d.data), d.held, seq=d.seq, view=d.data)
        if d.kind == KIND_STREAM_END:
            st.ended[d.direction] = d.offset
            return _RingEnd(st, d.direction, d.offset, seq=d.seq)
        self.streams.pop(d.stream, None)
        st.closed, st.reason = True, d.reason
        return _RingClosed(st, d.reason, seq=d.seq)

    def _ring_stream_pass(self, handle: int, direction: int, upto: int) -> None:
        ring = self.ring
        ring.stream_pass(handle, direction, upto)
        if len(ring.decisions) >= self.RING_BATCH:
            self._ring_flush()

    def _ring_low(self) -> int:
        """Where the ring's bytes still in use begin: the first ring event still queued (the
        queue is in arrival order), else everything polled."""
        for ev in self._pending:
            seq = _ring_seq(ev)
            if seq is not None:
                return seq
        return self.ring.polled

    def _sock_fill(self) -> bool:
        """Takes in the socket's messages without waiting (a sync among them takes in the
        ring's frames published before it); True if any event was queued."""
        n = len(self._pending)
        for _ in range(64):
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                break
            msg = self._recv(None)
            if msg is not None:
                self._ingest(msg)
        return len(self._pending) != n

    def _ring_fill(self) -> bool:
        """Takes in what is there without waiting: socket messages first, then the
        ring's frames."""
        a = self._sock_fill()
        return bool(self._ring_poll()) or a

    def _ring_flush(self) -> None:
        if self.ring is not None and self.ring.decisions:
            if self._ring_barrier:
                # a checkpoint went ahead of these decisions on the socket; the NI applies
                # ring decisions on its own loop: wait until the kernel has kept it
                self._ring_barrier = False
                self._request(wire.Barrier().body())
            try:
                self.ring.flush()
            except RingError as exc:
                raise ScannerError(f"ring: {exc}") from None

    def flush(self) -> None:
        """Publishes the decisions buffered for the ring now (the SDK does this by itself
        before it waits for an event, every RING_BATCH decisions and before it answers a
        sync; a scanner about to spend long on other work may call it first)."""
        self._ring_flush()

    def _answer_syncs(self) -> int:
        """``sync`` is answered once every event queued before it was taken: the scanner
        asks for its next event only once it has handled the earlier ones, so the answer
        tells the kernel that everything sent before it has been seen, and every decision
        and alert it caused sent (offline replay waits for this)."""
        n = 0
        while self._pending and isinstance(self._pending[0], _Sync):
            if n == 0:
                self._ring_flush()      # the decisions made so far, before the answer
            self.sock.send(wire.encode_control(wire.Synced(self._pending.popleft().id).body()))
            n += 1
        return n

    def ready(self) -> None:
        """Tells the NI kernel this scanner has made its subscriptions.  Until it knows, the
        kernel holds back what this scanner's contain rights cover (it could not yet have
        asked for it); the first wait for an event (recv, events, accept, ...) says so too,
        so a scanner calls this only to be ready before it waits."""
        while True:
            msg = self._recv(0)
            if msg is None:
                break
            self._ingest(msg)
        self._answer_syncs()

    def recv(self, timeout: Optional[float] = None) -> Optional[Frame]:
        """The next frame, or None if ``timeout`` seconds pass without one.  Its ``data``
        (a read-only memoryview) is valid until the scanner asks for its next event; copy
        it (``bytes(frame.data)``) to keep it."""
        return self._next_event(lambda e: isinstance(e, Frame), timeout)

    def frames_batch(self, max: int = 256, timeout: Optional[float] = None) -> list:
        """Every frame there is now, at least one and at most ``max`` (waiting up to
        ``timeout`` seconds for the first; [] if none came).  Their ``data`` views stay
        valid until the next frames_batch, recv or other request for an event; decisions
        on them are batched as ever.  The way to keep up with a fast NI: one call per burst
        instead of one per frame."""
        if max < 1:
            raise ValueError("max must be at least 1")
        first = self.recv(timeout)
        if first is None:
            return []
        out = [first]
        if self.ring is not None and not any(isinstance(e, Frame) for e in self._pending):
            self._ring_poll(max - 1)
        rest: collections.deque = collections.deque()
        pending = self._pending
        while pending and len(out) < max:
            ev = pending.popleft()
            if isinstance(ev, _Sync):
                pending.appendleft(ev)      # answered when the scanner asks again
                break
            (out if isinstance(ev, Frame) else rest).append(ev)
        if rest:
            rest.extend(pending)
            self._pending = rest
        last = out[-1]
        if isinstance(last, RingFrame):
            self._ring_next = last.number + 1
        return out

    def frames(self, timeout: Optional[float] = None) -> Iterator[Optional[Frame]]:
        """Yields frames forever; with ``timeout``, yields None after each quiet interval
        so the scanner can do timed work."""
        while True:
            yield self.recv(timeout)

    def events(self, timeout: Optional[float] = None) -> Iterator[Optional[Event]]:
        """Yields every event in arrival order: Frame, StreamOpened, StreamData, StreamEnd,
        StreamClosed; with ``timeout``, None after each quiet interval."""
        while True:
            yield self._next_event(lambda e: True, timeout)

    def flows(self, timeout: Optional[float] = None) -> Iterator[Optional[FlowEvent]]:
        """Yields flow events forever (other events stay queued for their own calls); with
        ``timeout``, None after each quiet interval."""
        while True:
            yield self._next_event(lambda e: isinstance(e, FlowEvent), timeout)

    def accept(self, timeout: Optional[float] = None) -> Optional[Stream]:
        """The next new stream (a connection whose handshake completed), or None after
        ``timeout`` seconds."""
        ev = self._next_event(lambda e: isinstance(e, StreamOpened), timeout)
        return ev.stream if ev is not None else None

    # ---- requests
    def _request(self, body: dict) -> dict:
        self._next_id += 1
        body = dict(body, id=self._next_id)
        self.sock.send(wire.encode_control(body))
        rid = self._next_id
        reply = self._wait_control(lambda b: b.get("op") == "reply" and b.get("id") == rid,
                                   timeout=30)
        if not reply.get("ok"):
            raise Refused(reply.get("error", "refused"))
        return reply

    def subscribe(self, match: dict, contain: bool = False) -> None:
        """Asks for frames matching ``match``; ``contain`` asks to hold and decide them."""
        self._request(wire.Subscribe(match, bool(contain)).body())

    def subscribe_stream(self, port: Union[int, str, list, None] = None, direction: str = "both",
                         contain: bool = False) -> None:
        """Asks for the reconstructed streams of TCP connections to server ``port`` (a port,
        "lo-hi", [lo, hi], or None for all): the bytes of ``direction`` (from_guest,
        to_guest or both); ``contain`` holds them until this scanner passes them."""
        fields = {"stream": True, "direction": direction, **({"port": port} if port is not None else {})}
        self._request(wire.StreamSubscribe(fields, bool(contain)).body())

    def subscribe_flows(self, events: Optional[list] = None, proto: Union[int, str, list, None] = None,
                        direction: str = "both") -> None:
        """Asks for events of the NI's flow stage: ``events`` of open, state, close, summary
        (None: all), of flows of protocol ``proto`` (a name such as "tcp", a number, or a
        list; None: all) opened by the guest (``direction="from_guest"``), by the remote side
        ("to_guest") or either ("both").  Read only; needs a ``flows`` right."""
        fields: dict = {"flows": True, "direction": direction}
        if events is not None:
            fields["events"] = list(events)
        if proto is not None:
            fields["proto"] = proto
        self._request(wire.FlowSubscribe(fields).body())

    def inject(self, index: int, direction: Union[int, str] = TO_GUEST) -> None:
        """Sends pre-registered frame ``index`` to the guest (or from it, into the network)."""
        d = wire.DIRECTIONS.get(direction) if isinstance(direction, str) else direction
        try:
            body = wire.Inject(int(index), d).body()
        except wire.RequestError as exc:       # as the kernel would have answered it
            raise Refused(exc.reason) from None
        self._request(body)

    def reset(self, src: str, sport: int, dst: str, dport: int, seq: int, ack: int, mac: str) -> None:
        """Has the NI send a TCP RST|ACK from the guest's address ``src``:``sport`` to
        ``dst``:``dport`` (Ethernet destination ``mac``, the next hop) with these sequence
        and acknowledgement numbers, as if the guest had sent it: it goes through the NI's
        anti-spoofing and prevent rules.  It repairs a connection the guest left half-open
        (a SYN bomb's victim).  Needs ``resets = true`` in this scanner's policy; raises
        Refused otherwise, or if ``src`` is not the guest's."""
        try:
            body = wire.Reset(str(src), sport, str(dst), dport, seq, ack, mac).body()
        except wire.RequestError as exc:       # as the kernel would have answered it
            raise Refused(exc.reason) from None
        self._request(body)

    def alert(self, message: str, /, **fields) -> None:
        """Sends an alert to the administrator (the kernel rate-limits them).  ``fields``
        must be strict JSON within the wire's limits: a NaN or Infinity, a value JSON has no
        type for, or more than wire.MAX_JSON bytes raises WireError here (a ValueError)."""
        self.sock.send(wire.encode_control(wire.Alert(str(message), fields).body()))

    # ---- state kept by the NI kernel
    def checkpoint(self, state) -> None:
        """Has the NI kernel keep ``state`` (bytes, or anything ``json.dumps`` takes) for
        this scanner, replacing the one before; ``b""`` clears it.  Returns at once (no
        round trip); the kernel handles it before anything this scanner sends after it.
        Raises ValueError if it does not fit in ``checkpoint_max`` bytes (0: checkpoints are
        off for this scanner)."""
        if isinstance(state, (bytes, bytearray, memoryview)):
            kind, data = wire.CHECKPOINT_BYTES, bytes(state)
        else:
            kind, data = wire.CHECKPOINT_JSON, json.dumps(state, separators=(",", ":")).encode()
        if len(data) > self.checkpoint_max:
            raise ValueError(f"checkpoint of {len(data)} bytes exceeds this scanner's limit of "
                             f"{self.checkpoint_max} bytes")
        self.sock.send(wire.encode_checkpoint(kind, data))
        if self.ring is not None:
            self._ring_barrier = True       # the next ring decisions wait until it is kept

    def restore(self):
        """The state this scanner last saved with :meth:`checkpoint` (bytes, or the JSON
        value decoded), or None if there is none (or it cannot be decoded)."""
        cp = self._restored
        if cp is None or not cp.data:
            return None
        if cp.kind == wire.CHECKPOINT_BYTES:
            return cp.data
        try:
            return json.loads(cp.data)
        except (ValueError, RecursionError):
            return None

    # ---- decisions
    def decide(self, frame: Union[Frame, int], verdict: int) -> None:
        """Decides a held frame (PASS or CUT).  A frame that came on the ring is decided on
        the ring: buffered, and published in a batch (RING_BATCH decisions, or when the
        scanner next waits, or :meth:`flush`).  A bare number names a ring frame while the
        ring is in use."""
        ring = self.ring
        if ring is not None and (isinstance(frame, RingFrame) or not isinstance(frame, Frame)):
            ring.decide(frame.number if isinstance(frame, Frame) else int(frame), verdict)
            if len(ring.decisions) >= self.RING_BATCH:
                self._ring_flush()
            return
        number = frame.number if isinstance(frame, Frame) else int(frame)
        self.sock.send(wire.encode_decision(number, verdict))

    def pass_(self, frame: Union[Frame, StreamData, int]) -> None:
        """Passes a held frame, or the bytes of a stream chunk (and all before them)."""
        if isinstance(frame, StreamData):
            frame.stream.pass_(frame)
            return
        self.decide(frame, PASS)

    def cut(self, frame: Union[Frame, int]) -> None:
        self.decide(frame, CUT)

    def close(self) -> None:
        if self.ring is not None:
            try:
                self._ring_flush()
            finally:
                self.ring.close()
        self.sock.close()
