"""The scanner wire protocol, sans-I/O: bytes in, messages out.

Scanner and NI kernel talk over one SOCK_SEQPACKET socket, one message per packet, so the
kernel never has to frame a stream a hostile scanner writes.  The first byte says what a
message is:

``F`` frame, kernel -> scanner (binary, the hot path)::

    'F' | direction u8 | flags u8 | pad u8 | number u64 | time_ns u64 | length u32 | frame bytes

  ``direction`` is 1 (from the guest) or 2 (to the guest), ``flags`` bit 0 says the frame is
  held and a decision is owed, ``number`` counts the frames this scanner has been given
  (1, 2, 3, ...), ``time_ns`` is when the NI took the frame (Unix time, ns).

``D`` decision, scanner -> kernel (binary)::

    'D' | verdict u8 (0 pass, 1 cut) | pad 6 | number u64

``J`` control, both ways: ``'J'`` followed by one UTF-8 JSON object.

  scanner -> kernel: ``{"op": "subscribe", "id": N, "match": {...}, "contain": bool}``,
  ``{"op": "inject", "id": N, "index": I, "direction": "to_guest"|"from_guest"}``,
  ``{"op": "alert", "message": str, "fields": {...}}``, ``{"op": "synced", "id": N}``.

  kernel -> scanner: ``{"op": "hello", "version": 1, "scanner": name, "ni": name,
  "config": {...}, "injections": [names]}`` first, then ``{"op": "reply", "id": N,
  "ok": bool, "error": str}`` for each subscribe and inject, and ``{"op": "sync", "id": N}``
  when the kernel wants to know that the scanner has handled everything sent before it
  (offline replay does, to stay deterministic): the SDK answers ``synced`` with the same id
  when its frame loop asks for the next frame.

  A control message is at most MAX_JSON bytes of JSON whose lists and objects nest at
  most MAX_DEPTH levels.

This module is shared by the SDK and the kernel and imports nothing from either.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Union

VERSION = 1
FROM_GUEST = 1
TO_GUEST = 2
DIRECTIONS = {"from_guest": FROM_GUEST, "to_guest": TO_GUEST}
DIRECTION_NAMES = {v: k for k, v in DIRECTIONS.items()}
PASS = 0
CUT = 1
FLAG_HELD = 1

FRAME = struct.Struct("<cBBxQQI")
DECISION = struct.Struct("<cB6xQ")
MAX_FRAME = 65550
MAX_JSON = 65536
# how deeply a control message's lists and objects may nest: whoever handles one (and
# re-encodes its fields, as alerts are) must never run out of stack
MAX_DEPTH = 32
# the largest message either side may send; receivers read with this buffer size
MAX_MESSAGE = FRAME.size + MAX_FRAME


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
class Control:
    body: dict


Message = Union[Frame, Decision, Control]


def encode_frame(number: int, direction: int, held: bool, time_ns: int, data: bytes) -> bytes:
    return FRAME.pack(b"F", direction, FLAG_HELD if held else 0, number, time_ns, len(data)) + data


def encode_decision(number: int, verdict: int) -> bytes:
    return DECISION.pack(b"D", verdict, number)


def encode_control(body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise WireError(f"control message of {len(data)} bytes exceeds {MAX_JSON}")
    return b"J" + data


def _depth(obj) -> int:
    """How deeply lists and objects nest in a decoded JSON value (iteratively)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


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
    if kind == b"J":
        if len(msg) - 1 > MAX_JSON:
            raise WireError("control message too large")
        try:
            body = json.loads(msg[1:].decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise WireError(f"bad JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("op"), str):
            raise WireError("control message must be a JSON object with an 'op' string")
        if _depth(body) > MAX_DEPTH:
            raise WireError(f"control message nested deeper than {MAX_DEPTH}")
        return Control(body)
    raise WireError(f"unknown message type {kind!r}")
