"""The server side of QMP as a sans-I/O state machine: bytes in, events out (like h11).

    conn = QMPServerConnection(version={"qemu": {...}, "package": "..."})
    sock.send(conn.data_to_send())                 # the greeting
    conn.receive_data(sock.recv(65536))            # b"" at EOF
    while (ev := conn.next_event()) is not NEED_DATA:
        if isinstance(ev, Execute):
            conn.send_return(ev, {...})            # or conn.send_error(ev, "GenericError", "...")
        elif isinstance(ev, ConnectionClosed):
            ...
    sock.send(conn.data_to_send())

What the protocol itself answers, as QEMU does (qemu/monitor/qmp.c, qapi/qmp-dispatch.c):
the greeting; ``qmp_capabilities`` (and ``CommandNotFound`` "Expecting capabilities
negotiation with 'qmp_capabilities'" for anything else before it, "Capabilities negotiation
is already complete" after it); input that is not JSON, not an object, or an object whose
members are wrong (``execute`` not a string, ``arguments`` not an object, unknown members),
each with a ``GenericError`` and the request's ``id`` when it had one.  Everything else
reaches the caller as an :class:`Execute` event.

Input is a stream of JSON objects, with or without whitespace between them (qemu.qmp sends
no newline; socat users do).  The splitter keeps at most ``max_message`` bytes of one
unfinished message and at most ``max_depth`` levels of nesting: a bigger message gets an
error and ends the connection (:class:`MessageTooLarge`, then ``must_close``); a deeper one
gets an error and is skipped.  Output is one JSON object per line, ``\\r\\n``-terminated,
serialized by ``qemu.qmp.message.Message``.
"""
from __future__ import annotations

import collections
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from qemu.qmp.message import DeserializationError, Message, UnexpectedTypeError

DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_DEPTH = 64
MAX_EVENTS = 256            # messages split ahead of the server taking them
MAX_INPUT_ERRORS = 32       # malformed messages in a row a connection may send before it is closed

NO_ID = object()      # a request without "id": its answer has none either


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass
class Execute:
    """A well-formed command after negotiation: answer it with send_return or send_error."""
    command: str
    arguments: dict = field(default_factory=dict)
    id: Any = NO_ID


@dataclass
class Negotiated:
    """``qmp_capabilities`` succeeded (already answered): events may flow from now on."""
    capabilities: list


@dataclass
class InputError:
    """Input the protocol answered with an error itself (for logging and counters)."""
    desc: str
    id: Any = NO_ID


@dataclass
class MessageTooLarge:
    """A message outgrew ``max_message``: the error is queued, the connection must close."""
    limit: int


@dataclass
class ConnectionClosed:
    """The peer closed its side (``receive_data(b"")``)."""


Event = Union[Execute, Negotiated, InputError, MessageTooLarge, ConnectionClosed]

_IN_STRING = re.compile(rb'["\\]')
_OUT_STRING = re.compile(rb'["{}\[\]]')
_TOKEN_END = re.compile(rb'[\s{}\[\]"]')
_WS = b" \t\r\n"


def encode(obj: dict) -> bytes:
    """One QMP message on the wire: compact JSON (via qemu.qmp's Message) and CRLF."""
    try:
        data = bytes(Message(obj))
    except (TypeError, ValueError):
        data = json.dumps(obj, default=str, separators=(",", ":")).encode()
    return data + b"\r\n"


def timestamp(now: Optional[float] = None) -> dict:
    now = time.time() if now is None else now
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}


