"""HTTP/1.x for scanners, sans-I/O: the bytes of both directions of a connection in, events out.

    conn = HttpConnection()                       # Limits() bound every line, head, count
    for ev in conn.feed(CLIENT, data):            # CLIENT: bytes the client sent; SERVER: the server's
        ...                                       # Request, Response, Body, Chunk, ChunkExtension, Trailers,
    conn.eof(SERVER)                              # MessageEnd, Tunnel, Ambiguity

    body, amb = decode_content(raw, content_codings(resp.headers))   # Content-Encoding, bounded

Written for a passive observer that must read a connection *as its endpoints will*, not for an
endpoint that may pick one reading: requests and responses with keep-alive and pipelining, HTTP/1.0
and 1.1, Content-Length, chunked (extensions, trailers) and close-delimited bodies, bodiless
responses (HEAD, 1xx, 204, 304), CONNECT and 101 tunnels.  Offsets are stream offsets of the
direction the event belongs to (0: the first byte fed on that side), so a scanner can hold and pass
exactly one message.

Every place where a browser and a server (or two browsers, or a browser and an IDS) may read the
bytes differently is reported as an :class:`Ambiguity` with a ``kind`` from :data:`AMBIGUITIES`,
never resolved silently: a Content-Length next to a Transfer-Encoding, duplicate or odd
Content-Lengths, a Transfer-Encoding not ending in chunked, obs-fold, bare CR or LF line ends, NUL
or control bytes in a head, odd chunk-size lines, status lines without a version, unknown versions,
bytes the server sends nobody asked for, heads and lines beyond the :class:`Limits`.  Where a
reading can still be chosen the codec goes on with the one RFC 9112 (and browsers, where they
agree) take, so a caller that tolerates a kind still gets events; where it cannot (``fatal``), the
side stops: no more events from it.  The same holds for Content-Encoding (:func:`decode_content`):
gzip, x-gzip, deflate (zlib or raw, as browsers accept), br and zstd (where their libraries are
installed: :data:`MISSING_DECODERS` says which are not), stacked, with a bound on layers, on the
decoded size (a bomb is reported, never followed, never materialised beyond the bound) and on the
zstd window.

The module imports nothing of vhostni's kernel: scanners (the web-download scanner, a layer-7 field
length scanner) use it from inside their sandbox.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

__all__ = ["CLIENT", "SERVER", "Limits", "HttpConnection", "Request", "Response", "Body",
           "Chunk", "ChunkExtension", "Trailers", "MessageEnd", "Tunnel", "Ambiguity", "AMBIGUITIES",
           "Decoded", "decode_content", "content_codings", "header", "headers_all", "MISSING_DECODERS"]

CLIENT, SERVER = "client", "server"

#: kind -> what it means.  Every Ambiguity's kind is one of these.
AMBIGUITIES = {
    "bare_lf": "a line ends in LF without CR",
    "bare_cr": "a CR not followed by LF inside a head or chunk line",
    "obs_fold": "a header line continued on the next line (obs-fold)",
    "nul_in_head": "a NUL byte in a start line, header or trailer",
    "ctl_in_head": "a control byte other than HT in a start line, header or trailer",
    "bad_field_name": "a header name that is empty or not a token (8-bit, spaces, ...)",
    "space_before_colon": "whitespace between a header name and its colon",
    "no_colon": "a header line without a colon",
    "leading_blank_line": "empty lines before a start line",
    "no_status_line": "a response without an HTTP/ status line (HTTP/0.9 style)",
    "bad_status_line": "a status line that is not HTTP-version SP 3DIGIT [SP reason]",
    "bad_request_line": "a request line that is not method SP target SP HTTP-version",
    "bad_version": "an HTTP version other than HTTP/1.0 or HTTP/1.1",
    "odd_status": "a status code outside 100-599",
    "te_and_cl": "both Transfer-Encoding and Content-Length",
    "te_not_chunked": "a Transfer-Encoding other than exactly chunked",
    "te_in_http10": "a Transfer-Encoding in an HTTP/1.0 message",
    "connect_with_content": "a CONNECT with a Content-Length or Transfer-Encoding (it has no content: "
                            "a server that refuses it may read one)",
    "duplicate_content_length": "more than one Content-Length value (all equal)",
    "conflicting_content_length": "Content-Length values that differ",
    "bad_content_length": "a Content-Length that is not 1*DIGIT",
    "chunk_size_syntax": "a chunk-size line that is not HEXDIG+ [chunk-ext]",
    "chunk_size_overflow": "a chunk size beyond the limit",
    "chunk_data_terminator": "chunk data not followed by CRLF",
    "framing_in_trailer": "a trailer field that changes framing or decoding",
    "truncated": "the connection ended inside a message",
    "unsolicited_response": "server bytes with no request to answer",
    "head_too_long": "a head beyond Limits.max_head or a line beyond Limits.max_line",
    "too_many_headers": "more header fields than Limits.max_headers",
    "too_many_pipelined": "more requests waiting for their responses than Limits.max_pipelined",
    "unknown_content_encoding": "a Content-Encoding this decoder (and some browsers) do not know",
    "unsupported_content_encoding": "a Content-Encoding browsers decode but this decoder cannot (compress; "
                                    "br or zstd where their library is missing)",
    "odd_content_encoding": "an empty element in a Content-Encoding list",
    "too_many_encodings": "more Content-Encoding layers than allowed",
    "compressed_corrupt": "compressed data that does not decode",
    "compressed_truncated": "compressed data that stops before its end",
    "compressed_trailing_data": "bytes after the end of compressed data",
    "gzip_header": "a gzip header with reserved flags, a bad header CRC or another method",
    "gzip_trailer": "a gzip trailer missing, or its CRC-32 or length wrong",
    "zlib_checksum": "a zlib stream whose Adler-32 is missing or wrong",
    "decompression_bomb": "decoded content beyond the size limit",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_CHUNK_EXT = re.compile(rb'(?:[ \t]*;[ \t]*[!#$%&\'*+\-.^_`|~0-9A-Za-z]+'
                        rb'(?:[ \t]*=[ \t]*(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]'
                        rb'|\\[\t \x21-\x7e\x80-\xff])*"))?)*')
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one side may send before the codec gives up on it (fatal head_too_long)."""
    max_line: int = 8192              # a start line, header line or chunk-size line
    max_head: int = 65536             # a whole head (start line and fields), or a trailer section
    max_headers: int = 256            # fields in a head or trailer section
    max_chunk_size: int = 1 << 40     # a single chunk's announced size
    max_pipelined: int = 256          # requests waiting for their responses


