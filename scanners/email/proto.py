"""SMTP and POP3 followed from their byte streams, sans-I/O: bytes in, whole messages out.

    t = SmtpTracker(max_message=10 << 20)
    for ev in t.feed(CLIENT, data):       # Message / Violation events
        ...
    t.passable(CLIENT)                    # bytes of that side below this offset may go on

SMTP (RFC 5321, 2920 pipelining, 3030 CHUNKING) is read from the client's bytes alone: a
message is the body of DATA (up to CRLF.CRLF, dot-unstuffed) or the chunks of BDAT ... LAST.
The server's replies do not matter: a server that refuses DATA treats the body as commands and
still delivers nothing, so scanning it as a message costs nothing.  Where servers disagree about
where a body ends (a "." line after a bare CR or LF: "SMTP smuggling"), the tracker reports a
Violation rather than guess.

POP3 (RFC 1939, 2449) is read from the server's replies, each matched to the client's command
in order: the multi-line +OK reply of RETR or TOP is a message (dot-unstuffed).  Server bytes
that arrive before the command they answer are not interpreted (nor passable) until it comes,
so a server cannot slip a message past the tracker by answering early.

Offsets are stream offsets of each side (from 0).  Every bound (line length, message size) is a
Violation, never an exception.
"""
from __future__ import annotations

import bisect
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["CLIENT", "SERVER", "Message", "Violation", "SmtpTracker", "Pop3Tracker", "DotBody",
           "WireMap"]

CLIENT, SERVER = "client", "server"
MAX_LINE = 4096


@dataclass
class WireMap:
    """Maps message offsets to stream offsets: ``anchors`` are (message offset, stream offset,
    bytes skipped on the wire just before it) in increasing order."""
    anchors: list

    def start(self, u: int) -> int:
        """The stream offset where a range beginning at message offset ``u`` begins (including a
        stuffing dot or command line just before it)."""
        m, w, gap = self._anchor(u)
        return w + (u - m) - (gap if u == m else 0)

    def end(self, u: int) -> int:
        """The stream offset where a range ending (exclusive) at message offset ``u`` ends."""
        m, w, gap = self._anchor(u)
        if u == m and gap:
            return w - gap
        return w + (u - m)

    def _anchor(self, u: int) -> tuple:
        """The last anchor at or before ``u`` (the first if none is), found by bisection: a
        message of many stuffed dots has an anchor each, and every infected part of it is mapped
        (a scan of the list per part made 1,000 parts over 2 M anchors take minutes)."""
        k = bisect.bisect_right(self.anchors, u, key=lambda a: a[0])
        return self.anchors[max(0, k - 1)]


@dataclass
class Message:
    protocol: str                 # "smtp" or "pop3"
    side: str                     # whose stream carries it (CLIENT for SMTP, SERVER for POP3)
    start: int                    # stream offset of its first byte (after DATA's line, +OK's line...)
    end: int                      # stream offset just past its terminator (".\r\n", last chunk)
    data: bytes                   # the message as the receiver stores it (unstuffed, chunks joined)
    wire: WireMap
    how: str                      # "data", "bdat", "retr", "top"
    envelope: dict = field(default_factory=dict)


@dataclass
class Violation:
    side: str
    reason: str                   # "smuggling", "oversize", "starttls", "bad_bdat", "line_too_long"
    detail: str
    offset: int


_DOT_LINE = re.compile(rb"(?=[\r\n]\.[\r\n])")


