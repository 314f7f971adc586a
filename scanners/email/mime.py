"""A strict, bounded MIME parser for hostile messages (RFC 2045-2047, 2046 multiparts, 2231 names).

    parts = parse_message(raw)         # every leaf part, decoded, with its byte range in ``raw``

It never raises anything but :class:`MailError` (too deep, too many parts, bad boundary): whatever
else a message holds is parsed leniently, so that every byte a mail client might decode is decoded
and scanned.  Bounds: nesting ``max_depth`` (multiparts and message/rfc822), ``max_parts`` leaves,
header block ``max_header_bytes``.  Decoding only shrinks data (base64, quoted-printable), so the
decoded total is bounded by the message size.
"""
from __future__ import annotations

import binascii
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["MailError", "Part", "parse_message", "parse_headers", "header_params"]


class MailError(ValueError):
    """The message is beyond the parser's bounds or structurally broken."""


@dataclass
class Part:
    path: str                    # "1", "2.1", ...: position in the MIME tree ("" for a single-part message)
    content_type: str            # lower-case type/subtype
    encoding: str                # lower-case Content-Transfer-Encoding ("7bit" if absent)
    filename: Optional[str]      # from Content-Disposition filename or Content-Type name
    data: bytes                  # the decoded body
    start: int                   # where the part's headers start in the message
    body_start: int              # where its body starts
    end: int                     # where its body ends (before the CRLF of the next delimiter)
    in_multipart: bool           # a body part of a multipart (so it can be replaced by another part)
    notes: list = field(default_factory=list)     # decoding oddities ("bad base64 padding", ...)


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[^\s()<>@,;:\\\"/\[\]?=]+")
_UNQUOTED = re.compile(r"[^;]*")


