"""The web-download scanner, sans-I/O: the e-mail scanner's protection for HTTP downloads.

    sc = WebDownloadScanner(config, engine=clamd,     # engine: bytes -> None or a signature name
                            stream_injections=names)  # the policy's, from the kernel's hello
    acts = sc.open(sid, port, client_is_guest, tuple_)
    acts = sc.data(sid, direction, offset, data)      # direction: 1 from the guest, 2 to it
    acts = sc.end(sid, direction, offset)             # that direction's sender finished (FIN)
    acts = sc.edit_refused(sid, act, error)           # the kernel refused a cut or inject
    sc.close(sid)

Actions are tuples: ("pass", direction, offset), ("pass_all", direction), ("more", direction),
("inject", direction, offset, injection name), ("cut", direction, offset, length), ("kill", reason),
("alert", message, fields).

Both directions of an HTTP/1.x connection go through :class:`vhostni.scanner.http1.HttpConnection`.
The client's bytes pass as soon as they are parsed.  The server's bytes pass up to the start of
each response with a body; from there the response is held (``more`` once per response, so a
body larger than the receiver's window keeps coming) until its last byte arrived.  Then its body,
transfer coding removed, is decoded as a browser would (Content-Encoding: gzip, deflate, br, zstd,
bounded: :func:`~vhostni.scanner.http1.decode_content`; br and zstd where their libraries are
installed, else they are uninspectable as any coding the decoder lacks) and the decoded object, and the undecoded one if it
differs, are looked up in the SHA-256 table and given to the engine.  Clean: the response passes,
byte for byte, and the next one on the connection is read.  Infected: the connection is killed
before any byte of the response reached the client, with an alert naming the URL, the headers, the
object's digest, name and engine verdict and carrying the object's first bytes.  Or, with
``replacement_injection`` naming one of the policy's stream injections (a whole HTTP response of the
administrator's: a "blocked" page), the infected response is replaced by it in the stream (inject at
the response's start, cut the response: it was held whole, so the client never saw any of it) and
the connection goes on.

Ambiguity is an attack: every :class:`~vhostni.scanner.http1.Ambiguity` the codec or the decoder
reports (a kind not in ``tolerate``) means the scanner cannot be sure how the client reads the
response; ``uninspectable = "kill"`` (default) kills the connection with an alert naming the
ambiguity, ``"alert"`` alerts and goes on with the codec's reading.  Tunnels (CONNECT, 101) are not
HTTP any more: ``tunnels = "kill"`` (default) or ``"pass"`` (alert, the rest passes uninspected).
"""
from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Callable, Mapping, Optional

from vhostni.scanner.clamd import EngineError, digest_table
from vhostni.scanner.http1 import (AMBIGUITIES, CLIENT, SERVER, Ambiguity, Body, HttpConnection,
                                   Limits, MessageEnd, Request, Response, Tunnel, content_codings,
                                   decode_content)

__all__ = ["WebDownloadScanner", "ConfigError", "DEFAULTS", "load_config", "EngineError"]

FROM_GUEST, TO_GUEST = 1, 2

DEFAULTS: dict[str, Any] = {
    "ports": [80, 8080],              # server ports followed as HTTP/1.x
    "guest_servers": False,           # also scan responses of servers in the guest
    "max_body_bytes": 32 << 20,       # a response body held (transfer coding removed)
    "max_decoded_bytes": 64 << 20,    # its Content-Encoding undone; beyond: decompression_bomb
    "max_encoding_layers": 3,
    "max_window_size": 8 << 20,       # a zstd frame's window (decoder memory); beyond: compressed_corrupt
    "max_line": 8192, "max_head": 65536, "max_headers": 256,
    "bad_sha256": [],                 # "HEX" or "HEX NAME"
    "clamd_socket": "",               # "": the digest table only
    "clamd_timeout": 30.0,
    "clamd_ping_interval": 10.0,
    "uninspectable": "kill",          # an ambiguity: kill, or alert and go on with the codec's reading
    "tolerate": [],                   # ambiguity kinds that are not treated as uninspectable
    "tunnels": "kill",                # CONNECT / 101: kill, or pass the rest uninspected (alerted)
    "oversize": "kill",               # a body beyond max_body_bytes: kill, or pass the rest unscanned
    "engine_error": "kill",           # the engine failed: kill, or pass with the digest check only
    "alert_object_bytes": 32768,      # of the infected object, base64, in the alert (max 40000)
    "alert_header_bytes": 4096,       # of the request and response heads in an alert
    # the policy's [[scanner.inject]] stream injection that takes an infected response's place (a
    # whole HTTP response of its own, see scanners/README.md); "": infected responses kill
    "replacement_injection": "",
}

