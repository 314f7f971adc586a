"""The scanner wire protocol, sans-I/O: bytes in, messages out.

Scanner and NI kernel talk over one SOCK_SEQPACKET socket, one message per packet, so the
kernel never has to frame a stream a hostile scanner writes.  The first byte says what a
message is:

``F`` frame, kernel -> scanner (binary, the hot path)::

    'F' | direction u8 | flags u8 | pad u8 | number u64 | time_ns u64 | length u32 | frame bytes

  ``direction`` is 1 (from the guest) or 2 (to the guest), ``flags`` bit 0 says the frame is
  held and a decision is owed, ``number`` counts the frames this scanner has been given
  (1, 2, 3, ...), ``time_ns`` is when the NI took the frame (Unix time, ns).

  Frames on the ring (the fast path).  A kernel that gives the scanner a shared-memory ring
  sets ``$VHOSTNI_RING_FDS`` = "ni,sc,kick_scanner,kick_ni" (beside ``$VHOSTNI_SCANNER_FD``):
  region A (a sealed memfd the scanner maps read-only: header, descriptor ring, the bytes of
  the matched frames), region B (the scanner's cursors and its decision ring) and two
  eventfds; csrc/vnring.h is the ABI (layout, memory ordering, the want_kick protocol,
  what the NI does with bad decisions).  The scanner maps both, validates the header and
  sends the ``ring`` request (below); once the reply is ok, the kernel delivers the frames
  of this scanner's frame subscriptions as ring descriptors, not ``F`` messages, and the
  scanner decides them on the decision ring (``{seq, verdict}``, the descriptor's ``seq``
  being the number), not with ``D``.  Everything else stays on this socket: streams, flows,
  alerts, checkpoints, syncs, ticks, replies.  ``F`` messages the kernel sent before the
  reply are decided with ``D`` as before.  No variable, or a reply not ok (an older kernel):
  frames stay on the socket.  A ``sync`` covers the ring too: the kernel sends it after
  publishing (storing ``desc_prod`` for) every descriptor it must cover; the scanner reads
  ``desc_prod`` after receiving the sync, takes in every descriptor below it and publishes
  its decisions on them before it answers ``synced``.

  Streams on the ring: with ``"streams": true`` in the ring request the streams this
  scanner's stream subscriptions match (connections opened from then on) come on the ring
  too, as OPEN / DATA / END / CLOSE records (``struct vnr_stream`` heads their bytes: the
  stream id the socket requests name, its ring handle, the offset; OPEN adds the connection,
  CLOSE the reason), not as ``stream_*`` messages and ``S`` data.  A pass is a ring decision
  ``{offset, VNR_STREAM_PASS | direction, handle}``; ``cut``, ``inject``, ``more`` and
  ``kill`` stay requests here, checked against what the ring holds.  A checkpoint is
  ordered before later ring decisions by a ``barrier`` request (below): the kernel applies
  ring decisions on its own loop, so the scanner publishes decisions made after a
  checkpoint only once the barrier is answered.

``D`` decision, scanner -> kernel (binary)::

    'D' | verdict u8 (0 pass, 1 cut) | pad 6 | number u64

``S`` stream data, kernel -> scanner (binary, the hot path of stream subscriptions)::

    'S' | direction u8 | flags u8 | pad u8 | stream u64 | offset u64 | length u32 | bytes

  the next in-order bytes of one direction of stream ``stream``, starting at byte
  ``offset`` of that direction (0 is the first byte after the SYN); ``flags`` bit 0 says
  they are held: this scanner (it has contain rights on them) owes a pass for them.
  Chunks of one direction arrive in order, without gaps or overlaps.

``P`` stream pass, scanner -> kernel (binary)::

    'P' | direction u8 | pad 6 | stream u64 | upto u64

  every byte of that direction below ``upto`` may go on, as far as this scanner is
  concerned.  A held segment leaves when every contain scanner passed all its bytes (one
  whose boundary a pass falls inside waits to be passed further).  Passing beyond the
  bytes read so far passes them as they come (2**64-1: the rest of the direction).

``K`` checkpoint, both ways (binary)::

    'K' | kind u8 (0 bytes, 1 JSON) | pad 2 | length u32 | data

  scanner -> kernel: the scanner's latest state, which the NI kernel keeps for it (the
  previous one is replaced; an empty one clears it) and hands back, and only to the same
  scanner of the same NI, when it is started again (after a crash, a kill or a daemon
  restart with ``--state-dir``).  The kernel never parses ``data``; ``kind`` only says how
  the SDK encoded it.  At most MAX_CHECKPOINT bytes on the wire; the policy's
  ``checkpoint_max_bytes`` may set a lower limit (0: checkpoints off), and the kernel
  refuses (and alerts) a larger one.
  kernel -> scanner: right after the hello, if the hello's ``checkpoint`` is not null (it
  is then the checkpoint's length): the checkpoint the scanner saved last.

``J`` control, both ways: ``'J'`` followed by one UTF-8 JSON object.

  scanner -> kernel: ``{"op": "subscribe", "id": N, "match": {...}, "contain": bool}``
  (frames; a match may say ``"flow": "new"``: only frames that open their flow in their
  direction in the NI's flow table, i.e. until one of its frames left the NI that way;
  frames the flow stage cannot place count as opening one; see vhostni.policy),
  ``{"op": "subscribe", "id": N, "stream": true, "port": P|"lo-hi"|[lo, hi],
  "direction": "from_guest"|"to_guest"|"both", "contain": bool}`` (reconstructed TCP
  streams of connections to server port P: see vhostni.policy for how rights are checked),
  ``{"op": "subscribe", "id": N, "flows": true, "events": ["open", "state", "close",
  "summary"], "proto": P|[P, ...], "direction": "from_guest"|"to_guest"|"both"}`` (events of
  the NI's flow stage: flows of those protocols (names or numbers; all if absent) opened by
  the guest, by the remote side or either; all four kinds of event if ``events`` is
  absent; a read right, checked against the scanner's ``flows`` rights, see
  vhostni.policy),
  ``{"op": "inject", "id": N, "index": I, "direction": "to_guest"|"from_guest"}`` (frame
  injection I of the hello's ``injections``),
  ``{"op": "alert", "message": str, "fields": {...}}``, ``{"op": "synced", "id": N}``,
  ``{"op": "ring", "id": N, "version": 1[, "streams": true]}`` (deliver frames, and with
  ``streams`` new streams, on the ring of ``$VHOSTNI_RING_FDS`` from now on, see "Frames on
  the ring" above; ``version`` is the ABI's VNR_VERSION; no other fields; not ok: they stay on
  the socket), ``{"op": "barrier", "id": N}`` (answered once everything sent before it was
  handled),
  ``{"op": "reset", "id": N, "src": addr, "sport": p, "dst": addr, "dport": p, "seq": n,
  "ack": n, "mac": "aa:bb:..."}`` (the kernel builds a TCP RST|ACK from the guest's own
  address ``src`` to ``dst`` and sends it into the network as if the guest had sent it,
  through anti-spoofing and the prevent rules: needs ``resets = true`` in the scanner's
  policy and at most its ``resets_per_second``; ``mac`` is the next hop's Ethernet address:
  ``src``, ``dst`` and ``mac`` must be unicast, strings, ``src`` != ``dst``),
  and for streams (a request outside the scanner's rights is refused with an alert to the
  administrator):
  ``{"op": "kill", "stream": S}`` (no reply; forged RSTs to both ends, held bytes dropped),
  ``{"op": "more", "stream": S, "direction": d}`` (no reply; a decision needs more bytes;
  recorded; opening the window beyond the receiver's comes later),
  ``{"op": "cut", "id": N, "stream": S, "direction": d, "offset": o, "length": n}`` (bytes
  [o, o+n) of direction d never reach the receiver; the NI rewrites sequence numbers
  around them; the cut also counts as this scanner's pass of them), and
  ``{"op": "inject", "id": N, "stream": S, "direction": d, "offset": o, "index": I}`` (the
  hello's ``stream_injections`` I, or ``"name": str`` in place of ``"index"``: its bytes
  are inserted before byte o of direction d).  Offsets are the
  sender's, as read; a cut or inject needs contain rights on that direction and may only
  touch bytes neither this scanner nor the NI passed yet, and edits of one direction come
  in stream order (each at or after the end of the previous one).  The kernel handles a
  scanner's messages in the order sent, so a ``P`` sent before a cut counts before it.

  kernel -> scanner: ``{"op": "hello", "version": 1, "scanner": name, "ni": name,
  "config": {...}, "injections": [names], "stream_injections": [names]}`` first
  (the hello also carries ``"checkpoint_max": bytes`` and ``"checkpoint": length|null``,
  see ``K``), then
  ``{"op": "reply", "id": N, "ok": bool, "error": str}`` for each subscribe, inject,
  cut and ring request, and for streams
  ``{"op": "stream_open", "stream": S, "family": 4|6, "client": "guest"|"remote",
  "guest": [addr, port], "remote": [addr, port], "port": server_port, "midstream": bool,
  "read": [directions], "held": [directions]}`` when a connection's handshake completes
  (before any of its bytes; ``midstream``: no handshake was seen, the NI adopted it and
  offset 0 is where it joined), ``{"op": "stream_end", "stream": S, "direction": d,
  "offset": o}`` when that direction's FIN follows byte o-1, and ``{"op": "stream_close",
  "stream": S, "reason": "fin"|"rst"|"killed"|"idle"|"bypass"|"gone"|"timeout"|
  "overrun"|"scanner"}`` last; for flows subscriptions, one message per event of a flow
  they cover::

      {"op": "flow", "event": "open"|"state"|"close"|"summary", "flow": F, "family": 4|6,
       "proto": P, "initiator": "guest"|"remote", "guest": [addr, port],
       "remote": [addr, port], "state": [names], "change": name, "reason": name,
       "packets": [from_guest, to_guest], "bytes": [from_guest, to_guest],
       "start": s, "last": s, "time": s, "icmp": {"type": t, "code": c, "from": addr}}

  ``flow`` is the flow's id (never reused); ports of ICMP echo-like flows are the message's
  identifier; ``state`` lists what is true of the flow now: ``syn``, ``synack``,
  ``established``, ``reset``, ``fin_initiator``, ``fin_responder``, ``unanswered`` (no
  SYN-ACK within the policy's ``flow_tcp_syn_ms``), ``incomplete`` (SYN-ACK, but the
  initiator never completed the handshake), ``answered`` (a packet came back),
  ``icmp_error`` (an ICMP error quoting one of its packets came; ``icmp`` says which and
  from whom), ``midstream`` (TCP first seen without its SYN); ``change`` (state events only)
  names the one that just became true; ``reason`` (close only) is ``idle``, ``fin``,
  ``reset``, ``unanswered`` or ``gone``; counters are IP bytes and packets (a TSO frame is
  one packet) so far, final on close; times are Unix seconds on the NI's clock (the
  capture's with ``--clock capture``).  Events the NI could not queue (the kernel lagged)
  are lost and counted in the NI's ``flow_events_dropped``; and ``{"op": "sync", "id": N}`` when the kernel wants to
  know that the scanner has handled everything sent before it (offline replay does, to stay
  deterministic): the SDK answers ``synced`` with the same id once every event before the
  sync was taken and the scanner asks for its next one.  Every scanner gets one sync with
  id -1 right after ``hello``: its answer says the scanner is ready (done subscribing), and
  until then the kernel holds back what the scanner's contain rights cover.
  The hello's ``"clock"`` is ``"system"``, or ``"capture"`` when the NI runs on a time
  handed in (``vhostni replay --clock capture``: a capture's timestamps); then the hello's
  ``"now"`` is that time at the start, frames' ``time_ns`` is that time, and ``{"op": "tick", "now": seconds}`` (Unix time, a float)
  tells a scanner that time passed without a frame for it.  The SDK's ``clock()`` and
  ``time()`` follow it, and its timeouts run on it.

  A control message is at most MAX_JSON bytes of strict JSON (RFC 8259: no NaN or
  Infinity) whose lists and objects nest at most MAX_DEPTH levels.  Both sides check this
  when they encode (:func:`encode_control` raises WireError, so a scanner's ``alert`` with
  a NaN field fails at the call) and when they decode; the policy validator checks the
  hello it will send (:func:`encode_hello`) against the same limits, so a policy that
  validates can always be sent.

This module is shared by the SDK and the kernel and imports nothing from either.
"""
from __future__ import annotations