def _header_block(msg: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity at msg[start:end].  The
    block ends at the empty line, or before the first line that is neither a field nor a
    continuation: mail clients (and Python's email) read the body from there, so the
    scanner must see those bytes as body too, not skip them as a malformed header."""
    m = _HEADER_END.search(msg, start, end)
    stop = m.start() if m else end
    pos = start
    while pos < stop:
        nl = msg.find(b"\n", pos, stop)
        line_end = stop if nl < 0 else nl
        line = msg[pos:line_end]
        if line[:1] not in (b" ", b"\t", b"\r", b""):
            name, sep, _ = line.partition(b":")
            if not sep or not name.strip():
                return pos, pos
        pos = line_end + 1
    return (stop, m.end()) if m else (end, end)


def parse_headers(block: bytes, limit: int = 1 << 20) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) pairs; malformed lines are skipped."""
    if len(block) > limit:
        raise MailError("header block too large")
    out: list[tuple[str, list[str]]] = []       # a field's value as its lines: joined once at the end
    for line in re.split(rb"\r?\n", block):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if out:
                out[-1][1].append(line.strip().decode("latin-1"))
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            continue
        out.append((name.strip().lower().decode("latin-1"), [value.strip().decode("latin-1")]))
    return [(name, " ".join(lines)) for name, lines in out]


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``type/sub; a=b; c="d"`` -> ("type/sub", {"a": "b", "c": "d"}), RFC 2231 continuations and
    charset'lang'percent-encoding joined and decoded.  Lenient: never raises."""
    i, n = 0, len(value)
    m = re.match(r"\s*([^;]*)", value)
    main = m.group(1).strip().lower() if m else ""
    i = m.end() if m else 0
    raw: dict[str, str] = {}
    while i < n and len(raw) < 64:
        if value[i] != ";":
            j = value.find(";", i)
            if j < 0:
                break
            i = j
        i += 1
        while i < n and value[i] in " \t":
            i += 1
        m = _TOKEN.match(value, i)
        if not m:
            continue
        key = m.group(0).lower()
        i = m.end()
        while i < n and value[i] in " \t":
            i += 1
        if i >= n or value[i] != "=":
            continue
        i += 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            buf = []
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(value[i])
                i += 1
            i += 1
            val = "".join(buf)
        else:
            m = _UNQUOTED.match(value, i)      # from i, not on a copy of the rest: that was quadratic
            val = m.group(0).strip()
            i = m.end()
        raw.setdefault(key, val)
    params: dict[str, str] = {}
    pieces: dict[str, list[tuple[int, bool, str]]] = {}
    for key, val in raw.items():
        m = re.fullmatch(r"([^*]+)\*(?:(\d{1,3})\*?|)", key)
        if m and (key.endswith("*") or m.group(2)):
            pieces.setdefault(m.group(1), []).append((int(m.group(2) or 0), key.endswith("*"), val))
        else:
            params[key] = val
    for name, ps in pieces.items():
        ps.sort()
        charset = "utf-8"
        out = []
        for k, (_, encoded, val) in enumerate(ps):
            if encoded:
                if k == 0 and val.count("'") >= 2:
                    charset, _, val = val.split("'", 2)
                try:
                    val = urllib.parse.unquote(val, encoding=charset or "utf-8", errors="replace")
                except (LookupError, ValueError):    # unknown; or a codec that fails (idna, punycode,
                    val = urllib.parse.unquote(val, errors="replace")    # undefined, a NUL in the name)
            out.append(val)
        params[name] = "".join(out)
    return main, params


def _decode_words(s: str) -> str:
    """RFC 2047 encoded words in a file name, best effort."""
    def one(m: re.Match) -> str:
        charset, enc, text = m.group(1), m.group(2).lower(), m.group(3)
        try:
            if enc == "b":
                data = binascii.a2b_base64(text + "=" * (-len(text) % 4))
            else:
                data = binascii.a2b_qp(text.replace("_", " ").encode("latin-1"), header=True)
            return data.decode(charset, errors="replace")
        except (LookupError, ValueError, binascii.Error):
            return m.group(0)
    return re.sub(r"=\?([^?]{1,40})\?([bBqQ])\?([^?]*)\?=", one, s)


def decode_body(body: bytes, encoding: str, notes: list) -> bytes:
    if encoding == "base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body.split(b"=", 1)[0] if b"=" in body else body)
        rest = len(cleaned) % 4
        if rest == 1:
            notes.append("bad base64 length")
            cleaned = cleaned[:-1]
        elif rest:
            cleaned += b"=" * (4 - rest)
        try:
            return binascii.a2b_base64(cleaned)
        except (binascii.Error, ValueError):      # cannot happen after cleaning; stay total anyway
            notes.append("undecodable base64")
            return body
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding not in ("7bit", "8bit", "binary", ""):
        notes.append(f"unknown encoding {encoding[:40]!r}: scanned as is")
    return body


class _Parser:
    def __init__(self, msg: bytes, max_depth: int, max_parts: int, max_header_bytes: int):
        self.msg = msg
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.parts: list[Part] = []

    def entity(self, start: int, end: int, path: str, depth: int, in_multipart: bool) -> None:
        if depth > self.max_depth:
            raise MailError(f"MIME nesting deeper than {self.max_depth}")
        msg = self.msg
        start = min(start, end)           # an empty part (two delimiters back to back)
        if msg.startswith(b"\r\n", start, end) or msg.startswith(b"\n", start, end):
            body_start = start + (2 if msg.startswith(b"\r\n", start, end) else 1)   # no headers
            headers = []
        else:
            header_stop, body_start = _header_block(msg, start, end)
            headers = parse_headers(msg[start:header_stop], self.max_header_bytes)
        hdr = {}
        for k, v in headers:
            hdr.setdefault(k, v)          # the first copy wins, as most clients do
        ctype, cparams = header_params(hdr.get("content-type", "text/plain"))
        if "/" not in ctype:
            ctype = "text/plain"
        encoding = hdr.get("content-transfer-encoding", "7bit").strip().lower()[:64]
        _, dparams = header_params(hdr.get("content-disposition", ""))
        filename = dparams.get("filename") or cparams.get("name")
        if filename is not None:
            filename = _decode_words(filename)[:255]
        if ctype.startswith("multipart/"):
            boundary = cparams.get("boundary", "")
            if not boundary or len(boundary) > 200:
                raise MailError(f"multipart at {path or 'top'} without a usable boundary")
            self.multipart(boundary, body_start, end, path, depth)
            return
        if ctype == "message/rfc822" and encoding in ("7bit", "8bit", "binary"):
            self.entity(body_start, end, path + ".1" if path else "1", depth + 1, False)
            return
        if len(self.parts) >= self.max_parts:
            raise MailError(f"more than {self.max_parts} parts")
        notes: list = []
        data = decode_body(msg[body_start:end], encoding, notes)
        self.parts.append(Part(path, ctype, encoding, filename, data, start, body_start, end,
                               in_multipart, notes))

    def multipart(self, boundary: str, start: int, end: int, path: str, depth: int) -> None:
        delim = re.compile(rb"(?:^|(?<=\n))--" + re.escape(boundary.encode("latin-1", "replace"))
                           + rb"(--)?[ \t]*(?:\r?\n|$)", re.M)
        found = []
        for m in delim.finditer(self.msg, start, end):
            # the line break before a delimiter belongs to it
            s = m.start()
            if s > start and self.msg[s - 1:s] == b"\n":
                s -= 2 if s - 2 >= start and self.msg[s - 2:s] == b"\r\n" else 1
            found.append((s, m.end(), bool(m.group(1))))
            if m.group(1):
                break
            if len(found) > self.max_parts + 1:
                raise MailError(f"more than {self.max_parts} parts")
        if not found:
            # no delimiter at all: a client shows nothing, but scan the body as one part
            self.entity_raw(start, end, path or "1")
            return
        for k, (s, e, closing) in enumerate(found):
            if closing:
                break
            part_end = found[k + 1][0] if k + 1 < len(found) else end     # unclosed: to the end
            sub = f"{path}.{k + 1}" if path else str(k + 1)
            self.entity(e, part_end, sub, depth + 1, True)

    def entity_raw(self, start: int, end: int, path: str) -> None:
        if len(self.parts) >= self.max_parts:
            raise MailError(f"more than {self.max_parts} parts")
        self.parts.append(Part(path, "application/octet-stream", "7bit", None, self.msg[start:end],
                               start, start, end, False, ["multipart without delimiters"]))


def parse_message(msg: bytes, max_depth: int = 10, max_parts: int = 1000,
                  max_header_bytes: int = 1 << 20) -> list[Part]:
    """Every leaf part of ``msg`` (an RFC 5322 message, CRLF or LF line ends), decoded."""
    if not isinstance(msg, (bytes, bytearray)):
        raise MailError("a message is bytes")
    p = _Parser(bytes(msg), max_depth, max_parts, max_header_bytes)
    try:
        p.entity(0, len(msg), "", 0, False)
    except RecursionError:          # max_depth keeps far below this; stay total anyway
        raise MailError("MIME nesting too deep") from None
    return p.parts