class DotBody:
    """A dot-stuffed body that ends with CRLF.CRLF, fed incrementally.  ``feed`` returns None
    while more is needed, else (message, wire map, stream offset past the terminator, unused
    bytes); raises _Bad on ambiguity or size."""

    def __init__(self, start: int, max_bytes: int):
        self.start = start               # stream offset of the body's first byte
        self.buf = bytearray(b"\r\n")    # the line break before the body opens its first line
        self.scan = 0
        self.max_bytes = max_bytes

    def feed(self, data: bytes):
        self.buf += data
        m = _DOT_LINE.search(self.buf, max(0, self.scan))
        while m is not None:
            i = m.start()                # buf[i] is \r or \n, buf[i+1] == "."
            if i + 3 > len(self.buf) or (self.buf[i + 2:i + 3] == b"\r" and i + 4 > len(self.buf)):
                break                    # cannot tell yet
            if i >= 1 and self.buf[i - 1:i + 4] == b"\r\n.\r\n":
                return self._finish(i - 1)
            raise _Bad("smuggling", "a '.' line not between CRLFs: servers disagree where the body ends")
        self.scan = max(0, len(self.buf) - 4)
        if len(self.buf) - 2 > self.max_bytes:
            raise _Bad("oversize", f"message larger than {self.max_bytes} bytes")
        return None

    def _finish(self, crlf: int):
        # buf[crlf:crlf+5] == CRLF . CRLF; the message is buf[2:crlf+2] (its last CRLF included)
        body = bytes(self.buf[2:crlf + 2]) if crlf >= 2 else b""
        rest = bytes(self.buf[crlf + 5:])
        out = bytearray()
        anchors = [(0, self.start, 0)]
        pos = 0
        for m in re.finditer(rb"(?:^|(?<=\r\n))\.", body):
            j = m.start()
            out += body[pos:j]
            pos = j + 1
            anchors.append((len(out), self.start + pos, 1))
        out += body[pos:]
        end = self.start + crlf + 3        # buf offsets are stream offsets + 2
        return bytes(out), WireMap(anchors), end, rest


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Tracker:
    protocol = ""
    msg_side = CLIENT

    def __init__(self, max_message: int = 10 << 20):
        self.max_message = max_message
        self.fed = {CLIENT: 0, SERVER: 0}
        self.hold_from: dict[str, Optional[int]] = {CLIENT: None, SERVER: None}
        self.dead: Optional[Violation] = None
        self.opaque = False               # after STARTTLS: nothing more can be read

    def passable(self, side: str) -> int:
        h = self.hold_from[side]
        return self.fed[side] if h is None else h

    def in_message(self) -> bool:
        return self.hold_from[self.msg_side] is not None

    def _violation(self, side: str, reason: str, detail: str) -> list:
        self.dead = Violation(side, reason, detail, self.fed[side])
        return [self.dead]