import ipaddress
import json
import re
import struct
from dataclasses import dataclass
from typing import Optional, Union

VERSION = 1
RING_VERSION = 1                    # csrc/vnring.h's VNR_VERSION
FROM_GUEST = 1
TO_GUEST = 2
DIRECTIONS = {"from_guest": FROM_GUEST, "to_guest": TO_GUEST}
DIRECTION_NAMES = {v: k for k, v in DIRECTIONS.items()}
PASS = 0
CUT = 1
FLAG_HELD = 1

FRAME = struct.Struct("<cBBxQQI")
DECISION = struct.Struct("<cB6xQ")
STREAM = FRAME                      # 'S': same layout, (stream, offset) for (number, time)
STREAM_PASS = struct.Struct("<cB6xQQ")
CHECKPOINT = struct.Struct("<cB2xI")
CHECKPOINT_BYTES = 0
CHECKPOINT_JSON = 1
# the largest checkpoint a scanner may keep with the NI kernel (a policy may set less)
MAX_CHECKPOINT = 65536
PASS_ALL = (1 << 64) - 1
MAX_FRAME = 65550
MAX_JSON = 65536
# how deeply a control message's lists and objects may nest: whoever handles one (and
# re-encodes its fields, as alerts are) must never run out of stack
MAX_DEPTH = 32
# the largest message either side may send; receivers read with this buffer size
MAX_MESSAGE = FRAME.size + MAX_FRAME
assert CHECKPOINT.size + MAX_CHECKPOINT <= MAX_MESSAGE


