"""The HTTP overflow stage (Prospector-style field lengths), sans-I/O.

    g = HttpGuard(config, stream_injections=names)    # names: the policy's, from the kernel's hello
    acts = g.open(sid, port, client_is_guest, tuple_, now)
    acts = g.data(sid, direction, offset, data, now)  # direction: 1 from the guest, 2 to it
    acts = g.end(sid, direction, offset, now)         # that direction's sender finished (FIN)
    acts = g.tick(now)                                # [(sid, action), ...]: requests held too long
    acts = g.edit_refused(sid, act, error)            # the kernel refused a cut or inject
    g.close(sid)

Actions are tuples: ("pass", direction, offset), ("pass_all", direction), ("more", direction),
("inject", direction, offset, injection name), ("cut", direction, offset, length), ("kill", reason),
("alert", message, fields).

A buffer overflow in a server happens when it copies a request field into a buffer too small for
it; Prospector (and SafeCard's layer-7 stage) stop such a request by knowing, per protocol field,
how long it may be.  Here each *field-length signature* names a method set, a path pattern and a
field of the request (the request line, the target, its path or query, a named query parameter, a
named header, the body, a chunk size) with the largest length the server behind it survives.

The client's bytes of each request are held from its first byte until its head is complete (and,
when a body signature applies, its body too; a chunked request also until its first chunk-size
line), read through :class:`vhostni.scanner.http1.HttpConnection` (keep-alive, pipelining, chunked
bodies), its target decoded and normalised as the server will read it
(:func:`vhostni.scanner.httpuri.normalise`: percent and ``%u`` escapes, overlong UTF-8, double
encoding, ``.``/``..``/``//``, backslashes, NUL), then checked.  A request within its limits passes
whole (its body as it is parsed); the server gets nothing of one that overflows: its connection is
killed or, with ``block = "reply"``, the request is cut from the stream and the client gets the
policy's pre-registered answer (a 400) in the server's place.  The alert names the signature, the
field, its length and the limit.  HTTP ambiguities (smuggling: Content-Length next to
Transfer-Encoding, ...) and URI anomalies (a ``..`` above the root, double encoding, ...) are
alerted, and those listed in ``block_anomalies`` block the request as a signature does.

The server's bytes pass as they come (they are parsed to pair responses with requests and for
their own anomalies); after a ``reply`` everything either side sends later is cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vhostni.scanner.http1 import (AMBIGUITIES, CLIENT, SERVER, Ambiguity, Body, Chunk, HttpConnection,
                                   Limits, MessageEnd, Request, Response, Tunnel, headers_all)
from vhostni.scanner.httpuri import URI_ANOMALIES, NormalisedURI, normalise

__all__ = ["HttpGuard", "ConfigError", "DEFAULTS", "BUILTIN_SIGNATURES", "FIELDS", "Signature",
           "load_config", "parse_signature"]

FROM_GUEST, TO_GUEST = 1, 2

#: field -> what its length is
FIELDS = {
    "request_line": "bytes of the request line as sent",
    "uri": "code units of the request target, decoded (measure = raw: bytes as sent)",
    "path": "code units of the target's path, decoded, before . and .. are resolved",
    "query": "code units of the query (after ?), decoded",
    "param": "code units of the longest value of the named query parameter, decoded",
    "header": "bytes of the longest value of the named header (\"*\": of any header)",
    "body": "bytes of the body, transfer coding removed",
    "chunk_size": "the size announced by a chunk-size line (a value, not a length)",
}

# Shipped signatures: historic overflows whose field and length are well documented.
BUILTIN_SIGNATURES: list = [
    {"name": "iis-ida-codered", "cve": "CVE-2001-0500", "methods": ["*"], "path": ["*.ida", "*.idq"],
     "field": "query", "max": 200,
     "description": "IIS Index Server ISAPI (idq.dll) buffer overflow, MS01-033: Code-Red and Code-Red II"},
    {"name": "iis-printer-host", "cve": "CVE-2001-0241", "methods": ["*"], "path": ["*.printer"],
     "field": "header", "header": "host", "max": 255,
     "description": "IIS 5 Internet Printing ISAPI (msw3prt.dll) Host header overflow, MS01-023 (jill.c)"},
    {"name": "iis-htr-path", "cve": "CVE-1999-0874", "methods": ["*"], "path": ["*.htr"],
     "field": "path", "max": 260,
     "description": "IIS 4 .htr (ism.dll) long file name overflow, MS99-019 (eEye iishack)"},
    {"name": "iis-webdav-long-uri", "cve": "CVE-2003-0109", "field": "uri", "max": 4096, "path": ["*"],
     "methods": ["SEARCH", "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "COPY", "MOVE", "MKCOL"],
     "description": "IIS 5 WebDAV (ntdll.dll RtlDosPathNameToNtPathName_U) overflow by a long URI, MS03-007"},
    {"name": "iis-translate-long-uri", "cve": "CVE-2003-0109", "methods": ["*"], "path": ["*"],
     "if_header": "translate", "field": "uri", "max": 4096,
     "description": "IIS 5 WebDAV overflow (MS03-007) reached with a Translate header"},
    {"name": "iis6-webdav-if-header", "cve": "CVE-2017-7269", "methods": ["PROPFIND"], "path": ["*"],
     "field": "header", "header": "if", "max": 512,
     "description": "IIS 6 WebDAV ScStoragePathFromUrl overflow by a long If header (ExplodingCan)"},
    {"name": "chunk-size-overflow", "cve": "CVE-2002-0392", "methods": ["*"], "path": ["*"],
     "field": "chunk_size", "max": 0x7FFFFFFF,
     "description": "chunk size beyond a signed 32-bit int: Apache 1.3/2.0 (CVE-2002-0392), "
                    "IIS ASP (CVE-2002-0079), nginx 1.3.9-1.4.0 (CVE-2013-2028)"},
]

DEFAULTS: dict[str, Any] = {
    "ports": [80, 8080],
    "inbound": True,                  # requests to servers in the guest (the guest is the server)
    "outbound": False,                # requests the guest sends (the guest is the client)
    "builtin_signatures": True,       # BUILTIN_SIGNATURES
    "disable": [],                    # names of signatures (shipped or not) not to use
    "signatures": [],                 # the policy's: tables like BUILTIN_SIGNATURES' entries
    "block": "kill",                  # a blocked request: kill, or reply (reply_injection, then cut)
    "reply_injection": "",            # the policy's stream injection answered in the server's place
    # HTTP ambiguities (vhostni.scanner.http1.AMBIGUITIES) and URI anomalies
    # (vhostni.scanner.httpuri.URI_ANOMALIES) that block the request; the others are alerted
    "block_anomalies": ["te_and_cl", "te_not_chunked", "te_in_http10", "conflicting_content_length",
                        "bad_content_length", "duplicate_content_length", "chunk_size_syntax",
                        "chunk_size_overflow", "obs_fold", "bare_cr", "nul_in_head", "space_before_colon",
                        "head_too_long", "too_many_headers", "too_many_pipelined",
                        "traversal", "double_encoding", "overlong_utf8", "nul_in_uri"],
    "ignore_anomalies": ["dot_segment", "double_slash"],   # not even alerted
    "tunnels": "pass",                # CONNECT / 101: pass the rest uninspected (alerted), or kill
    "max_line": 16384, "max_head": 65536, "max_headers": 256,
    "max_hold_seconds": 30.0,         # a request head (or held body) still incomplete after this: kill
    "alert_uri_bytes": 2000,
}

_CHOICES = {"block": ("kill", "reply"), "tunnels": ("kill", "pass")}
_SIG_KEYS = {"name", "cve", "description", "methods", "path", "field", "header", "param", "max", "measure",
             "if_header", "action"}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Signature:
    name: str
    methods: tuple            # upper-case method names, or ("*",)
    paths: tuple              # glob patterns, matched case-insensitively against the normalised path
    field: str
    max: int
    name_of_field: str = ""   # header or param name (lower case)
    measure: str = "decoded"  # or raw
    if_header: str = ""       # only requests carrying this header
    action: str = "block"     # or alert
    cve: str = ""
    description: str = ""

    def applies(self, method: bytes, uri: NormalisedURI, headers: list) -> bool:
        if self.methods != ("*",) and method.decode("latin-1").upper() not in self.methods:
            return False
        if self.if_header and not any(n == self.if_header.encode() for n, _ in headers):
            return False
        return any(uri.matches(pat) for pat in self.paths)

    @property
    def what(self) -> str:
        return f"{self.field} {self.name_of_field}".strip()


def parse_signature(d: Any) -> Signature:
    if not isinstance(d, Mapping):
        raise ConfigError("signatures: expected tables")
    name = d.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
        raise ConfigError(f"signature {name!r}: name: 1-64 of A-Z a-z 0-9 _ . : -")
    unknown = set(d) - _SIG_KEYS
    if unknown:
        raise ConfigError(f"signature {name}: unknown keys {', '.join(sorted(unknown))}")
    fld = d.get("field")
    if fld not in FIELDS:
        raise ConfigError(f"signature {name}: field: one of {', '.join(FIELDS)}")
    mx = d.get("max")
    if not isinstance(mx, int) or isinstance(mx, bool) or mx < 0:
        raise ConfigError(f"signature {name}: max: a non-negative integer")
    methods = d.get("methods", ["*"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or not all(
            isinstance(m, str) and re.fullmatch(r"\*|[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}", m) for m in methods):
        raise ConfigError(f"signature {name}: methods: a list of method names, or [\"*\"]")
    paths = d.get("path", ["*"])
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and 0 < len(p) <= 512 for p in paths):
        raise ConfigError(f"signature {name}: path: a glob pattern or a list of them")
    fname = d.get("header" if fld == "header" else "param", "")
    if fld in ("header", "param"):
        if not isinstance(fname, str) or not fname or len(fname) > 128:
            raise ConfigError(f"signature {name}: field {fld} needs `{fld}` (its name)")
    elif "header" in d or "param" in d:
        raise ConfigError(f"signature {name}: `header`/`param` only with field header/param")
    measure = d.get("measure", "decoded")
    if measure not in ("decoded", "raw"):
        raise ConfigError(f"signature {name}: measure: decoded or raw")
    action = d.get("action", "block")
    if action not in ("block", "alert"):
        raise ConfigError(f"signature {name}: action: block or alert")
    for k in ("cve", "description", "if_header"):
        if not isinstance(d.get(k, ""), str) or len(d.get(k, "")) > 300:
            raise ConfigError(f"signature {name}: {k}: a string")
    return Signature(name, tuple(m.upper() if m != "*" else "*" for m in methods),
                     tuple(p.lower() for p in paths), fld, mx, fname.lower(), measure,
                     d.get("if_header", "").lower(), action, d.get("cve", ""), d.get("description", ""))


def load_config(cfg: Optional[Mapping]) -> dict:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown keys: {', '.join(sorted(unknown))}")
    out = dict(DEFAULTS, **cfg)
    if not isinstance(out["ports"], list) or not out["ports"] or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in out["ports"]):
        raise ConfigError("ports: expected a non-empty list of ports")
    for key in ("inbound", "outbound", "builtin_signatures"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"{key}: expected true or false")
    for key in ("max_line", "max_head", "max_headers", "alert_uri_bytes"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key}: expected a positive integer")
    if out["alert_uri_bytes"] > 8000:
        raise ConfigError("alert_uri_bytes: at most 8000 (an alert is at most 64 KiB)")
    v = out["max_hold_seconds"]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError("max_hold_seconds: expected a positive number")
    for key, ok in _CHOICES.items():
        if out[key] not in ok:
            raise ConfigError(f"{key}: expected one of {', '.join(ok)}")
    if not isinstance(out["reply_injection"], str):
        raise ConfigError("reply_injection: expected the name of a stream injection, or \"\"")
    kinds = set(AMBIGUITIES) | set(URI_ANOMALIES)
    for key in ("block_anomalies", "ignore_anomalies"):
        if not isinstance(out[key], list) or not all(k in kinds for k in out[key]):
            raise ConfigError(f"{key}: expected a list of kinds ({', '.join(sorted(kinds))})")
    if not isinstance(out["disable"], list) or not all(isinstance(n, str) for n in out["disable"]):
        raise ConfigError("disable: expected a list of signature names")
    if not isinstance(out["signatures"], list):
        raise ConfigError("signatures: expected an array of tables ([[scanner.config.signatures]])")
    sigs = [parse_signature(d) for d in (BUILTIN_SIGNATURES if out["builtin_signatures"] else [])]
    mine = [parse_signature(d) for d in out["signatures"]]
    names = [s.name for s in mine]
    if len(set(names)) != len(names):
        raise ConfigError("signatures: two with the same name")
    sigs = [s for s in sigs if s.name not in names] + mine      # the policy's replaces a shipped one
    out["_signatures"] = [s for s in sigs if s.name not in out["disable"]]
    return out


def _framing(req: Request) -> tuple:
    """(chunked, has a body) of a request, as the codec frames it."""
    if headers_all(req.headers, b"transfer-encoding"):
        return True, True
    for v in headers_all(req.headers, b"content-length"):
        if any(x.strip(b" \t").strip(b"0") for x in v.split(b",")):
            return False, True
    return False, False


class _Conn:
    def __init__(self, cfg: dict, client_dir: int, tuple_, now: float):
        self.http = HttpConnection(Limits(max_line=cfg["max_line"], max_head=cfg["max_head"],
                                          max_headers=cfg["max_headers"]))
        self.cd = client_dir
        self.sd = TO_GUEST if client_dir == FROM_GUEST else FROM_GUEST
        self.side_of = {client_dir: CLIENT, self.sd: SERVER}
        self.passed = {FROM_GUEST: 0, TO_GUEST: 0}
        self.fed = {FROM_GUEST: 0, TO_GUEST: 0}
        self.safe = 0                     # client bytes below this are checked
        self.req: Optional[Request] = None    # the request being read (head checked)
        self.req_sigs: list = []          # its body and chunk-size signatures
        self.body_len = 0
        self.hold_body = False            # its body is held until its end (a body signature)
        self.wait_chunk = False           # its head is held until its first chunk-size line
        self.more_at = -1                 # client offset `more` was asked at (-1: not asked)
        self.held_since: Optional[float] = None
        self.done = False
        self.replied = False              # a request was blocked with a reply: the client's bytes are cut
        self.owed = 0                     # responses still owed before the reply goes in (-1: it went in)
        self.reply_why: tuple = ("", {})
        self.cut_to = {FROM_GUEST: 0, TO_GUEST: 0}
        self.alerted: set = set()
        self.edits: dict = {}             # edit action -> (title, fields) for edit_refused
        self.tuple = list(tuple_) if tuple_ else None
        self.uri = None                   # the current request's NormalisedURI
        self.inbound = client_dir == TO_GUEST


class HttpGuard:
    def __init__(self, config: Optional[Mapping] = None, stream_injections=()):
        self.cfg = load_config(config)
        self.sigs: list = self.cfg["_signatures"]
        self.stream_injections = set(stream_injections)
        self.conns: dict[int, _Conn] = {}
        self.stats = {"requests": 0, "blocked": 0, "replied": 0, "overflows": 0, "anomalies": 0,
                      "held_too_long": 0, "tunnels": 0, "edit_refused": 0}

    @property
    def reply(self) -> Optional[str]:
        name = self.cfg["reply_injection"]
        return name if self.cfg["block"] == "reply" and name and name in self.stream_injections else None

    # ---- connections
    def open(self, sid: int, port: int, client_is_guest: bool, tuple_=None, now: float = 0.0) -> list:
        want = self.cfg["outbound"] if client_is_guest else self.cfg["inbound"]
        if port not in self.cfg["ports"] or not want:
            return [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
        self.conns[sid] = _Conn(self.cfg, FROM_GUEST if client_is_guest else TO_GUEST, tuple_, now)
        return []

    def close(self, sid: int) -> None:
        self.conns.pop(sid, None)

    def data(self, sid: int, direction: int, offset: int, data: bytes, now: float = 0.0) -> list:
        c = self.conns.get(sid)
        if c is None or direction not in c.side_of:
            return []
        c.fed[direction] = offset + len(data)
        if c.replied:
            if direction == c.sd and c.owed > 0:
                return self._owed_responses(c, c.http.feed(SERVER, data))
            return self._cut_rest(c, direction)
        if c.done:
            return []
        return self._events(c, c.http.feed(c.side_of[direction], data), now)

    def end(self, sid: int, direction: int, offset: int, now: float = 0.0) -> list:
        c = self.conns.get(sid)
        if c is None or c.done or direction not in c.side_of:
            return []
        if c.replied:
            return self._owed_responses(c, c.http.eof(SERVER)) if direction == c.sd and c.owed > 0 else []
        return self._events(c, c.http.eof(c.side_of[direction]), now)

    def tick(self, now: float) -> list:
        """Connections whose held request has waited longer than ``max_hold_seconds`` (a
        request trickled to keep the NI holding it): killed.  Returns [(sid, action), ...]."""
        out = []
        for sid, c in list(self.conns.items()):
            if not c.done and not c.replied and c.held_since is not None \
                    and now - c.held_since > self.cfg["max_hold_seconds"]:
                self.stats["held_too_long"] += 1
                fields = dict(self._fields(c, c.req if c.hold_body else None), event="held_too_long",
                              held_bytes=c.fed[c.cd] - c.safe, seconds=round(now - c.held_since, 3))
                out += [(sid, a) for a in self._kill(
                    c, f"http guard: a request held {fields['seconds']} s, still incomplete", fields)]
        return out

    # ---- events
    def _events(self, c: _Conn, events: list, now: float) -> list:
        acts: list = []
        for ev in events:
            if isinstance(ev, Ambiguity):
                acts += self._anomaly(c, ev.kind, ev.detail, ev.side, ev.fatal)
            elif isinstance(ev, Tunnel):
                acts += self._tunnel(c, ev)
            elif isinstance(ev, Request) or getattr(ev, "side", None) == CLIENT:
                acts += self._client_event(c, ev)
            if c.done or c.replied:
                return acts
        if not c.done and not c.replied:
            acts += self._advance(c, now)
        return acts

    def _client_event(self, c: _Conn, ev) -> list:
        if isinstance(ev, Request):
            return self._request(c, ev)
        if isinstance(ev, Body) and c.req is not None:
            c.body_len += len(ev.data)
            if not c.hold_body:
                c.safe = max(c.safe, ev.offset + len(ev.data))
            for s in c.req_sigs:
                if s.field == "body" and c.body_len > s.max:
                    return self._hit(c, c.req, s, c.body_len, held=c.hold_body)
            return []
        if isinstance(ev, Chunk) and c.req is not None:
            for s in c.req_sigs:
                if s.field == "chunk_size" and ev.size > s.max:
                    return self._hit(c, c.req, s, ev.size, held=c.hold_body or c.wait_chunk)
            c.wait_chunk = False
            if not c.hold_body:
                c.safe = max(c.safe, ev.end)
            return []
        if isinstance(ev, MessageEnd):
            c.safe = max(c.safe, ev.end)
            c.req, c.req_sigs, c.hold_body, c.wait_chunk = None, [], False, False
        return []

    def _request(self, c: _Conn, req: Request) -> list:
        self.stats["requests"] += 1
        u = normalise(req.target)
        c.req, c.body_len = req, 0
        c.uri = u
        applying = [s for s in self.sigs if s.applies(req.method, u, req.headers)]
        acts: list = []
        for s in applying:
            n = self._length(req, u, s)
            if n is not None and n > s.max:
                acts += self._hit(c, req, s, n, held=True)
                if c.done or c.replied:
                    return acts
        for kind, detail in u.anomalies:
            acts += self._anomaly(c, kind, detail, CLIENT, False, req)
            if c.done or c.replied:
                return acts
        c.req_sigs = [s for s in applying if s.field in ("body", "chunk_size") and s.action == "block"]
        chunked, has_body = _framing(req)
        c.hold_body = has_body and any(s.field == "body" for s in c.req_sigs)
        c.wait_chunk = chunked and any(s.field == "chunk_size" for s in c.req_sigs)
        if not c.hold_body and not c.wait_chunk:
            c.safe = max(c.safe, req.head_end)
        return acts

    @staticmethod
    def _length(req: Request, u, s: Signature) -> Optional[int]:
        raw = s.measure == "raw"
        f = s.field
        if f == "request_line":
            return req.lines[0] if req.lines else len(req.method) + len(req.target) + 10
        if f == "uri":
            return len(req.target) if raw else u.decoded_length
        if f == "path":
            return len(u.raw_path) if raw else len(u.decoded_path)
        if f == "query":
            return len(u.raw_query) if raw else len(u.query)
        if f == "param":
            vals = [len(v) for n, v in u.params if n.lower() == s.name_of_field]
            return max(vals) if vals else None
        if f == "header":
            want = s.name_of_field.encode("latin-1")
            vals = [len(v) for n, v in req.headers if want == b"*" or n == want]
            if want == b"host" and u.authority is not None:      # absolute-form names the host too
                vals.append(len(u.authority))
            return max(vals) if vals else None
        return None                       # body, chunk_size: as they come

    # ---- decisions
    def _advance(self, c: _Conn, now: float) -> list:
        """Passes what was checked; holds (with `more`) what was not."""
        acts = []
        cd, sd = c.cd, c.sd
        if c.safe > c.passed[cd]:
            c.passed[cd] = c.safe
            acts.append(("pass", cd, c.safe))
        if c.fed[sd] > c.passed[sd]:
            c.passed[sd] = c.fed[sd]
            acts.append(("pass", sd, c.fed[sd]))
        if c.fed[cd] > c.safe:
            if c.held_since is None:
                c.held_since = now
            if c.more_at < 0 or c.passed[cd] >= c.more_at:
                c.more_at = c.fed[cd]
                acts.append(("more", cd))
        else:
            c.held_since = None
        return acts

    def _fields(self, c: _Conn, req: Optional[Request]) -> dict:
        f: dict = {"tuple": c.tuple, "direction": "inbound" if c.inbound else "outbound"}
        if req is not None:
            n = self.cfg["alert_uri_bytes"]
            f.update(method=req.method.decode("latin-1")[:50], uri=req.target[:n].decode("latin-1"),
                     uri_truncated=len(req.target) > n)
            u = c.uri
            if u is not None and c.req is req:
                f.update(path=u.path[:n], anomalies=u.kinds())
        return f

    def _hit(self, c: _Conn, req: Request, s: Signature, length: int, held: bool) -> list:
        self.stats["overflows"] += 1
        what = f"chunk size {length:#x}" if s.field == "chunk_size" else f"{s.what} of {length}"
        fields = dict(self._fields(c, req), event="overflow", signature=s.name, cve=s.cve,
                      description=s.description, field=s.field, field_name=s.name_of_field or None,
                      length=length, limit=s.max, measure=s.measure)
        title = (f"http overflow: {what} > {s.max} ({s.name}{', ' + s.cve if s.cve else ''}) "
                 f"in {req.method.decode('latin-1')[:20]} {req.target[:80].decode('latin-1')}")
        if s.action == "alert":
            return [("alert", title + "; passed (action = alert)", dict(fields, action="alert"))]
        return self._block(c, req.start if held else None, title, fields)

    def _anomaly(self, c: _Conn, kind: str, detail: str, side: str, fatal: bool,
                 req: Optional[Request] = None) -> list:
        if kind in self.cfg["ignore_anomalies"] and not fatal:
            return []
        self.stats["anomalies"] += 1
        req = req or (c.req if side == CLIENT else None)
        fields = dict(self._fields(c, req), event="anomaly", kind=kind, detail=detail[:300], side=side)
        title = f"http anomaly: {kind} ({detail[:120]})"
        if side == CLIENT and (kind in self.cfg["block_anomalies"] or fatal):
            # a request the scanner cannot read, or one servers read differently: never passed
            if req is not None:
                start = req.start                       # its head was just read
            elif c.req is not None:                     # in a body: held from its start, or not
                start = c.req.start if c.hold_body or c.wait_chunk else None
            else:
                start = c.safe                          # in a head not read yet
            return self._block(c, start, title, fields)
        if fatal:      # the server's side cannot be followed: its bytes pass, requests are still checked
            return [("alert", title + "; the server's replies are no longer parsed", dict(fields, action="alert"))]
        if kind in c.alerted:
            return []
        c.alerted.add(kind)
        return [("alert", title + "; passed", dict(fields, action="alert"))]

    def _tunnel(self, c: _Conn, ev: Tunnel) -> list:
        self.stats["tunnels"] += 1
        fields = dict(self._fields(c, c.http.queue[0] if c.http.queue else None), event="tunnel", why=ev.why)
        title = f"http guard: the connection becomes a tunnel ({ev.why})"
        if self.cfg["tunnels"] == "kill":
            return self._kill(c, title, fields)
        c.done = True
        return [("alert", title + "; the rest passes uninspected", dict(fields, action="pass")),
                ("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]

    def _kill(self, c: _Conn, title: str, fields: dict) -> list:
        """Kills the connection; the requests before the blocked one, checked, go first."""
        c.done = True
        self.stats["blocked"] += 1
        acts: list = []
        if c.safe > c.passed[c.cd]:
            c.passed[c.cd] = c.safe
            acts.append(("pass", c.cd, c.safe))
        return acts + [("alert", f"{title}; connection killed", dict(fields, action="kill")),
                       ("kill", fields["event"])]

    def _block(self, c: _Conn, start: Optional[int], title: str, fields: dict) -> list:
        """The server gets nothing more of this connection's requests.  With a reply injection,
        a request held from its first byte (``start``; None: not held whole) is cut with
        everything the client sends after it, and the client is answered in the server's place
        once the server answered the requests before it (their responses pass as they come);
        otherwise the connection is killed."""
        rep = self.reply
        owed = sum(1 for r in c.http.queue if r.start < (start or 0))
        if rep is None or start is None or start != c.safe or c.http.server.dead or \
                owed == 0 and (c.http.server.buf or c.http.server.state != "head"):
            return self._kill(c, title, fields)
        cd = c.cd
        self.stats["blocked"] += 1
        self.stats["replied"] += 1
        c.replied = True
        c.held_since = None               # nothing of it is held for a decision any more
        c.owed = owed
        c.reply_why = (title, fields)
        acts: list = []
        if start > c.passed[cd]:
            c.passed[cd] = start
            acts.append(("pass", cd, start))
        c.cut_to[cd] = start
        acts += self._cut_rest(c, cd)
        if owed == 0:
            acts += self._answer(c)
        return acts + [("alert", f"{title}; request answered with {rep!r}"
                        + (f" after the {owed} response(s) before it" if owed else ""),
                        dict(fields, action="reply", reply=rep))]

    def _answer(self, c: _Conn) -> list:
        """The reply goes in at what the server has passed so far; the server's later bytes are cut."""
        sd = c.sd
        acts = [("inject", sd, c.passed[sd], self.reply)]
        c.cut_to[sd] = c.passed[sd]
        c.owed = -1
        acts += self._cut_rest(c, sd)
        for e in acts:
            c.edits[e] = c.reply_why
        return acts

    def _owed_responses(self, c: _Conn, events: list) -> list:
        """After a reply was decided, before it went in: the server's answers to the requests
        before the blocked one pass; at the end of the last of them the reply goes in."""
        acts: list = []
        for ev in events:
            if isinstance(ev, MessageEnd) and ev.side == SERVER and isinstance(ev.message, Response) \
                    and not ev.message.interim:
                c.passed[c.sd] = max(c.passed[c.sd], ev.end)
                acts.append(("pass", c.sd, ev.end))
                c.owed -= 1
                if c.owed == 0:
                    return acts + self._answer(c)
            elif isinstance(ev, (Tunnel, Ambiguity)) and (isinstance(ev, Tunnel) or ev.fatal):
                title, fields = c.reply_why
                c.replied = False
                return acts + self._kill(c, f"{title} (the server's answers before it cannot be followed)",
                                         fields)
        return acts

    def _cut_rest(self, c: _Conn, d: int) -> list:
        """After a reply: what either side sends later never arrives (the client was told the
        connection closes; the server was never asked)."""
        if c.fed[d] <= c.cut_to[d]:
            return []
        act = ("cut", d, c.cut_to[d], c.fed[d] - c.cut_to[d])
        c.cut_to[d] = c.fed[d]
        c.edits[act] = c.reply_why
        return [act]

    def edit_refused(self, sid: int, act: tuple, error: str) -> list:
        """The kernel refused an edit of a reply: the request must not go on, so the connection
        is killed."""
        self.stats["edit_refused"] += 1
        c = self.conns.get(sid)
        if c is None:
            return [("kill", "edit_refused")]
        title, fields = c.edits.get(act, ("http guard", {"event": "overflow"}))
        why = f"the NI refused the reply: {error}"[:300]
        c.done = True
        return [("alert", f"{title} ({why}); connection killed", dict(fields, action="kill", why=why)),
                ("kill", fields.get("event", "overflow"))]