Headers = list  # [(name lower-cased bytes, value bytes)] in order, as sent (names lowered)


def header(headers: Headers, name: bytes) -> Optional[bytes]:
    """The last value of field ``name`` (lower case), or None."""
    for n, v in reversed(headers):
        if n == name:
            return v
    return None


def headers_all(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


@dataclass
class Request:
    method: bytes
    target: bytes
    version: Optional[bytes]           # b"HTTP/1.1", or None for an HTTP/0.9 request line
    headers: Headers
    start: int                         # offset of the request line
    head_end: int                      # offset of the first body byte
    lines: list = field(default_factory=list)   # [(raw line length)], for field-length checks

    @property
    def url(self) -> str:
        t = self.target.decode("latin-1")
        if t.startswith(("http://", "https://")) or self.method == b"CONNECT":
            return t
        host = (header(self.headers, b"host") or b"").decode("latin-1")
        return f"http://{host}{t}"


@dataclass
class Response:
    status: int
    reason: bytes
    version: Optional[bytes]            # None: no status line at all (HTTP/0.9 style)
    headers: Headers
    start: int
    head_end: int
    request: Optional[Request]
    framing: str = "none"               # none, length, chunked, close, tunnel
    length: int = 0                     # with framing "length"

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101


@dataclass
class Body:
    """Bytes of a message body with the transfer coding removed; ``offset`` is where the piece
    starts on the wire (for chunked bodies: where its chunk's data starts)."""
    side: str
    data: bytes
    offset: int


@dataclass
class Chunk:
    """A chunk-size line was read: the chunk of ``size`` bytes (0: the last) starts at ``end``;
    the line itself is [offset, end).  Layer-7 checks bound chunk sizes with it (CVE-2002-0392)."""
    side: str
    size: int
    offset: int
    end: int


@dataclass
class ChunkExtension:
    side: str
    ext: bytes
    offset: int


@dataclass
class Trailers:
    side: str
    headers: Headers
    offset: int


@dataclass
class MessageEnd:
    side: str
    message: Union[Request, Response]
    end: int                             # offset just after the message's last byte


@dataclass
class Tunnel:
    """From ``offset`` on, this side's bytes are not HTTP (CONNECT, 101 Switching Protocols)."""
    side: str
    offset: int
    why: str


@dataclass
class Ambiguity:
    side: str
    kind: str
    detail: str
    offset: int
    fatal: bool = False                  # the side stopped: no more events from it
    request: Optional[Request] = field(default=None, repr=False, compare=False)  # (server side) answered

    def fields(self) -> dict:
        return {"side": self.side, "kind": self.kind, "detail": self.detail, "offset": self.offset,
                "fatal": self.fatal}


Event = Union[Request, Response, Body, Chunk, ChunkExtension, Trailers, MessageEnd, Tunnel, Ambiguity]


def _show(b: bytes, n: int = 60) -> str:
    return repr(bytes(b[:n]))[2:-1] + ("..." if len(b) > n else "")


class _Stop(Exception):
    """A fatal ambiguity: the side stops."""


class _Side:
    """One direction's parser.  ``pending`` (server side only) gives the request the next
    response answers, or None to wait for one."""

    def __init__(self, side: str, limits: Limits, pending: Optional[Callable] = None):
        self.side = side
        self.lim = limits
        self.pending = pending
        self.buf = bytearray()
        self.base = 0               # stream offset of buf[0]
        self.state = "head"
        self.msg: Optional[Union[Request, Response]] = None
        self.left = 0               # body bytes left (length) or chunk bytes left
        self.scanned = 0            # bytes of buf searched for a line's or head's end in vain
        self.dead = False
        self.out: list = []

    # ---- helpers
    def amb(self, kind: str, detail: str, at: int, fatal: bool = False) -> None:
        self.out.append(Ambiguity(self.side, kind, detail, at, fatal, self.pending() if self.pending else None))
        if fatal:
            self.dead = True
            raise _Stop()

    def take(self, n: int) -> bytes:
        piece = bytes(self.buf[:n])
        del self.buf[:n]
        self.base += n
        self.scanned = 0
        return piece

    def line(self, limit: int) -> Optional[tuple[bytes, int]]:
        """The next line without its end (CRLF, or bare LF: ambiguity), and its raw length."""
        i = self.buf.find(b"\n", self.scanned, limit + 2)
        if i < 0:
            if len(self.buf) > limit + 1:
                self.amb("head_too_long", f"a line longer than {limit} bytes", self.base, True)
            self.scanned = len(self.buf)      # a byte at a time must not cost a rescan each
            return None
        raw = bytes(self.buf[:i])
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        else:
            self.amb("bare_lf", "a line ends in LF without CR", self.base + i)
        if b"\r" in raw:
            self.amb("bare_cr", f"a CR inside the line {_show(raw)!r}", self.base + raw.index(b"\r"))
        return raw, i + 1

    # ---- feeding
    def feed(self, data: bytes) -> list:
        if self.dead:
            return []
        self.buf += data
        return self.run()

    def run(self) -> list:
        self.out = []
        try:
            while not self.dead and self.step():
                pass
        except _Stop:
            pass
        return self.out

    def eof(self) -> list:
        self.out = []
        if self.dead:
            return []
        try:
            if self.state == "close":
                if self.buf:
                    at = self.base
                    self.out.append(Body(self.side, self.take(len(self.buf)), at))
                self.out.append(MessageEnd(self.side, self.msg, self.base))
                self.state = "head"
            elif self.state == "tunnel":
                pass
            elif self.state == "connect":
                if self.buf:
                    self.amb("truncated", f"the connection ended before its CONNECT was answered, "
                             f"{len(self.buf)} bytes after it", self.base, True)
            elif self.state == "head":
                if self.buf:
                    what = "a head" if self.side == CLIENT or self.pending() is not None \
                        else "bytes nobody asked for"
                    self.amb("truncated", f"the connection ended inside {what}: {_show(self.buf)!r}",
                             self.base, True)
            else:
                self.amb("truncated", f"the connection ended inside a body ({self.state}, "
                         f"{self.left} bytes left)", self.base + len(self.buf), True)
        except _Stop:
            pass
        self.dead = True
        return self.out

    def step(self) -> bool:
        st = self.state
        if st == "head":
            return self.head()
        if st == "length":
            if not self.buf and self.left:
                return False
            n = min(self.left, len(self.buf))
            if n:
                at = self.base
                self.out.append(Body(self.side, self.take(n), at))
                self.left -= n
            if self.left == 0:
                self.end()
                return True
            return False
        if st == "close" or st == "tunnel":
            if self.buf and st == "close":
                at = self.base
                self.out.append(Body(self.side, self.take(len(self.buf)), at))
            elif st == "tunnel":
                self.take(len(self.buf))
            return False
        if st == "connect":
            # the bytes after a CONNECT are the tunnel's if the server agrees (2xx), requests if it
            # refuses (and keeps the connection): kept, unread, until it answered
            if len(self.buf) > self.lim.max_head:
                self.amb("head_too_long", f"{len(self.buf)} bytes after a CONNECT wait for its answer",
                         self.base, True)
            return False
        if st == "chunk_size":
            return self.chunk_size()
        if st == "chunk_data":
            n = min(self.left, len(self.buf))
            if n:
                at = self.base
                self.out.append(Body(self.side, self.take(n), at))
                self.left -= n
            if self.left:
                return False
            self.state = "chunk_crlf"
            return True
        if st == "chunk_crlf":
            if len(self.buf) < 2:
                if self.buf[:1] == b"\n":
                    self.amb("bare_lf", "chunk data ends in LF without CR", self.base)
                    self.take(1)
                    self.state = "chunk_size"
                    return True
                if self.buf and self.buf[:1] != b"\r":
                    self.amb("chunk_data_terminator", f"chunk data followed by {_show(self.buf)!r}",
                             self.base, True)
                return False
            if self.buf[:2] == b"\r\n":
                self.take(2)
            elif self.buf[:1] == b"\n":
                self.amb("bare_lf", "chunk data ends in LF without CR", self.base)
                self.take(1)
            else:
                self.amb("chunk_data_terminator", f"chunk data followed by {_show(self.buf[:8])!r}",
                         self.base, True)
            self.state = "chunk_size"
            return True
        if st == "trailers":
            return self.trailers()
        return False

    # ---- heads
    def split_head(self) -> Optional[tuple[list, int]]:
        """The head's lines (CR-stripped) and its raw length, once its empty line arrived."""
        if self.buf[:1] != b"\n" and self.buf[:2] != b"\r\n":
            # not complete yet unless an empty line arrived since the last look (so that a head
            # sent a byte at a time costs a linear scan, not a quadratic one)
            at = max(0, self.scanned - 2)
            # and only within max_head: bytes past it (pipelined messages behind this one) are
            # not searched once per head, which made many small heads in one feed quadratic
            end, pos, complete = self.lim.max_head + 3, at, False
            while (i := self.buf.find(b"\n", pos, end)) >= 0:     # line by line: each byte once
                if self.buf[i + 1:i + 2] == b"\n" or self.buf[i + 1:i + 3] == b"\r\n":
                    complete = True
                    break
                pos = i + 1
            if not complete:
                nl = self.buf.rfind(b"\n")
                if len(self.buf) - (nl + 1) > self.lim.max_line + 1:
                    self.amb("head_too_long", f"a head line longer than {self.lim.max_line} bytes",
                             self.base + nl + 1, True)
                if len(self.buf) > self.lim.max_head:
                    self.amb("head_too_long", f"a head longer than {self.lim.max_head} bytes", self.base, True)
                self.scanned = len(self.buf)
                return None
        lines: list = []
        pos = 0
        while True:
            i = self.buf.find(b"\n", pos, pos + self.lim.max_line + 2)
            if i < 0:
                if len(self.buf) - pos > self.lim.max_line + 1:
                    self.amb("head_too_long", f"a head line longer than {self.lim.max_line} bytes",
                             self.base + pos, True)
                if len(self.buf) > self.lim.max_head:
                    self.amb("head_too_long", f"a head longer than {self.lim.max_head} bytes",
                             self.base, True)
                return None
            raw = bytes(self.buf[pos:i])
            crlf = raw.endswith(b"\r")
            lines.append((raw[:-1] if crlf else raw, self.base + pos, crlf, i + 1 - pos))
            pos = i + 1
            if pos > self.lim.max_head:
                self.amb("head_too_long", f"a head longer than {self.lim.max_head} bytes", self.base, True)
            if not lines[-1][0]:
                return lines, pos
            if len(lines) > self.lim.max_headers + 1:
                self.amb("too_many_headers", f"more than {self.lim.max_headers} header fields",
                         self.base, True)

    def head(self) -> bool:
        if not self.buf:
            return False
        # empty lines before a start line: RFC 9112 2.2 lets a server skip them
        while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":
            if self.side == SERVER and self.pending() is None:
                break
            n = 2 if self.buf[:1] == b"\r" else 1
            self.amb("leading_blank_line", "an empty line before a start line", self.base)
            self.take(n)
        if not self.buf or self.buf == b"\r":
            return False            # (a lone CR may yet be an empty line: wait for what follows)
        if self.side == SERVER:
            req = self.pending()
            if req is None:
                return False        # HttpConnection decides whether that is unsolicited
            if not self.looks_like_status(req):
                return False
            if self.state != "head":
                return True
        got = self.split_head()
        if got is None:
            return False
        lines, size = got
        start = self.base
        headers = self.fields(lines[1:-1], start)
        first, at, crlf, _ = lines[0]
        if not lines[-1][2]:
            self.amb("bare_lf", "a head ends in LF without CR", lines[-1][1])
        if not crlf:
            self.amb("bare_lf", "a start line ends in LF without CR", at + len(first))
        if b"\r" in first:
            self.amb("bare_cr", f"a CR inside the start line {_show(first)!r}", at + first.index(b"\r"))
        self.check_bytes(first, at, "start line")
        self.take(size)
        if self.side == CLIENT:
            self.request(first, headers, start, lines)
        else:
            self.response(first, headers, start)
        return True

    def looks_like_status(self, req: Request) -> bool:
        """Whether the server's bytes start with a status line (True; an odd one is reported
        by head()), may still turn out to (False: wait), or do not: then the response is read
        as browsers read HTTP/0.9, the rest of the connection being its body."""
        probe = bytes(self.buf[:64]).lstrip(b" \t")
        if len(probe) < 5 and b"HTTP/".startswith(probe.upper()) and len(self.buf) < 64:
            return False
        if probe[:5].upper() == b"HTTP/":
            return True
        self.amb("no_status_line", f"the response starts {_show(self.buf[:20])!r}, not HTTP/", self.base)
        resp = Response(0, b"", None, [], self.base, self.base, req, "close")
        self.msg = resp
        self.out.append(resp)
        self.state = "close"
        return True

    def check_bytes(self, b: bytes, at: int, what: str) -> None:
        if b"\0" in b:
            self.amb("nul_in_head", f"a NUL in a {what}: {_show(b)!r}", at + b.index(b"\0"))
        m = _CTL.search(b.replace(b"\0", b" ").replace(b"\r", b" "))
        if m:
            self.amb("ctl_in_head", f"control byte 0x{m.group()[0]:02x} in a {what}: {_show(b)!r}",
                     at + m.start())

    def fields(self, lines: list, start: int) -> Headers:
        headers: Headers = []
        for raw, at, crlf, _ in lines:
            if not crlf:
                self.amb("bare_lf", "a header line ends in LF without CR", at + len(raw))
            if b"\r" in raw:
                self.amb("bare_cr", f"a CR inside the header line {_show(raw)!r}", at + raw.index(b"\r"))
            self.check_bytes(raw, at, "header field")
            if raw[:1] in (b" ", b"\t"):
                self.amb("obs_fold", f"a folded header line {_show(raw)!r}", at)
                if headers:
                    n, v = headers[-1]
                    headers[-1] = (n, (v + b" " + raw.strip(b" \t")).strip(b" \t"))
                continue
            name, colon, value = raw.partition(b":")
            if not colon:
                self.amb("no_colon", f"a header line without a colon: {_show(raw)!r}", at)
                continue
            if name != name.rstrip(b" \t"):
                self.amb("space_before_colon", f"whitespace before the colon in {_show(raw)!r}", at)
                name = name.rstrip(b" \t")
            if not _TOKEN.fullmatch(name):
                self.amb("bad_field_name", f"the header name {_show(name)!r} is not a token", at)
            headers.append((name.lower(), value.strip(b" \t")))
        return headers

    def request(self, first: bytes, headers: Headers, start: int, lines: list) -> None:
        parts = first.split(b" ")
        version = None
        if len(parts) == 3 and _VERSION.fullmatch(parts[2]) and _TOKEN.fullmatch(parts[0]) and parts[1]:
            method, target, version = parts
            if version not in (b"HTTP/1.0", b"HTTP/1.1"):
                self.amb("bad_version", f"request version {_show(version)!r}", start)
        else:
            self.amb("bad_request_line", f"request line {_show(first)!r}", start)
            words = first.split()
            method = words[0] if words else b""
            target = words[1] if len(words) > 1 else b""
            if len(words) > 2:
                version = words[2]
        req = Request(method, target, version, headers, start, self.base,
                      [len(raw) for raw, _, _, _ in lines[:-1]])
        self.msg = req
        self.out.append(req)
        if method == b"CONNECT":         # no body; what follows is the tunnel's if the server agrees:
            te = headers_all(req.headers, b"transfer-encoding")
            cl = headers_all(req.headers, b"content-length")
            if te or any(x.strip(b" \t").strip(b"0") for v in cl for x in v.split(b",")):
                self.amb("connect_with_content", f"a CONNECT with {'Transfer-Encoding' if te else 'Content-Length'}",
                         start, True)
            self.out.append(MessageEnd(self.side, req, self.base))     # HttpConnection decides on its answer
            self.state = "connect"
            return
        self.framing_request(req)

    def framing_request(self, req: Request) -> None:
        te = headers_all(req.headers, b"transfer-encoding")
        cl = headers_all(req.headers, b"content-length")
        if te:
            codings = _list(te)
            if cl:
                self.amb("te_and_cl", "a request with Transfer-Encoding and Content-Length", req.start)
            if req.version == b"HTTP/1.0":
                self.amb("te_in_http10", "an HTTP/1.0 request with Transfer-Encoding", req.start)
            if codings != [b"chunked"]:
                self.amb("te_not_chunked", f"request Transfer-Encoding {_show(b', '.join(te))!r}",
                         req.start, fatal=not codings or codings[-1] != b"chunked")
            self.state = "chunk_size"
            return
        if cl:
            n = self.content_length(cl, req.start)
            if n:
                self.state, self.left = "length", n
                return
        self.end()

    def content_length(self, values: list, at: int) -> int:
        nums = []
        for v in values:
            for item in v.split(b","):
                item = item.strip(b" \t")
                if not item.isdigit() or len(item) > 18 or not item.isascii():
                    self.amb("bad_content_length", f"Content-Length {_show(v)!r}", at, True)
                nums.append(int(item))
        if len(set(nums)) > 1:
            self.amb("conflicting_content_length", f"Content-Length values {sorted(set(nums))}", at, True)
        if len(nums) > 1:
            self.amb("duplicate_content_length", f"{len(nums)} Content-Length values of {nums[0]}", at)
        return nums[0]

    def response(self, first: bytes, headers: Headers, start: int) -> None:
        req = self.pending()
        m = re.fullmatch(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: (.*))?", first, re.S)
        if m is None:
            self.amb("bad_status_line", f"status line {_show(first)!r}", start)
            m2 = re.match(rb"[ \t]*(\S+)[ \t]+([0-9]+)(?:[ \t]+(.*))?", first, re.S)
            if m2 is None:
                self.amb("bad_status_line", "no status code", start, True)
            version, code, reason = m2.group(1), m2.group(2)[:4], m2.group(3) or b""
        else:
            version, code, reason = m.group(1), m.group(2), m.group(3) or b""
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            self.amb("bad_version", f"response version {_show(version)!r}", start)
        status = int(code)
        if not 100 <= status <= 599:
            self.amb("odd_status", f"status {status}", start)
        resp = Response(status, reason, version, headers, start, self.base, req)
        self.msg = resp
        self.framing_response(resp, req)
        self.out.append(resp)
        if resp.framing == "none":
            self.end()
        elif resp.framing == "tunnel":
            self.out.append(Tunnel(self.side, self.base, f"{req.method.decode('latin-1')} {status}"))
            self.state = "tunnel"

    def framing_response(self, resp: Response, req: Request) -> None:
        s = resp.status
        if req.method == b"CONNECT" and 200 <= s < 300 or s == 101:
            resp.framing = "tunnel"
            return
        if req.method == b"HEAD" or 100 <= s < 200 or s in (204, 304):
            resp.framing = "none"
            return
        te = headers_all(resp.headers, b"transfer-encoding")
        cl = headers_all(resp.headers, b"content-length")
        if te:
            codings = _list(te)
            if cl:
                self.amb("te_and_cl", "a response with Transfer-Encoding and Content-Length", resp.start)
            if resp.version == b"HTTP/1.0":
                self.amb("te_in_http10", "an HTTP/1.0 response with Transfer-Encoding", resp.start)
            elif req.version != b"HTTP/1.1":
                self.amb("te_in_http10", "Transfer-Encoding in a response to an HTTP/1.0 request", resp.start)
            if codings != [b"chunked"]:
                self.amb("te_not_chunked", f"response Transfer-Encoding {_show(b', '.join(te))!r}", resp.start)
            if codings and codings[-1] == b"chunked":
                resp.framing = "chunked"
                self.state = "chunk_size"
            else:
                resp.framing = "close"           # RFC 9112 6.3: read until the connection closes
                self.state = "close"
            return
        if cl:
            resp.length = self.content_length(cl, resp.start)
            resp.framing = "length" if resp.length else "none"
            if resp.length:
                self.state, self.left = "length", resp.length
            return
        resp.framing = "close"
        self.state = "close"

    def end(self) -> None:
        self.out.append(MessageEnd(self.side, self.msg, self.base))
        self.state = "head"
        if self.side == SERVER and isinstance(self.msg, Response) and not self.msg.interim:
            self.done_response()

    def done_response(self) -> None:
        """A final response ended (HttpConnection sets this to drop the request it answered)."""

    # ---- chunked
    def chunk_size(self) -> bool:
        got = self.line(self.lim.max_line)
        if got is None:
            return False
        raw, n = got
        at = self.base
        self.check_bytes(raw, at, "chunk-size line")
        m = _HEX.match(raw)
        if m is None or _CHUNK_EXT.fullmatch(raw, m.end()) is None:
            self.amb("chunk_size_syntax", f"chunk-size line {_show(raw)!r}", at)
            m = _HEX.match(raw.strip(b" \t"))
            if m is None:
                self.amb("chunk_size_syntax", "no chunk size", at, True)
        size = int(m.group(), 16)
        if len(m.group().lstrip(b"0")) > 16 or size > self.lim.max_chunk_size:
            self.amb("chunk_size_overflow", f"chunk size {_show(m.group())!r}", at, True)
        rest = raw[m.end():].strip(b" \t") if m.string is raw else b""
        self.out.append(Chunk(self.side, size, at, at + n))
        if rest:
            self.out.append(ChunkExtension(self.side, rest, at))
        self.take(n)
        if size == 0:
            self.state = "trailers"
        else:
            self.state, self.left = "chunk_data", size
        return True

    def trailers(self) -> bool:
        got = self.split_head()
        if got is None:
            return False
        lines, size = got
        at = self.base
        if not lines[-1][2]:
            self.amb("bare_lf", "the trailer section ends in LF without CR", at + size - 1)
        fields = self.fields(lines[:-1], at)
        self.take(size)
        if fields:
            self.out.append(Trailers(self.side, fields, at))
            for n, _ in fields:
                if n in (b"content-length", b"transfer-encoding", b"content-encoding", b"content-type",
                         b"content-range", b"trailer"):
                    self.amb("framing_in_trailer", f"trailer field {n.decode('latin-1')}", at)
        self.end()
        return True


def _list(values: list) -> list:
    """Comma-separated list elements of header values, lower-cased, empty ones kept as b""."""
    out = []
    for v in values:
        out += [x.strip(b" \t").lower() for x in v.split(b",")]
    return out


class HttpConnection:
    """Both directions of one HTTP/1.x connection.  Responses are matched with requests in
    order (pipelining); a response waits until its request's line and headers were seen."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.queue: list[Request] = []          # requests not answered yet (final response)
        self.client = _Side(CLIENT, limits)
        self.server = _Side(SERVER, limits, pending=lambda: self.queue[0] if self.queue else None)
        self.server.done_response = self._answered

    def _answered(self) -> None:
        if self.queue:
            self.queue.pop(0)

    def feed(self, side: str, data: bytes) -> list:
        if side == CLIENT:
            out = self._requests(self.client.feed(data))
            if self.server.buf and not self.server.dead:    # a request lets waiting bytes go on
                out += self._server(b"")
            return out
        return self._server(data)

    def _requests(self, out: list) -> list:
        """The client's events ``out``: its requests wait for their responses, a bounded number."""
        for ev in out:
            if isinstance(ev, Request):
                self.queue.append(ev)
        if len(self.queue) > self.limits.max_pipelined and not self.client.dead:
            self.client.out = []
            try:
                self.client.amb("too_many_pipelined", f"{len(self.queue)} requests wait for responses",
                                self.queue[-1].start, True)
            except _Stop:
                pass
            out += self.client.out
        return out

    def _server(self, data: bytes) -> list:
        s = self.server
        out = s.feed(data)
        if self.client.state == "connect":
            out = self._connect_answered(out)
        if any(isinstance(ev, Tunnel) for ev in out) and self.client.state != "tunnel":
            self.client.state = "tunnel"            # 101: the client's bytes are not HTTP either
            self.client.take(len(self.client.buf))
        # bytes from the server nobody asked for: not while a request is still coming in
        # (a server may answer a request it has not read whole), otherwise an ambiguity
        if not s.dead and s.buf and s.state == "head" and not self.queue:
            s.out = []
            try:
                if not self.client.buf:
                    s.amb("unsolicited_response", f"server bytes with no request to answer: {_show(s.buf)!r}",
                          s.base, True)
                elif len(s.buf) > self.limits.max_head:     # waiting for a request that does not come
                    s.amb("head_too_long", f"{len(s.buf)} server bytes wait for a request", s.base, True)
            except _Stop:
                pass
            out += s.out
        return out

    def _connect_answered(self, out: list) -> list:
        """The client waits for the answer to its CONNECT: a 2xx makes its bytes the tunnel's (its
        Tunnel event goes before the server's); any other final answer leaves it HTTP (a server
        that refuses CONNECT and keeps the connection reads what follows as requests), read now."""
        for k, ev in enumerate(out):
            if isinstance(ev, Tunnel):
                c = self.client
                c.state = "tunnel"
                tunnel = Tunnel(CLIENT, c.base, "CONNECT")
                c.take(len(c.buf))
                return out[:k] + [tunnel] + out[k:]
            if isinstance(ev, Response) and ev.request is not None and ev.request.method == b"CONNECT" \
                    and not ev.interim and ev.framing != "tunnel":
                self.client.state = "head"
                got = self._requests(self.client.run())
                out = out[:k + 1] + got + out[k + 1:]
                if self.server.buf and not self.server.dead:
                    out += self._server(b"")
                return out
        return out

    def eof(self, side: str) -> list:
        if side == CLIENT:
            return self.client.eof()
        if self.server.state == "head" and self.server.buf and not self.queue:
            return self._server(b"") or self.server.eof()
        return self.server.eof()


# ---------------------------------------------------------------------------
# Content-Encoding
# ---------------------------------------------------------------------------

# br and zstd need a library outside the standard library (Python < 3.14): each is used only if
# its decoder can bound its output (brotli >= 1.2: ``process(data, output_buffer_limit)``; zstd:
# the standard library's ``compression.zstd`` or its backport ``backports.zstd``, whose
# ``decompress(data, max_length)`` works like zlib's).  Without one, that coding is
# unsupported_content_encoding, as before these decoders (a scanner says so once, at start).
MISSING_DECODERS: dict = {}          # coding -> why it cannot be decoded here
try:
    import brotli as _brotli
    if not hasattr(_brotli.Decompressor(), "can_accept_more_data"):
        MISSING_DECODERS["br"] = (f"brotli {getattr(_brotli, '__version__', '?')} cannot bound its output "
                                  "(brotli >= 1.2 needed)")
        _brotli = None
except ImportError:
    _brotli = None
    MISSING_DECODERS["br"] = "no brotli module (pip install 'brotli>=1.2')"
try:
    from compression import zstd as _zstd          # type: ignore[import-not-found]  # Python >= 3.14
except ImportError:
    try:
        from backports import zstd as _zstd        # type: ignore[no-redef]
    except ImportError:
        _zstd = None
        MISSING_DECODERS["zstd"] = "no compression.zstd or backports.zstd module (pip install backports.zstd)"

KNOWN_CODINGS = {b"gzip", b"x-gzip", b"deflate", b"identity", b"br", b"zstd"} - {
    c.encode() for c in MISSING_DECODERS}
UNSUPPORTED_CODINGS = {b"compress", b"x-compress"} | {c.encode() for c in MISSING_DECODERS}


def content_codings(headers: Headers) -> list[bytes]:
    """The Content-Encoding list of a head, in the order applied (empty elements kept as b"")."""
    vals = headers_all(headers, b"content-encoding")
    return _list(vals) if vals else []


@dataclass
class Decoded:
    data: bytes
    layers: list                 # the codings undone, outermost first
    ambiguities: list            # [(kind, detail)]
    bomb: bool = False


def decode_content(body: bytes, codings: list, max_layers: int = 3, max_bytes: int = 64 << 20,
                   max_window: int = 8 << 20) -> Decoded:
    """Undoes ``codings`` (as listed in Content-Encoding: the last applied last) as a browser
    would, never producing more than ``max_bytes``.  Ambiguities: unknown or undecodable codings
    (the data stays as it is from there on), empty list elements, more than ``max_layers`` real
    layers, corrupt, truncated or trailing compressed data, gzip header flags or trailers that
    browsers treat differently, zstd frames whose window is beyond ``max_window`` (RFC 9659: 8 MiB,
    where browsers stop); ``bomb`` when the output would exceed ``max_bytes``."""
    out = Decoded(body, [], [])
    real = [c for c in codings if c not in (b"", b"identity")]
    if any(c == b"" for c in codings):
        out.ambiguities.append(("odd_content_encoding", f"Content-Encoding {_show(b', '.join(codings))!r}"))
    if len(real) > max_layers:
        out.ambiguities.append(("too_many_encodings", f"{len(real)} content codings (at most {max_layers})"))
        return out
    data = body
    for c in reversed(real):
        if c in UNSUPPORTED_CODINGS:
            out.ambiguities.append(("unsupported_content_encoding", f"Content-Encoding {c.decode('latin-1')}"))
            break
        if c not in KNOWN_CODINGS:
            out.ambiguities.append(("unknown_content_encoding", f"Content-Encoding {_show(c)!r}"))
            break
        amb: list = []
        if c in (b"gzip", b"x-gzip"):
            data, bomb = _gunzip(data, max_bytes, amb)
        elif c == b"br":
            data, bomb = _unbrotli(data, max_bytes, amb)
        elif c == b"zstd":
            data, bomb = _unzstd(data, max_bytes, max_window, amb)
        else:
            data, bomb = _inflate(data, max_bytes, amb)
        out.ambiguities += amb
        out.layers.append(c.decode("latin-1"))
        if bomb:
            out.bomb = True
            if not any(k == "decompression_bomb" for k, _ in amb):
                out.ambiguities.append(("decompression_bomb", f"{c.decode()} decodes beyond {max_bytes} bytes"))
            break
        if any(k in ("compressed_corrupt",) for k, _ in amb) and not data:
            break
    out.data = data
    return out


def _run(d, data: bytes, max_bytes: int, amb: list) -> tuple[bytes, bool]:
    """Runs decompressor ``d`` over ``data`` with an output bound."""
    try:
        got = d.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        amb.append(("compressed_corrupt", str(exc)))
        return b"", False
    if len(got) > max_bytes:
        return got[:max_bytes], True
    if not d.eof:
        amb.append(("compressed_truncated", "the compressed data stops before its end"))
    return got, False


def _inflate(data: bytes, max_bytes: int, amb: list) -> tuple[bytes, bool]:
    """deflate: a zlib stream, or (browsers accept it) raw deflate."""
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and data[0] >> 4 <= 7 \
        and (data[0] << 8 | data[1]) % 31 == 0 and not data[1] & 0x20
    if zlib_header:
        d = zlib.decompressobj(15)
        got, bomb = _run(d, data, max_bytes, amb)
        if any(k == "compressed_corrupt" and "incorrect data check" in v for k, v in amb):
            amb[:] = [a for a in amb if a[0] != "compressed_corrupt"]
            amb.append(("zlib_checksum", "the zlib stream's Adler-32 is wrong"))
            d = zlib.decompressobj(-15)
            got, bomb = _run(d, data[2:], max_bytes, amb)
            return got, bomb
        if d.eof and d.unused_data:
            amb.append(("compressed_trailing_data", f"{len(d.unused_data)} bytes after the zlib stream"))
        return got, bomb
    d = zlib.decompressobj(-15)
    got, bomb = _run(d, data, max_bytes, amb)
    if d.eof and d.unused_data:
        amb.append(("compressed_trailing_data", f"{len(d.unused_data)} bytes after the deflate stream"))
    return got, bomb


def _gunzip(data: bytes, max_bytes: int, amb: list) -> tuple[bytes, bool]:
    """gzip, read by hand so that every header flag and the trailer can be reported."""
    if len(data) < 10 or data[:2] != b"\x1f\x8b":
        amb.append(("compressed_corrupt", "not gzip data (no 1f 8b magic)"))
        return data, False
    method, flags = data[2], data[3]
    if method != 8 or flags & 0xE0:
        amb.append(("gzip_header", f"gzip method {method}, flags 0x{flags:02x}"))
    pos = 10
    try:
        if flags & 4:                        # FEXTRA
            (xlen,) = struct.unpack_from("<H", data, pos)
            pos += 2 + xlen
        for bit in (8, 16):                  # FNAME, FCOMMENT: zero-terminated
            if flags & bit:
                end = data.index(b"\0", pos)
                pos = end + 1
        if flags & 2:                        # FHCRC
            (hcrc,) = struct.unpack_from("<H", data, pos)
            if hcrc != zlib.crc32(data[:pos]) & 0xFFFF:
                amb.append(("gzip_header", "the gzip header CRC is wrong"))
            pos += 2
        if pos > len(data):
            raise ValueError
    except (struct.error, ValueError):
        amb.append(("compressed_truncated", "the gzip header stops before its end"))
        return b"", False
    d = zlib.decompressobj(-15)
    got, bomb = _run(d, data[pos:], max_bytes, amb)
    if bomb or not d.eof:
        return got, bomb
    tail = d.unused_data
    if len(tail) < 8:
        amb.append(("gzip_trailer", "the gzip trailer is missing"))
        return got, False
    crc, size = struct.unpack_from("<II", tail)
    if crc != zlib.crc32(got) & 0xFFFFFFFF or size != len(got) & 0xFFFFFFFF:
        amb.append(("gzip_trailer", "the gzip trailer's CRC-32 or length is wrong"))
    if tail[8:]:
        amb.append(("compressed_trailing_data", f"{len(tail) - 8} bytes after the gzip member"
                    + (" (another gzip member)" if tail[8:10] == b"\x1f\x8b" else "")))
    return got, False


BROTLI_STEP = 4096      # input fed per call; the call's output is bounded by output_buffer_limit


def _brotli_pass(data: bytes, max_bytes: int, fine_from: int) -> tuple[bytearray, str, int]:
    """One run of a brotli decoder over ``data``, ``BROTLI_STEP`` bytes a call up to ``fine_from``
    and a byte a call from there (so that the end of the stream is seen before bytes after it).
    Returns (output, outcome, input offset): outcome "end" (the stream ended at the offset),
    "more" (the input ran out first), "bomb" or "error" (the decoder failed in the piece at the
    offset).  Each call yields at most about 32 KiB (output_buffer_limit=1: one output block),
    so no more than ``max_bytes`` and one block are ever held."""
    d = _brotli.Decompressor()
    out = bytearray()
    pos = 0
    while pos < len(data):
        step = 1 if pos >= fine_from else min(BROTLI_STEP, fine_from - pos)
        piece = data[pos:pos + step]
        try:
            out += d.process(piece, output_buffer_limit=1)
            idle = False
            while len(out) <= max_bytes:     # empty input until it can take more (its API's rule)
                more = d.process(b"", output_buffer_limit=1)
                out += more
                if not more and (idle or d.can_accept_more_data()):
                    break                    # (a decoder stuck without output: the next piece fails)
                idle = not more
            finished = d.is_finished()
        except _brotli.error:
            return out, "error", pos
        pos += len(piece)
        if len(out) > max_bytes:
            return out, "bomb", pos
        if finished:
            return out, "end", pos
    return out, "more", pos


def _unbrotli(data: bytes, max_bytes: int, amb: list) -> tuple[bytes, bool]:
    """br (RFC 7932), bounded.  The decoder refuses bytes after the end of a stream with the same
    error as corrupt ones; where that error comes, the stream is decoded again from the start,
    a byte a call through the failing piece, to tell the two apart."""
    if not data:
        return b"", False            # an empty body: nothing to hide, whatever a client makes of it
    out, outcome, pos = _brotli_pass(data, max_bytes, len(data))
    if outcome == "error":
        out, outcome, pos = _brotli_pass(data, max_bytes, pos)
    if outcome == "bomb":
        del out[max_bytes:]
        return bytes(out), True
    if outcome == "error":
        amb.append(("compressed_corrupt", f"brotli data that does not decode (at byte {pos})"))
    elif outcome == "more":
        amb.append(("compressed_truncated", "the brotli stream stops before its end"))
    elif pos < len(data):
        amb.append(("compressed_trailing_data", f"{len(data) - pos} bytes after the brotli stream"))
    return bytes(out), False


ZSTD_STEP = 65536        # input fed per call: what a frame's end leaves over (unused_data) is copied
ZSTD_MAX_FRAMES = 1024   # a decoder per frame costs ~20 us: 4 M empty frames in 32 MiB would take 80 s
ZSTD_OUT = 1 << 20       # output taken per call: never a second copy of the whole object in flight


def _unzstd(data: bytes, max_bytes: int, max_window: int, amb: list) -> tuple[bytes, bool]:
    """zstd (RFC 8878), bounded: each frame (skippable ones too) in turn, as libzstd's streaming
    decoder in browsers reads concatenated frames; a window beyond ``max_window`` is refused by
    the decoder (never allocated), as browsers refuse one beyond 8 MiB.  More than
    ``ZSTD_MAX_FRAMES`` frames is a bomb of decoding time."""
    if not data:
        return b"", False            # an empty body: nothing to hide, whatever a client makes of it
    window_log = max(10, min(31, max_window.bit_length() - 1))
    view = memoryview(data)
    out = bytearray()
    pos = frames = 0
    while pos < len(data):
        if frames == ZSTD_MAX_FRAMES:
            amb.append(("decompression_bomb", f"more than {ZSTD_MAX_FRAMES} zstd frames"))
            return bytes(out), True
        d = _zstd.ZstdDecompressor(options={_zstd.DecompressionParameter.window_log_max: window_log})
        start = pos
        while True:
            piece = view[pos:pos + ZSTD_STEP]
            try:
                out += d.decompress(piece, max_length=min(ZSTD_OUT, max_bytes + 1 - len(out)))
                while not d.eof and not d.needs_input and len(out) <= max_bytes:
                    out += d.decompress(b"", max_length=min(ZSTD_OUT, max_bytes + 1 - len(out)))
            except _zstd.ZstdError as exc:
                if "too much memory" in str(exc):
                    amb.append(("compressed_corrupt", f"a zstd frame whose window is beyond {max_window} "
                                "bytes (browsers refuse more than 8 MiB)"))
                elif frames and pos == start:
                    amb.append(("compressed_trailing_data", f"{len(data) - pos} bytes after the last zstd frame"))
                else:
                    amb.append(("compressed_corrupt", f"zstd data that does not decode ({str(exc)[:100]})"))
                del out[max_bytes:]
                return bytes(out), False
            if len(out) > max_bytes:
                del out[max_bytes:]
                return bytes(out), True
            if d.eof:
                pos += len(piece) - len(d.unused_data)
                break
            pos += len(piece)
            if pos >= len(data):
                amb.append(("compressed_truncated", "the zstd frame stops before its end"))
                return bytes(out), False
        frames += 1
    return bytes(out), False