class WireError(ValueError):
    """A message that is not a valid scanner-protocol message."""


@dataclass(frozen=True)
class Frame:
    number: int
    direction: int
    held: bool
    time: float
    data: bytes

    @property
    def from_guest(self) -> bool:
        return self.direction == FROM_GUEST


@dataclass(frozen=True)
class Decision:
    number: int
    verdict: int


@dataclass(frozen=True)
class StreamData:
    stream: int
    direction: int
    held: bool
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        """The offset just past these bytes (what to pass to let them all go)."""
        return self.offset + len(self.data)


@dataclass(frozen=True)
class StreamPass:
    stream: int
    direction: int
    upto: int


@dataclass(frozen=True)
class Control:
    body: dict


@dataclass(frozen=True)
class Checkpoint:
    kind: int            # CHECKPOINT_BYTES or CHECKPOINT_JSON: how the SDK encoded data
    data: bytes


Message = Union[Frame, Decision, StreamData, StreamPass, Checkpoint, Control]


def encode_frame(number: int, direction: int, held: bool, time_ns: int, data: bytes) -> bytes:
    return FRAME.pack(b"F", direction, FLAG_HELD if held else 0, number, time_ns, len(data)) + data


def encode_decision(number: int, verdict: int) -> bytes:
    return DECISION.pack(b"D", verdict, number)