class SmtpTracker(_Tracker):
    protocol = "smtp"
    msg_side = CLIENT

    def __init__(self, max_message: int = 10 << 20):
        super().__init__(max_message)
        self.line = bytearray()
        self.line_start = 0
        self.long_line = False
        self.body: Optional[DotBody] = None
        self.bdat_left = 0                    # bytes of the current chunk still to come
        self.bdat_last = False
        self.bdat_data = bytearray()
        self.bdat_anchors: list = []
        self.bdat_start: Optional[int] = None
        self.envelope: dict = {"mail_from": None, "rcpt_to": []}
        self.messages = 0

    def feed(self, side: str, data: bytes) -> list:
        if side == SERVER or self.dead is not None or self.opaque:
            self.fed[side] += len(data)
            return []
        out: list = []
        try:
            self._feed_client(bytes(data), out)
        except _Bad as exc:
            self.hold_from[CLIENT] = self.hold_from[CLIENT] if self.hold_from[CLIENT] is not None \
                else self.fed[CLIENT]
            out += self._violation(CLIENT, exc.reason, exc.detail)
        return out

    def _feed_client(self, data: bytes, out: list) -> None:
        pos = 0          # what of data is read (never sliced off a line at a time: a 64 KiB piece of
        while pos < len(data):      # empty lines copied its rest per line, quadratic)
            if self.body is not None:
                r = self.body.feed(data[pos:] if pos else data)
                self.fed[CLIENT] += len(data) - pos
                data, pos = b"", 0
                if r is None:
                    return
                msg, wmap, end, rest = r
                self.fed[CLIENT] = end
                self.body = None
                self.hold_from[CLIENT] = None
                out.append(self._message(msg, wmap, wmap.anchors[0][1], end, "data"))
                data = rest
                self.line_start = end
                continue
            if self.bdat_left:
                take = data[pos:pos + self.bdat_left]
                self.bdat_anchors.append((len(self.bdat_data), self.fed[CLIENT], 0))
                self.bdat_data += take
                if len(self.bdat_data) > self.max_message:
                    raise _Bad("oversize", f"message larger than {self.max_message} bytes")
                self.fed[CLIENT] += len(take)
                self.bdat_left -= len(take)
                pos += len(take)
                if not self.bdat_left:
                    self.line_start = self.fed[CLIENT]
                    if self.bdat_last:
                        self._bdat_done(out)
                continue
            # command lines
            nl = data.find(b"\n", pos)
            stop = len(data) if nl < 0 else nl + 1
            chunk = data[pos:stop]
            pos = stop
            self.fed[CLIENT] += len(chunk)
            if not self.long_line:
                self.line += chunk
                if len(self.line) > MAX_LINE:
                    self.long_line = True          # skipped to its end: no command of ours
                    self.line = bytearray()
            if nl < 0:
                continue
            line, self.long_line = bytes(self.line), False
            self.line = bytearray()
            self._command(line, out)
            if self.opaque:
                self.fed[CLIENT] += len(data) - pos
                return

    def _command(self, line: bytes, out: list) -> None:
        words = line.strip().split()
        verb = words[0].upper() if words else b""
        if self.bdat_start is not None and verb != b"BDAT":
            # a transaction of chunks cut short (RSET, QUIT, anything): what was sent is scanned
            # as a message anyway, the server may have kept it
            self._bdat_done(out, complete=False)
        if verb == b"DATA" and len(words) == 1:
            self.body = DotBody(self.fed[CLIENT], self.max_message)
            self.hold_from[CLIENT] = self.fed[CLIENT]
        elif verb == b"BDAT":
            if not (2 <= len(words) <= 3 and words[1].isdigit() and len(words[1]) <= 12
                    and (len(words) == 2 or words[2].upper() == b"LAST")):
                raise _Bad("bad_bdat", f"malformed BDAT command {line[:80]!r}")
            size = int(words[1])
            if size + len(self.bdat_data) > self.max_message:
                raise _Bad("oversize", f"message larger than {self.max_message} bytes")
            if self.bdat_start is None:
                self.bdat_start = self.fed[CLIENT]
                self.hold_from[CLIENT] = self.fed[CLIENT]
            self.bdat_left = size
            self.bdat_last = len(words) == 3
            if size == 0 and self.bdat_last:
                self._bdat_done(out)
        elif verb in (b"STARTTLS",):
            self.opaque = True
            out.append(Violation(CLIENT, "starttls", "STARTTLS: the rest of the connection is opaque",
                                 self.fed[CLIENT]))
        elif verb == b"MAIL":
            self.envelope = {"mail_from": line.strip()[5:].decode("latin-1")[:300], "rcpt_to": []}
        elif verb == b"RCPT" and len(self.envelope["rcpt_to"]) < 100:
            self.envelope["rcpt_to"].append(line.strip()[5:].decode("latin-1")[:300])
        elif verb == b"RSET":
            self.envelope = {"mail_from": None, "rcpt_to": []}

    def _bdat_done(self, out: list, complete: bool = True) -> None:
        start = self.bdat_start if self.bdat_start is not None else self.fed[CLIENT]
        anchors = self.bdat_anchors or [(0, start, 0)]
        # chunks after the first are preceded by their BDAT line on the wire
        anchors = [(m, w, 0 if k == 0 else 1) for k, (m, w, _) in enumerate(anchors)]
        msg = self._message(bytes(self.bdat_data), WireMap(anchors), start, self.fed[CLIENT]
                            if complete else self.line_start, "bdat")
        if not complete:
            msg.envelope["incomplete"] = True
        out.append(msg)
        self.bdat_data, self.bdat_anchors, self.bdat_start = bytearray(), [], None
        self.bdat_left, self.bdat_last = 0, False
        self.hold_from[CLIENT] = None

    def _message(self, data: bytes, wmap: WireMap, start: int, end: int, how: str) -> Message:
        self.messages += 1
        return Message("smtp", CLIENT, start, end, data, wmap, how, dict(self.envelope))