_CHOICES = {"uninspectable": ("kill", "alert"), "tunnels": ("kill", "pass"), "oversize": ("kill", "pass"),
            "engine_error": ("kill", "pass")}


class ConfigError(ValueError):
    pass


def load_config(cfg: Optional[Mapping]) -> dict:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown keys: {', '.join(sorted(unknown))}")
    out = dict(DEFAULTS, **cfg)
    if not isinstance(out["ports"], list) or not out["ports"] or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in out["ports"]):
        raise ConfigError("ports: expected a non-empty list of ports")
    for key in ("max_body_bytes", "max_decoded_bytes", "max_encoding_layers", "max_window_size", "max_line", "max_head",
                "max_headers", "alert_object_bytes", "alert_header_bytes"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key.startswith("alert") else 1):
            raise ConfigError(f"{key}: expected a positive integer")
    if not 1 << 10 <= out["max_window_size"] <= 1 << 31:
        raise ConfigError("max_window_size: expected 1024 to 2147483648 bytes (zstd's range)")
    if out["alert_object_bytes"] > 40000 or out["alert_header_bytes"] > 8192:
        raise ConfigError("alert_object_bytes at most 40000, alert_header_bytes at most 8192 "
                          "(an alert is at most 64 KiB)")
    for key in ("clamd_timeout", "clamd_ping_interval"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] <= 0:
            raise ConfigError(f"{key}: expected a positive number")
    for key, ok in _CHOICES.items():
        if out[key] not in ok:
            raise ConfigError(f"{key}: expected one of {', '.join(ok)}")
    if not isinstance(out["guest_servers"], bool):
        raise ConfigError("guest_servers: expected true or false")
    if not isinstance(out["clamd_socket"], str):
        raise ConfigError("clamd_socket: expected a path")
    if not isinstance(out["replacement_injection"], str):
        raise ConfigError("replacement_injection: expected the name of a stream injection, or \"\"")
    if not isinstance(out["tolerate"], list) or not all(k in AMBIGUITIES for k in out["tolerate"]):
        raise ConfigError(f"tolerate: expected a list of ambiguity kinds ({', '.join(AMBIGUITIES)})")
    try:
        out["_table"] = digest_table(out["bad_sha256"])
    except ValueError as exc:
        raise ConfigError(f"bad_sha256: {exc}") from None
    return out


def _heads(headers: list, budget: int) -> list:
    """[[name, value], ...] as text, at most about ``budget`` bytes."""
    out = []
    for n, v in headers:
        budget -= len(n) + len(v)
        if budget < 0:
            out.append(["...", "(truncated)"])
            break
        out.append([n.decode("latin-1"), v.decode("latin-1")])
    return out


_FILENAME = re.compile(rb"""filename\*?\s*=\s*(?:UTF-8'[^']*')?("?)([^";]*)\1""", re.I)


def filename(resp: Response) -> str:
    """The name a browser would save the object under: Content-Disposition's filename, else the
    last segment of the URL's path."""
    for n, v in resp.headers:
        if n == b"content-disposition":
            m = _FILENAME.search(v)
            if m and m.group(2):
                return m.group(2).decode("latin-1")[:200]
    req = resp.request
    if req is None:
        return ""
    path = req.target.split(b"?", 1)[0].split(b"#", 1)[0]
    return path.rsplit(b"/", 1)[-1].decode("latin-1")[:200]