def encode_stream_data(stream: int, direction: int, held: bool, offset: int, data: bytes) -> bytes:
    return STREAM.pack(b"S", direction, FLAG_HELD if held else 0, stream, offset, len(data)) + data


def encode_stream_pass(stream: int, direction: int, upto: int) -> bytes:
    return STREAM_PASS.pack(b"P", direction, stream, upto)


def encode_checkpoint(kind: int, data: bytes) -> bytes:
    if len(data) > MAX_CHECKPOINT:
        raise WireError(f"checkpoint of {len(data)} bytes exceeds {MAX_CHECKPOINT}")
    return CHECKPOINT.pack(b"K", kind, len(data)) + data


def encode_control(body: dict) -> bytes:
    """``'J'`` + ``body`` as compact strict JSON; WireError if it is nested deeper than
    MAX_DEPTH, longer than MAX_JSON, holds a non-finite float or a value JSON has no
    type for (e.g. a TOML date)."""
    if depth(body) > MAX_DEPTH:
        raise WireError(f"control message nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise WireError(f"control message is not strict JSON: {exc}") from None
    if len(data) > MAX_JSON:
        raise WireError(f"control message of {len(data)} bytes exceeds {MAX_JSON}")
    return b"J" + data


def encode_hello(scanner: str, ni: str, config: dict, injections: list[str],
                 stream_injections: list[str], checkpoint_max: int = 0,
                 checkpoint: Optional[int] = None, clock: str = "system",
                 now: Optional[float] = None) -> bytes:
    """The kernel's first message to a scanner (one place, so that the policy validator
    checks exactly what the kernel will send). ``checkpoint_max`` is the scanner's limit for
    checkpoints; ``checkpoint`` the length of the saved one the kernel sends next (None: none);
    ``clock``: "system", or "capture" when the NI runs on a time handed in (offline replay on
    a capture's timestamps: the kernel then sends ``tick`` messages as that time passes, and
    ``now`` is that time at the start, Unix seconds)."""
    if clock not in ("system", "capture"):
        raise ValueError(f"bad clock {clock!r}")
    body = {"op": "hello", "version": VERSION, "scanner": scanner, "ni": ni, "config": config,
            "injections": injections, "stream_injections": stream_injections,
            "checkpoint_max": checkpoint_max, "checkpoint": checkpoint, "clock": clock}
    if clock == "capture":
        body["now"] = float(now or 0.0)
    return encode_control(body)


def depth(obj, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and objects nest in a decoded JSON value (iteratively; counting
    stops just past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list, tuple)):
            deepest = max(deepest, d)
            if d <= limit:
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode(msg: bytes) -> Message:
    """Parses one message; raises WireError for anything malformed."""
    if not msg:
        raise WireError("empty message")
    kind = msg[:1]
    if kind == b"F":
        if len(msg) < FRAME.size:
            raise WireError("truncated frame header")
        _, direction, flags, number, time_ns, length = FRAME.unpack_from(msg)
        if direction not in (FROM_GUEST, TO_GUEST):
            raise WireError(f"bad direction {direction}")
        if length != len(msg) - FRAME.size or length > MAX_FRAME:
            raise WireError(f"frame length {length} does not match the message")
        return Frame(number, direction, bool(flags & FLAG_HELD), time_ns / 1e9, msg[FRAME.size:])
    if kind == b"D":
        if len(msg) != DECISION.size:
            raise WireError(f"decision of {len(msg)} bytes, expected {DECISION.size}")
        _, verdict, number = DECISION.unpack(msg)
        if verdict not in (PASS, CUT):
            raise WireError(f"bad verdict {verdict}")
        return Decision(number, verdict)
    if kind == b"S":
        if len(msg) < STREAM.size:
            raise WireError("truncated stream data header")
        _, direction, flags, stream, offset, length = STREAM.unpack_from(msg)
        if direction not in (FROM_GUEST, TO_GUEST):
            raise WireError(f"bad direction {direction}")
        if length != len(msg) - STREAM.size or length > MAX_FRAME:
            raise WireError(f"stream data length {length} does not match the message")
        return StreamData(stream, direction, bool(flags & FLAG_HELD), offset, msg[STREAM.size:])
    if kind == b"P":
        if len(msg) != STREAM_PASS.size:
            raise WireError(f"stream pass of {len(msg)} bytes, expected {STREAM_PASS.size}")
        _, direction, stream, upto = STREAM_PASS.unpack(msg)
        if direction not in (FROM_GUEST, TO_GUEST):
            raise WireError(f"bad direction {direction}")
        return StreamPass(stream, direction, upto)
    if kind == b"K":
        if len(msg) < CHECKPOINT.size:
            raise WireError("truncated checkpoint header")
        _, ckind, length = CHECKPOINT.unpack_from(msg)
        if ckind not in (CHECKPOINT_BYTES, CHECKPOINT_JSON):
            raise WireError(f"bad checkpoint kind {ckind}")
        if length != len(msg) - CHECKPOINT.size or length > MAX_CHECKPOINT:
            raise WireError(f"checkpoint length {length} does not match the message "
                            f"(or exceeds {MAX_CHECKPOINT})")
        return Checkpoint(ckind, msg[CHECKPOINT.size:])
    if kind == b"J":
        if len(msg) - 1 > MAX_JSON:
            raise WireError("control message too large")
        try:
            body = json.loads(msg[1:].decode(), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise WireError(f"bad JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("op"), str):
            raise WireError("control message must be a JSON object with an 'op' string")
        if depth(body) > MAX_DEPTH:
            raise WireError(f"control message nested deeper than {MAX_DEPTH}")
        return Control(body)
    raise WireError(f"unknown message type {kind!r}")


# ---- scanner requests: what a scanner's control messages ask of the kernel, typed
#
# decode_request turns the body of a scanner's ``J`` message into one of these, each of
# which checks its own fields on construction (as h11's events do), so the kernel handles
# only well-formed requests; the SDK builds its requests from the same classes.  What the
# kernel checks against the policy (rights, the match grammar of vhostni.policy, which
# injections exist) is not checked here.

class RequestError(WireError):
    """A scanner request with malformed fields: refused with ``reason`` (answered with a
    reply to ``id`` if ``reply``; counted as refused if ``counted``), and alerted to the
    administrator as ``alert`` (message, fields) if that is set."""

    def __init__(self, reason: str, id: Optional[int] = None, reply: bool = True,
                 counted: bool = True, alert: Optional[tuple[str, dict]] = None):
        super().__init__(reason)
        self.reason, self.id, self.reply, self.counted, self.alert = reason, id, reply, counted, alert


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _direction_of(v) -> Optional[int]:
    return DIRECTIONS.get(v) if isinstance(v, str) else None


@dataclass(frozen=True)
class Subscribe:
    """Frames matching ``match`` (vhostni.policy's match grammar, checked by the kernel)."""
    match: object
    contain: bool = False
    id: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.contain, bool):
            raise RequestError("contain must be true or false", self.id)

    def body(self) -> dict:
        return _with_id({"op": "subscribe", "match": self.match, "contain": self.contain}, self.id)


@dataclass(frozen=True)
class StreamSubscribe:
    """Reconstructed TCP streams: ``fields`` holds the request's ``stream``, ``port`` and
    ``direction`` as sent (vhostni.policy's stream-match grammar, checked by the kernel)."""
    fields: dict
    contain: bool = False
    id: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.contain, bool):
            raise RequestError("contain must be true or false", self.id)

    def body(self) -> dict:
        return _with_id({"op": "subscribe", **self.fields, "contain": self.contain}, self.id)


@dataclass(frozen=True)
class FlowSubscribe:
    """Events of the NI's flow stage: ``fields`` holds the request's ``flows``, ``events``,
    ``proto`` and ``direction`` as sent (vhostni.policy's flows grammar, checked by the
    kernel).  Read only: there is no ``contain``."""
    fields: dict
    id: Optional[int] = None

    def __post_init__(self):
        if self.fields.get("flows") is not True:
            raise RequestError("flows must be true", self.id)

    def body(self) -> dict:
        return _with_id({"op": "subscribe", **self.fields}, self.id)


@dataclass(frozen=True)
class Inject:
    """Pre-registered frame injection ``index`` (the hello's ``injections``)."""
    index: int
    direction: int
    id: Optional[int] = None

    def __post_init__(self):
        if not _is_int(self.index) or self.index < 0:
            raise RequestError(f"no pre-registered injection {self.index!r}", self.id,
                               alert=("scanner asked for an injection it does not have",
                                      {"index": self.index}))
        if self.direction not in (FROM_GUEST, TO_GUEST):
            raise RequestError("direction must be to_guest or from_guest", self.id)

    def body(self) -> dict:
        return _with_id({"op": "inject", "index": self.index,
                         "direction": DIRECTION_NAMES[self.direction]}, self.id)


def _check_edit_target(stream, direction, offset, id) -> None:
    if not _is_int(stream):
        raise RequestError("stream must be a stream id", id)
    if direction not in (FROM_GUEST, TO_GUEST):
        raise RequestError("direction must be to_guest or from_guest", id)
    if not _is_int(offset) or not 0 <= offset < PASS_ALL:
        raise RequestError("offset must be a stream offset (an integer >= 0)", id)


@dataclass(frozen=True)
class StreamCut:
    """Bytes [offset, offset+length) of a held direction never reach the receiver."""
    stream: int
    direction: int
    offset: int
    length: int
    id: Optional[int] = None

    def __post_init__(self):
        _check_edit_target(self.stream, self.direction, self.offset, self.id)
        if not _is_int(self.length) or not 1 <= self.length < PASS_ALL - self.offset:
            raise RequestError("length must be an integer >= 1", self.id)

    def body(self) -> dict:
        return _with_id({"op": "cut", "stream": self.stream,
                         "direction": DIRECTION_NAMES[self.direction],
                         "offset": self.offset, "length": self.length}, self.id)


@dataclass(frozen=True)
class StreamInject:
    """Pre-registered stream injection ``injection`` (an index into, or a name from, the
    hello's ``stream_injections``) inserted before byte ``offset`` of a held direction."""
    stream: int
    direction: int
    offset: int
    injection: Union[int, str]
    id: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.injection, str) or (_is_int(self.injection) and self.injection >= 0)):
            raise _no_stream_injection(self.injection, self.id)
        _check_edit_target(self.stream, self.direction, self.offset, self.id)

    def body(self) -> dict:
        key = "name" if isinstance(self.injection, str) else "index"
        return _with_id({"op": "inject", "stream": self.stream,
                         "direction": DIRECTION_NAMES[self.direction], "offset": self.offset,
                         key: self.injection}, self.id)