class QMPServerConnection:
    """One client connection's QMP state (no sockets): see the module docstring."""

    def __init__(self, version: dict, capabilities: list = (), *,
                 max_message: int = DEFAULT_MAX_MESSAGE, max_depth: int = DEFAULT_MAX_DEPTH,
                 greet: bool = True):
        self.version = version
        self.capabilities = list(capabilities)
        self.max_message = max_message
        self.max_depth = max_depth
        self.negotiated = False
        self.must_close = False          # flush what is queued, then close
        self.closed = False              # the peer hung up
        self._in = bytearray()
        self._pos = 0                    # scan position inside _in (the message starts at 0)
        self._depth = 0
        self._in_string = False
        self._too_deep = False
        self._events: "collections.deque[Event]" = collections.deque()
        self._eof = False                # the peer hung up: ConnectionClosed once the input is used up
        self._backlog = False            # splitting stopped at MAX_EVENTS: input waits in _in
        self.input_errors = 0
        self._out = bytearray()
        if greet:
            self._queue({"QMP": {"version": version, "capabilities": self.capabilities}})

    # ---- output
    def _queue(self, obj: dict) -> None:
        self._out += encode(obj)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending_output(self) -> int:
        return len(self._out)

    @staticmethod
    def _with_id(obj: dict, rid: Any) -> dict:
        if rid is not NO_ID:
            obj["id"] = rid
        return obj

    def send_return(self, request: Union[Execute, Any], value: Any = None) -> None:
        rid = request.id if isinstance(request, Execute) else request
        self._queue(self._with_id({"return": {} if value is None else value}, rid))

    def send_error(self, request: Union[Execute, Any], error_class: str, desc: str) -> None:
        rid = request.id if isinstance(request, (Execute, InputError)) else request
        self._queue(self._with_id({"error": {"class": error_class, "desc": desc}}, rid))

    def send_event(self, name: str, data: Optional[dict] = None, when: Optional[float] = None) -> bool:
        """Queues an event; False (and nothing queued) before negotiation, as QEMU does."""
        if not self.negotiated or self.must_close:
            return False
        obj: dict = {"event": name}
        if data is not None:
            obj["data"] = data
        obj["timestamp"] = timestamp(when)
        self._queue(obj)
        return True

    # ---- input
    def receive_data(self, data: bytes) -> None:
        if self.must_close or self.closed:
            return
        if not data:
            self.closed = self._eof = True
            self._split()
            return
        self._in += data
        self._split()

    @property
    def has_work(self) -> bool:
        """Events to take, or input that waits to be split (more than MAX_EVENTS came at once)."""
        return bool(self._events) or self._backlog

    def next_event(self) -> Union[Event, _NeedData]:
        if not self._events and self._backlog and not self.must_close:
            self._split()                # what waited behind MAX_EVENTS
        if self._events:
            return self._events.popleft()
        if self._eof and not self._backlog:
            self._eof = False
            return ConnectionClosed()
        return NEED_DATA

    def _split(self) -> None:
        """Cuts complete top-level values out of the input buffer."""
        buf = self._in
        self._backlog = False
        while not self.must_close:
            if len(self._events) >= MAX_EVENTS:
                # a peer that sent many messages at once gets them handled a batch at a time
                self._backlog = True
                return
            if self._depth == 0 and not self._in_string:
                # between messages: skip whitespace, then a value must start
                i = self._pos
                n = len(buf)
                while i < n and buf[i] in _WS:
                    i += 1
                del buf[:i]
                self._pos = 0
                if not buf:
                    return
                c = buf[0]
                if c in b"{[":
                    self._depth = 1
                    self._too_deep = False
                    self._pos = 1
                elif c == ord('"'):
                    self._in_string = True
                    self._pos = 1
                elif c in b"}]":
                    del buf[:1]
                    self._input_error("JSON parse error, expecting value")
                    continue
                else:
                    m = _TOKEN_END.search(buf, 1)
                    if m is None:
                        if len(buf) > self.max_message:
                            self._too_large()
                        return                 # the token may go on
                    token = bytes(buf[:m.start()])
                    del buf[:m.start()]
                    self._scalar(token)
                    continue
            # inside a value: jump from one interesting byte to the next
            while True:
                if self._in_string:
                    m = _IN_STRING.search(buf, self._pos)
                    if m is None:
                        self._pos = len(buf)
                        break
                    if buf[m.start()] == ord("\\"):
                        if m.start() + 1 >= len(buf):
                            self._pos = m.start()      # the escaped byte has not arrived
                            break
                        self._pos = m.start() + 2
                        continue
                    self._in_string = False
                    self._pos = m.end()
                    if self._depth == 0:              # a top-level string
                        raw = bytes(buf[:self._pos])
                        del buf[:self._pos]
                        self._pos = 0
                        self._scalar(raw)
                        break
                    continue
                m = _OUT_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    break
                c = buf[m.start()]
                self._pos = m.end()
                if c == ord('"'):
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        self._too_deep = True
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        raw = bytes(buf[:self._pos])
                        del buf[:self._pos]
                        self._pos = 0
                        self._message(raw, self._too_deep)
                        break
            if self._depth == 0 and not self._in_string:
                continue
            if len(buf) > self.max_message:
                self._too_large()
            return

    def _too_large(self) -> None:
        self._in.clear()
        self._pos = 0
        self.send_error(NO_ID, "GenericError",
                        f"JSON message exceeds {self.max_message} bytes; closing the connection")
        self.must_close = True
        self._events.append(MessageTooLarge(self.max_message))

    def _input_error(self, desc: str, rid: Any = NO_ID) -> None:
        self.input_errors += 1
        if self.input_errors > MAX_INPUT_ERRORS:
            # each malformed byte would otherwise cost an error reply: no client sends this many
            self._in.clear()
            self._pos = self._depth = 0
            self._in_string = False
            desc = f"more than {MAX_INPUT_ERRORS} malformed messages; closing the connection"
            self.must_close = True
        self.send_error(rid, "GenericError", desc)
        self._events.append(InputError(desc, rid))

    def _scalar(self, raw: bytes) -> None:
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            self._input_error(f"JSON parse error, invalid token {raw[:40].decode('utf-8', 'replace')!r}")
            return
        self._input_error("QMP input must be a JSON object")

    def _message(self, raw: bytes, too_deep: bool) -> None:
        if too_deep:
            self._input_error(f"JSON parse error, nesting deeper than {self.max_depth} levels")
            return
        try:
            msg = Message(raw)
        except DeserializationError as exc:
            cause = exc.__cause__
            self._input_error(f"JSON parse error, {getattr(cause, 'msg', cause)}")
            return
        except UnexpectedTypeError:
            self._input_error("QMP input must be a JSON object")
            return
        except (ValueError, RecursionError) as exc:    # e.g. bytes that are not UTF-8
            self._input_error(f"JSON parse error, {exc.__class__.__name__}")
            return
        self._request(dict(msg))

    def _request(self, obj: dict) -> None:
        """Member checks as qapi/qmp-dispatch.c's qmp_dispatch_check_obj, then negotiation."""
        rid = obj.get("id", NO_ID)
        for key, value in obj.items():
            if key == "execute":
                if not isinstance(value, str):
                    return self._input_error("QMP input member 'execute' must be a string", rid)
            elif key == "arguments":
                if not isinstance(value, dict):
                    return self._input_error("QMP input member 'arguments' must be an object", rid)
            elif key == "id":
                continue
            elif key == "exec-oob":
                return self._input_error("QMP input member 'exec-oob' is unexpected: "
                                         "out-of-band execution was not enabled", rid)
            else:
                return self._input_error(f"QMP input member '{key}' is unexpected", rid)
        if "execute" not in obj:
            return self._input_error("QMP input lacks member 'execute'", rid)
        name = obj["execute"]
        args = obj.get("arguments", {})
        if name == "qmp_capabilities":
            if self.negotiated:
                self.send_error(rid, "CommandNotFound",
                                "Capabilities negotiation is already complete, command ignored")
                self._events.append(InputError("qmp_capabilities again", rid))
                return
            enable = args.get("enable", [])
            extra = set(args) - {"enable"}
            if extra:
                return self._input_error(f"Parameter '{sorted(extra)[0]}' is unexpected", rid)
            if not isinstance(enable, list):
                return self._input_error("Invalid parameter type for 'enable', expected: array", rid)
            for cap in enable:
                if cap not in self.capabilities:
                    return self._input_error(
                        f"Capability '{cap}' not available" if isinstance(cap, str)
                        else "Invalid parameter type for 'enable', expected: string", rid)
            self.negotiated = True
            self.send_return(rid, {})
            self._events.append(Negotiated(list(enable)))
            return
        if not self.negotiated:
            self.send_error(rid, "CommandNotFound",
                            "Expecting capabilities negotiation with 'qmp_capabilities'")
            self._events.append(InputError(f"{name} before negotiation", rid))
            return
        self.input_errors = 0            # only malformed messages in a row close a connection
        self._events.append(Execute(name, args, rid))