class _Held:
    """A response being held until its last byte."""

    def __init__(self, resp: Response):
        self.resp = resp
        self.body = bytearray()


class _Conn:
    def __init__(self, cfg: dict, client_dir: int, tuple_):
        self.http = HttpConnection(Limits(max_line=cfg["max_line"], max_head=cfg["max_head"],
                                          max_headers=cfg["max_headers"]))
        self.dirs = {CLIENT: client_dir, SERVER: TO_GUEST if client_dir == FROM_GUEST else FROM_GUEST}
        self.side_of = {v: k for k, v in self.dirs.items()}
        self.passed = {FROM_GUEST: 0, TO_GUEST: 0}
        self.fed = {FROM_GUEST: 0, TO_GUEST: 0}
        self.held: Optional[_Held] = None
        self.done = False
        self.alerted: set = set()          # ambiguity kinds alerted (alert mode: once each)
        self.replacing: dict = {}          # edit action -> (alert title, fields), for edit_refused
        self.ambiguities: list = []        # every ambiguity seen, for the alerts
        self.tuple = list(tuple_) if tuple_ else None


class WebDownloadScanner:
    def __init__(self, config: Optional[Mapping] = None,
                 engine: Optional[Callable[[bytes], Optional[str]]] = None, stream_injections=()):
        self.cfg = load_config(config)
        self.engine = engine
        self.stream_injections = set(stream_injections)    # names the policy registered
        self.conns: dict[int, _Conn] = {}
        self.stats = {"responses": 0, "clean": 0, "infected": 0, "replaced": 0, "replace_refused": 0,
                      "ambiguous": 0, "tunnels": 0, "oversize": 0, "engine_errors": 0, "bytes_scanned": 0}

    # ---- connections
    def open(self, sid: int, port: int, client_is_guest: bool, tuple_=None) -> list:
        if port not in self.cfg["ports"] or not client_is_guest and not self.cfg["guest_servers"]:
            return [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
        self.conns[sid] = _Conn(self.cfg, FROM_GUEST if client_is_guest else TO_GUEST, tuple_)
        return []

    def close(self, sid: int) -> None:
        self.conns.pop(sid, None)

    def data(self, sid: int, direction: int, offset: int, data: bytes) -> list:
        c = self.conns.get(sid)
        if c is None or c.done or direction not in c.side_of:
            return []
        c.fed[direction] = offset + len(data)
        side = c.side_of[direction]
        return self._events(c, c.http.feed(side, data))

    def end(self, sid: int, direction: int, offset: int) -> list:
        c = self.conns.get(sid)
        if c is None or c.done or direction not in c.side_of:
            return []
        return self._events(c, c.http.eof(c.side_of[direction]))

    # ---- events
    def _events(self, c: _Conn, events: list) -> list:
        acts: list = []
        sd, cd = c.dirs[SERVER], c.dirs[CLIENT]
        for ev in events:
            if isinstance(ev, Ambiguity):
                c.ambiguities = c.ambiguities[-19:] + [ev.fields()]      # the last 20, for the alerts
                acts += self._ambiguity(c, ev.kind, ev.detail, ev.fatal, ev.side, ev.request)
            elif isinstance(ev, Tunnel):
                acts += self._tunnel(c, ev)
            elif isinstance(ev, Response) and ev.framing in ("length", "chunked", "close"):
                acts += self._pass(c, sd, ev.start)
                c.held = _Held(ev)
                acts.append(("more", sd))
            elif isinstance(ev, Body) and ev.side == SERVER and c.held is not None:
                c.held.body += ev.data
                if len(c.held.body) > self.cfg["max_body_bytes"]:
                    acts += self._oversize(c)
            elif isinstance(ev, MessageEnd) and ev.side == SERVER:
                if c.held is not None and c.held.resp is ev.message:
                    held, c.held = c.held, None
                    acts += self._response(c, held, ev.end)
                    if not c.done:
                        acts += self._pass(c, sd, ev.end)
                else:
                    acts += self._pass(c, sd, ev.end)
            if c.done:
                return acts
        # what the client sent is not held: requests pass as soon as they are read
        acts += self._pass(c, cd, c.fed[cd])
        return acts

    def _pass(self, c: _Conn, d: int, upto: int) -> list:
        if upto > c.passed[d]:
            c.passed[d] = upto
            return [("pass", d, upto)]
        return []

    def _kill(self, c: _Conn, title: str, fields: dict) -> list:
        c.done = True
        return [("alert", f"{title}; connection killed", dict(fields, action="kill")), ("kill", fields["event"])]

    def _let_go(self, c: _Conn, title: str, fields: dict) -> list:
        """Stops following the connection: the rest passes uninspected."""
        c.done = True
        return [("alert", f"{title}; the rest of the connection passes uninspected", dict(fields, action="pass")),
                ("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]

    def _fields(self, c: _Conn, resp: Optional[Response] = None, req: Optional[Request] = None) -> dict:
        budget = self.cfg["alert_header_bytes"]
        f: dict = {"tuple": c.tuple}
        resp = resp or (c.held.resp if c.held else None)
        req = resp.request if resp else req or (c.http.queue[0] if c.http.queue else None)
        if req is not None:
            f.update(url=req.url[:2000], method=req.method.decode("latin-1")[:50],
                     request_headers=_heads(req.headers, budget // 2))
        if resp is not None:
            f.update(status=resp.status, response_headers=_heads(resp.headers, budget // 2),
                     filename=filename(resp))
        return f

    def _ambiguity(self, c: _Conn, kind: str, detail: str, fatal: bool, side: str,
                   req: Optional[Request] = None) -> list:
        if kind in self.cfg["tolerate"] and not fatal:
            return []
        self.stats["ambiguous"] += 1
        fields = dict(self._fields(c, req=req), event="ambiguity", kind=kind, detail=detail[:500], side=side,
                      ambiguities=c.ambiguities[-20:])
        title = f"web download: ambiguous HTTP ({kind}: {detail[:200]})"
        if self.cfg["uninspectable"] == "kill":
            return self._kill(c, title, fields)
        if fatal:
            return self._let_go(c, title, fields)
        if kind in c.alerted:
            return []
        c.alerted.add(kind)
        return [("alert", f"{title}; passed (uninspectable = alert)", dict(fields, action="alert"))]

    def _tunnel(self, c: _Conn, ev: Tunnel) -> list:
        self.stats["tunnels"] += 1
        fields = dict(self._fields(c), event="tunnel", why=ev.why)
        title = f"web download: the connection becomes a tunnel ({ev.why})"
        if self.cfg["tunnels"] == "kill":
            return self._kill(c, title, fields)
        return self._let_go(c, title, fields)

    def _oversize(self, c: _Conn) -> list:
        self.stats["oversize"] += 1
        fields = dict(self._fields(c), event="oversize", limit=self.cfg["max_body_bytes"])
        title = f"web download: a response body beyond {self.cfg['max_body_bytes']} bytes"
        c.held = None
        if self.cfg["oversize"] == "kill":
            return self._kill(c, title, fields)
        return self._let_go(c, title, fields)

    # ---- the check
    @property
    def replacement(self) -> Optional[str]:
        """The stream injection infected responses are replaced by, if the policy registered it."""
        name = self.cfg["replacement_injection"]
        return name if name and name in self.stream_injections else None

    def edit_refused(self, sid: int, act: tuple, error: str) -> list:
        """The NI kernel refused the inject or cut of a replacement: the infected response would go
        on (or be left half edited), so the connection is killed instead."""
        self.stats["replace_refused"] += 1
        c = self.conns.get(sid)
        if c is None:
            return [("kill", "virus")]
        title, fields = c.replacing.get(act, ("web download: virus", {"event": "virus"}))
        why = f"the NI refused the replacement: {error}"[:500]
        return self._kill(c, f"{title} ({why})", dict(fields, why=why))

    def _response(self, c: _Conn, held: _Held, end: int) -> list:
        self.stats["responses"] += 1
        resp, raw = held.resp, bytes(held.body)
        dec = decode_content(raw, content_codings(resp.headers), self.cfg["max_encoding_layers"],
                             self.cfg["max_decoded_bytes"], self.cfg["max_window_size"])
        objects = [("decoded", dec.data)]
        if dec.data != raw:
            objects.append(("raw", raw))      # a client may save it as it came (a .gz, say)
        fields = dict(self._fields(c, resp), content_type=_hval(resp, b"content-type"),
                      content_encoding=[x.decode("latin-1") for x in content_codings(resp.headers)][:10],
                      decoded_layers=dec.layers, size=len(dec.data), sha256=hashlib.sha256(dec.data).hexdigest(),
                      raw_size=len(raw), raw_sha256=hashlib.sha256(raw).hexdigest())
        errors = []
        for what, obj in objects:
            self.stats["bytes_scanned"] += len(obj)
            digest = hashlib.sha256(obj).hexdigest()
            verdict, engine = self.cfg["_table"].get(digest), "sha256"
            if verdict is None and self.engine is not None and obj:
                engine = "clamd"
                try:
                    verdict = self.engine(obj)
                except EngineError as exc:
                    errors.append(str(exc)[:300])
            if verdict:
                self.stats["infected"] += 1
                n = self.cfg["alert_object_bytes"]
                title = f"web download: virus {verdict} in {fields['filename']!r} from {fields.get('url')}"
                fields = dict(fields, event="virus", engine=engine, verdict=verdict, object=what,
                              object_sha256=digest, object_b64=base64.b64encode(obj[:n]).decode(),
                              object_truncated=len(obj) > n,
                              ambiguities=[{"kind": k, "detail": d[:200]} for k, d in dec.ambiguities]
                              + c.ambiguities[-10:])
                if self.replacement is None:
                    return self._kill(c, title, fields)
                return self._replace(c, resp, end, title, fields)
        if errors:
            self.stats["engine_errors"] += 1
            if self.cfg["engine_error"] == "kill":
                return self._kill(c, f"web download: not checked ({'; '.join(errors)[:300]})",
                                  dict(fields, event="unchecked", errors=errors))
            acts = [("alert", "web download: engine failed, passed with the digest check only",
                     dict(fields, event="unchecked", action="pass", errors=errors))]
        else:
            acts = []
        for kind, detail in dec.ambiguities:
            c.ambiguities = c.ambiguities[-19:] + [{"side": SERVER, "kind": kind, "detail": detail[:200],
                                                    "offset": resp.head_end}]
            c.held = held
            acts += self._ambiguity(c, kind, detail, False, SERVER)
            c.held = None
            if c.done:
                return acts
        self.stats["clean"] += 1
        return acts


    def _replace(self, c: _Conn, resp: Response, end: int, title: str, fields: dict) -> list:
        """The infected response [start, end), held whole, gives way to the policy's injection; the
        connection goes on (the cut is the scanner's decision on those bytes)."""
        sd = c.dirs[SERVER]
        acts = [("inject", sd, resp.start, self.replacement), ("cut", sd, resp.start, end - resp.start)]
        for act in acts:
            c.replacing[act] = (title, fields)
        c.passed[sd] = end
        self.stats["replaced"] += 1
        return acts + [("alert", f"{title}; response replaced",
                        dict(fields, action="replace", replaced=[resp.start, end - resp.start],
                             replacement=self.replacement))]


def _hval(resp: Response, name: bytes) -> Optional[str]:
    for n, v in reversed(resp.headers):
        if n == name:
            return v.decode("latin-1")[:200]
    return None