def _no_stream_injection(what, id) -> RequestError:
    return RequestError(f"no pre-registered stream injection {what!r}", id,
                        alert=("scanner asked for an injection it does not have",
                               {"stream_injection": what}))


@dataclass(frozen=True)
class StreamKill:
    """End the connection (no reply)."""
    stream: int

    def __post_init__(self):
        if not _is_int(self.stream):
            raise RequestError("stream must be a stream id", reply=False)

    def body(self) -> dict:
        return {"op": "kill", "stream": self.stream}


@dataclass(frozen=True)
class StreamMore:
    """A decision needs more bytes of ``direction`` (None: of each held one; no reply)."""
    stream: int
    direction: Optional[int] = None

    def __post_init__(self):
        if not _is_int(self.stream):
            raise RequestError("stream must be a stream id", reply=False)

    def body(self) -> dict:
        return {"op": "more", "stream": self.stream,
                **({"direction": DIRECTION_NAMES[self.direction]} if self.direction else {})}


@dataclass(frozen=True)
class Alert:
    """A message for the administrator (no reply)."""
    message: str
    fields: dict

    def __post_init__(self):
        if not isinstance(self.message, str) or not isinstance(self.fields, dict):
            raise RequestError("alert needs a message string and a fields object", reply=False)

    def body(self) -> dict:
        return {"op": "alert", "message": self.message, "fields": self.fields}