_MULTI_MESSAGE = {b"RETR", b"TOP"}
_MULTI_OTHER = {b"CAPA"}
_MULTI_NOARG = {b"LIST", b"UIDL"}


class Pop3Tracker(_Tracker):
    protocol = "pop3"
    msg_side = SERVER

    def __init__(self, max_message: int = 10 << 20):
        super().__init__(max_message)
        self.pending: deque = deque([b"greeting"])     # what each coming server reply answers
        self.cline = bytearray()
        self.sbuf = bytearray()            # server bytes not yet interpreted
        self.sbuf_at = 0                   # their stream offset
        self.body: Optional[DotBody] = None
        self.body_kind = b""
        self.messages = 0

    def feed(self, side: str, data: bytes) -> list:
        if self.dead is not None or self.opaque:
            self.fed[side] += len(data)
            return []
        out: list = []
        try:
            if side == CLIENT:
                self._feed_client(bytes(data), out)
            else:
                self.sbuf += data
                self.fed[SERVER] += len(data)
            self._interpret(out)
        except _Bad as exc:
            if self.hold_from[SERVER] is None:
                self.hold_from[SERVER] = self.sbuf_at
            out += self._violation(SERVER, exc.reason, exc.detail)
        return out

    def passable(self, side: str) -> int:
        if side == CLIENT:
            return self.fed[CLIENT]
        return self.sbuf_at if self.hold_from[SERVER] is None else self.hold_from[SERVER]

    def _feed_client(self, data: bytes, out: list) -> None:
        self.fed[CLIENT] += len(data)
        self.cline += data
        while True:
            nl = self.cline.find(b"\n")
            if nl < 0:
                if len(self.cline) > MAX_LINE:
                    raise _Bad("line_too_long", "client line too long")
                return
            line = bytes(self.cline[:nl + 1])
            del self.cline[:nl + 1]
            words = line.strip().split()
            verb = words[0].upper() if words else b""
            if verb in _MULTI_NOARG and len(words) == 1:
                verb = b"LIST"
            elif verb in _MULTI_NOARG:
                verb = b"single"
            if len(self.pending) > 10000:
                raise _Bad("line_too_long", "too many commands pending")
            self.pending.append(verb)
            if verb == b"STLS":
                pass     # handled when its +OK arrives

    def _interpret(self, out: list) -> None:
        while self.sbuf:
            if self.body is not None:
                r = self.body.feed(bytes(self.sbuf))
                self.sbuf_at += len(self.sbuf)
                self.sbuf = bytearray()
                if r is None:
                    return
                msg, wmap, end, rest = r
                self.body = None
                self.hold_from[SERVER] = None
                self.sbuf = bytearray(rest)
                self.sbuf_at = end
                if self.body_kind in _MULTI_MESSAGE:
                    self.messages += 1
                    out.append(Message("pop3", SERVER, wmap.anchors[0][1], end, msg, wmap,
                                       self.body_kind.decode().lower()))
                continue
            if not self.pending:
                return           # a reply nobody asked for yet: wait for its command
            nl = self.sbuf.find(b"\n")
            if nl < 0:
                if len(self.sbuf) > MAX_LINE:
                    raise _Bad("line_too_long", "server status line too long")
                return
            line = bytes(self.sbuf[:nl + 1])
            del self.sbuf[:nl + 1]
            self.sbuf_at += nl + 1
            cmd = self.pending.popleft()
            ok = line.startswith(b"+OK")
            if ok and cmd == b"STLS":
                self.opaque = True
                out.append(Violation(SERVER, "starttls", "STLS: the rest of the connection is opaque",
                                     self.sbuf_at))
                self.sbuf_at += len(self.sbuf)
                self.sbuf = bytearray()
                return
            if ok and (cmd in _MULTI_MESSAGE or cmd in _MULTI_OTHER or cmd == b"LIST"):
                self.body = DotBody(self.sbuf_at, self.max_message)
                self.body_kind = cmd
                if cmd in _MULTI_MESSAGE:
                    self.hold_from[SERVER] = self.sbuf_at