@dataclass(frozen=True)
class Synced:
    """The answer to the kernel's sync ``id``: everything before it was handled."""
    id: int

    def __post_init__(self):
        if not _is_int(self.id):
            raise RequestError("synced needs an integer id", reply=False, counted=False)

    def body(self) -> dict:
        return {"op": "synced", "id": self.id}


@dataclass(frozen=True)
class Reset:
    """A TCP RST|ACK from the guest's address ``src`` to ``dst`` with the given sequence and
    acknowledgement numbers, sent to Ethernet address ``mac`` (repairs a connection the guest
    left half-open: the kernel checks ``src`` is the guest's)."""
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    mac: str
    id: Optional[int] = None

    def __post_init__(self):
        # strings only (ip_address would take a number too), no IPv6 scope ("fe80::1%eth0")
        if not (isinstance(self.src, str) and isinstance(self.dst, str)) or "%" in self.src + self.dst:
            raise RequestError("reset: src and dst must be IP addresses", self.id)
        try:
            a, b = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        except ValueError:
            raise RequestError("reset: src and dst must be IP addresses", self.id) from None
        if a.version != b.version:
            raise RequestError("reset: src and dst of different IP versions", self.id)
        for name, addr in (("src", a), ("dst", b)):
            # a connection is between two unicast hosts: a reset to a group, a broadcast, an
            # unspecified or loopback address repairs nothing and would reach hosts that had none
            if (addr.is_multicast or addr.is_unspecified or addr.is_loopback
                    or (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"))):
                raise RequestError(f"reset: {name} must be a unicast address", self.id)
        if a == b:
            raise RequestError("reset: src and dst are the same address", self.id)
        for name in ("sport", "dport"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= 65535:
                raise RequestError(f"reset: {name} must be a port 1..65535", self.id)
        for name in ("seq", "ack"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= 0xFFFFFFFF:
                raise RequestError(f"reset: {name} must be a 32-bit number", self.id)
        if not isinstance(self.mac, str) or not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", self.mac):
            raise RequestError("reset: mac must be an Ethernet address aa:bb:cc:dd:ee:ff", self.id)
        first = int(self.mac[:2], 16)
        if first & 1 or self.mac.replace(":", "").strip("0") == "":
            # the next hop is one host: a group or broadcast address would flood the RST to
            # every port of the switch (every other NI's guest)
            raise RequestError("reset: mac must be a unicast Ethernet address", self.id)

    def body(self) -> dict:
        return _with_id({"op": "reset", "src": self.src, "sport": self.sport, "dst": self.dst,
                         "dport": self.dport, "seq": self.seq, "ack": self.ack, "mac": self.mac}, self.id)


@dataclass(frozen=True)
class RingRequest:
    """Deliver this scanner's frames on its shared-memory ring (csrc/vnring.h) from now on,
    not as ``F`` messages: the scanner mapped the ring ($VHOSTNI_RING_FDS) and speaks ring
    ABI ``version``; with ``streams``, the streams its stream subscriptions match go on the
    ring too (new connections).  Answered with a reply; not ok leaves frames on the socket."""
    version: int
    id: Optional[int] = None
    streams: bool = False

    FIELDS = frozenset({"op", "id", "version", "streams"})

    def __post_init__(self):
        if not _is_int(self.version) or self.version != RING_VERSION:
            raise RequestError(f"ring version {self.version!r} not supported "
                               f"(this kernel speaks {RING_VERSION})", self.id)
        if not isinstance(self.streams, bool):
            raise RequestError("ring: streams must be true or false", self.id)

    def body(self) -> dict:
        return _with_id({"op": "ring", "version": self.version,
                         **({"streams": True} if self.streams else {})}, self.id)


@dataclass(frozen=True)
class Barrier:
    """Answered (ok) once the kernel has handled everything this scanner sent before it.
    The SDK sends one before it publishes ring decisions made after a checkpoint: the
    kernel applies ring decisions on its own loop, so without it a decision could take
    effect before the checkpoint sent ahead of it was kept."""
    id: Optional[int] = None

    def body(self) -> dict:
        return _with_id({"op": "barrier"}, self.id)


Request = Union[Subscribe, StreamSubscribe, FlowSubscribe, Inject, StreamCut, StreamInject, StreamKill,
                StreamMore, Alert, Synced, Reset, RingRequest, Barrier]


def _with_id(body: dict, id: Optional[int]) -> dict:
    return body if id is None else dict(body, id=id)


def decode_request(body: dict) -> Request:
    """The typed request of a scanner's control message body (a decoded ``J`` message);
    raises RequestError for an unknown op or malformed fields."""
    rid = body.get("id")
    rid = rid if _is_int(rid) else None
    op = body.get("op")
    if op == "subscribe":
        contain = body.get("contain", False)
        if "flows" in body:
            if contain is not False:
                raise RequestError("flows are read only: contain must be false", rid)
            return FlowSubscribe({k: body[k] for k in ("flows", "events", "proto", "direction")
                                  if k in body}, rid)
        if "stream" in body:
            return StreamSubscribe({k: body[k] for k in ("stream", "port", "direction") if k in body},
                                   contain, rid)
        return Subscribe(body.get("match"), contain, rid)
    if op == "inject" and "stream" in body:
        has_index, has_name = "index" in body, "name" in body
        what = body.get("index") if has_index else body.get("name")
        if has_index == has_name or not (_is_int(what) if has_index else isinstance(what, str)):
            raise _no_stream_injection(what, rid)
        return StreamInject(body.get("stream"), _direction_of(body.get("direction")),
                            body.get("offset"), what, rid)
    if op == "inject":
        return Inject(body.get("index"), _direction_of(body.get("direction")), rid)
    if op == "cut":
        return StreamCut(body.get("stream"), _direction_of(body.get("direction")),
                         body.get("offset"), body.get("length"), rid)
    if op == "alert":
        return Alert(body.get("message"), body.get("fields") or {})
    if op == "synced":
        return Synced(body.get("id"))
    if op == "kill":
        return StreamKill(body.get("stream"))
    if op == "more":
        return StreamMore(body.get("stream"), _direction_of(body.get("direction")))
    if op == "reset":
        return Reset(body.get("src"), body.get("sport"), body.get("dst"), body.get("dport"),
                     body.get("seq"), body.get("ack"), body.get("mac"), rid)
    if op == "barrier":
        return Barrier(rid)
    if op == "ring":
        extra = sorted(set(body) - RingRequest.FIELDS)
        if extra:
            raise RequestError(f"ring: unknown fields {', '.join(map(repr, extra))}", rid)
        return RingRequest(body.get("version"), rid, body.get("streams", False))
    raise RequestError(f"unknown op {op!r}", rid)
