"""The e-mail virus scanner, sans-I/O (section 5.2 of the self-securing NI paper).

    sc = EmailScanner(config, engine=clamd.scan,      # engine: bytes -> None or a signature name
                      stream_injections=names)        # the policy's, from the kernel's hello
    acts = sc.open(sid, port, client_is_guest)
    acts = sc.data(sid, direction, offset, data)      # direction: 1 from the guest, 2 to it
    acts = sc.edit_refused(sid, act, error)           # the kernel refused a cut or inject
    sc.close(sid)

Actions are tuples: ("pass", direction, offset), ("pass_all", direction), ("more", direction),
("inject", direction, offset, injection name), ("cut", direction, offset, length),
("kill", reason), ("alert", message, fields).  SMTP (client to server) and POP3 (server to
client) are followed by :mod:`proto`; a message's bytes are held (nothing of it passed) until
the whole message is there, then its parts (:mod:`mime`) are checked against the SHA-256 table
and by the engine.  Clean: everything up to the message's end passes, byte for byte.  A hit
on parts of a multipart: each infected part is replaced in the stream by the policy's
pre-registered stream injection ``replacement_injection`` (inject at the part's start, cut
the part: :func:`replacement_plan`), the rest of the message passes, and an alert carries
the part's name, digest, engine verdict and the first bytes of the original message.  A hit
that cannot be replaced (the message's only body, BDAT, the whole message, no injection
registered, the kernel refusing the edit): the same alert, and the connection is killed.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Iterable, Mapping, Optional

from vhostni.scanner.clamd import EngineError, digest_table

from .mime import MailError, Part, parse_message
from .proto import CLIENT, SERVER, Message, Pop3Tracker, SmtpTracker, Violation

__all__ = ["EmailScanner", "ConfigError", "DEFAULTS", "load_config", "replacement_plan",
           "unreplaceable", "Hit", "EngineError"]

FROM_GUEST, TO_GUEST = 1, 2

DEFAULTS: dict[str, Any] = {
    "smtp_ports": [25],
    "pop3_ports": [110],
    "max_message_bytes": 10 << 20,
    "bad_sha256": [],                 # "HEX" or "HEX NAME"
    "clamd_socket": "",               # "" : the hash table only
    "clamd_timeout": 30.0,
    "clamd_ping_interval": 10.0,      # below clamd's IdleTimeout (30 s by default)
    "scan_whole_message": True,       # also hand the raw message to the engine (it parses mail too)
    "engine_error": "kill",           # the engine failed on a message: kill or pass
    "unparseable": "kill",            # MIME beyond the bounds: kill, or scan the raw message as one part
    "starttls": "kill",               # STARTTLS / STLS: kill, or pass the rest uninspected
    "oversize": "kill",               # message above max_message_bytes: kill, or pass it unscanned
    "smuggling": "kill",              # ambiguous end of message: always kill (only "kill" accepted)
    "max_depth": 10,
    "max_parts": 1000,
    "alert_message_bytes": 32768,     # of the original message, base64, in the alert (max 40000)
    # the policy's [[scanner.inject]] stream injection that replaces an infected part ("": none,
    # infected messages are always killed); its bytes are the administrator's, see replacement_plan
    "replacement_injection": "replacement",
}

_CHOICES = {"engine_error": ("kill", "pass"), "unparseable": ("kill", "scan_raw"),
            "starttls": ("kill", "pass"), "oversize": ("kill", "pass"), "smuggling": ("kill",)}


class ConfigError(ValueError):
    pass


def _ports(key: str, v) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                          and 0 < p < 65536 for p in v):
        raise ConfigError(f"{key}: expected a list of ports")
    return v


def load_config(cfg: Optional[Mapping]) -> dict:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown keys: {', '.join(sorted(unknown))}")
    out = dict(DEFAULTS, **cfg)
    _ports("smtp_ports", out["smtp_ports"])
    _ports("pop3_ports", out["pop3_ports"])
    if set(out["smtp_ports"]) & set(out["pop3_ports"]):
        raise ConfigError("a port cannot be both SMTP and POP3")
    for key in ("max_message_bytes", "max_depth", "max_parts", "alert_message_bytes"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{key}: expected a non-negative integer")
    if out["alert_message_bytes"] > 40000:
        raise ConfigError("alert_message_bytes: at most 40000 (an alert is at most 64 KiB)")
    for key in ("clamd_timeout", "clamd_ping_interval"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] <= 0:
            raise ConfigError(f"{key}: expected a positive number")
    for key, ok in _CHOICES.items():
        if out[key] not in ok:
            raise ConfigError(f"{key}: expected one of {', '.join(ok)}")
    if not isinstance(out["clamd_socket"], str):
        raise ConfigError("clamd_socket: expected a path")
    if not isinstance(out["scan_whole_message"], bool):
        raise ConfigError("scan_whole_message: expected true or false")
    if not isinstance(out["replacement_injection"], str):
        raise ConfigError("replacement_injection: expected the name of a stream injection, or \"\"")
    try:
        table = digest_table(out["bad_sha256"])
    except ValueError as exc:
        raise ConfigError(f"bad_sha256: {exc}") from None
    out["_table"] = table
    return out


class Hit:
    def __init__(self, part: Optional[Part], engine: str, verdict: str, digest: str):
        self.part, self.engine, self.verdict, self.digest = part, engine, verdict, digest

    def fields(self) -> dict:
        p = self.part
        return {"part": p.path if p else None, "filename": p.filename if p else None,
                "content_type": p.content_type if p else None, "sha256": self.digest,
                "engine": self.engine, "verdict": self.verdict}


def unreplaceable(msg: Message, part: Optional[Part]) -> Optional[str]:
    """Why an infected ``part`` of ``msg`` cannot be replaced in the stream (None if it can)."""
    if part is None:
        return "the whole message matched, not one part of it"
    if not part.in_multipart:
        return "the infected part is the message's body, not a part of a multipart"
    if msg.how == "bdat":
        return "a BDAT message: its chunk sizes would no longer match"
    if msg.wire.end(part.end) <= msg.wire.start(part.start):
        return "the infected part is empty"
    return None


def replacement_plan(msg: Message, part: Optional[Part]) -> Optional[dict]:
    """Where an injection takes the place of an infected ``part`` in the stream: cut the part's
    headers and body (between its delimiter line and the CRLF before the next delimiter, mapped
    through the dot-stuffing onto stream offsets) and inject at the cut's start.  The range does
    not depend on the injected bytes, which the policy holds ([[scanner.inject]] stream): a whole
    MIME entity (headers, blank line, body) with CRLF line ends, no line starting with '.' (they
    go on the wire as they are, not dot-stuffed) and no CRLF at the end (the CRLF before the
    next delimiter stays in the stream).  None where a cut cannot work (:func:`unreplaceable`)."""
    if unreplaceable(msg, part) is not None:
        return None
    a, b = msg.wire.start(part.start), msg.wire.end(part.end)
    return {"side": msg.side, "cut": [a, b - a], "inject_at": a}


class _Conn:
    def __init__(self, tracker, client_dir: int):
        self.tracker = tracker
        self.dirs = {CLIENT: client_dir, SERVER: TO_GUEST if client_dir == FROM_GUEST else FROM_GUEST}
        self.side_of = {v: k for k, v in self.dirs.items()}
        self.passed = {FROM_GUEST: 0, TO_GUEST: 0}
        self.asked_more: Optional[int] = None     # the message start we asked more for
        self.done = False
        self.replacing: dict = {}     # edit action of the last data() -> (alert title, fields)
        self.tuple: Any = None


class EmailScanner:
    def __init__(self, config: Optional[Mapping] = None,
                 engine: Optional[Callable[[bytes], Optional[str]]] = None,
                 stream_injections: Iterable[str] = ()):
        self.cfg = load_config(config)
        self.engine = engine
        self.stream_injections = set(stream_injections)    # names the policy registered
        self.conns: dict[int, _Conn] = {}
        self.stats = {"messages": 0, "clean": 0, "infected": 0, "replaced": 0, "parts": 0,
                      "engine_errors": 0, "violations": 0, "replace_refused": 0}

    # ---- connections
    def open(self, sid: int, port: int, client_is_guest: bool, tuple_=None) -> list:
        client_dir = FROM_GUEST if client_is_guest else TO_GUEST
        if port in self.cfg["smtp_ports"]:
            tracker = SmtpTracker(self.cfg["max_message_bytes"])
        elif port in self.cfg["pop3_ports"]:
            tracker = Pop3Tracker(self.cfg["max_message_bytes"])
        else:
            return [("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
        c = _Conn(tracker, client_dir)
        c.tuple = list(tuple_) if tuple_ else None
        self.conns[sid] = c
        return []

    def close(self, sid: int) -> None:
        self.conns.pop(sid, None)

    def data(self, sid: int, direction: int, offset: int, data: bytes) -> list:
        c = self.conns.get(sid)
        if c is None or c.done:
            return []
        t = c.tracker
        side = c.side_of[direction]
        acts: list = []
        c.replacing.clear()          # the caller applied the previous call's actions
        for ev in t.feed(side, data):
            if isinstance(ev, Violation):
                acts += self._violation(c, ev)
            else:
                acts += self._message(c, ev)
                d = c.dirs[ev.side]
                if not c.done and ev.end > c.passed[d]:
                    c.passed[d] = ev.end          # a clean message goes on at once
                    acts.append(("pass", d, ev.end))
            if c.done:
                return acts
        for d, s in c.dirs.items():
            p = t.passable(d)
            if p > c.passed[s]:
                c.passed[s] = p
                acts.append(("pass", s, p))
        if t.in_message():
            start = t.hold_from[t.msg_side]
            if c.asked_more != start:
                c.asked_more = start
                acts.append(("more", c.dirs[t.msg_side]))
        return acts

    # ---- decisions
    def _violation(self, c: _Conn, v: Violation) -> list:
        self.stats["violations"] += 1
        choice = self.cfg.get(v.reason, "kill")
        fields = {"event": v.reason, "protocol": c.tracker.protocol, "tuple": c.tuple,
                  "offset": v.offset, "detail": v.detail}
        if v.reason in ("starttls", "oversize") and choice == "pass":
            c.done = True
            return [("alert", f"e-mail: {v.detail}; the rest of the connection passes uninspected",
                     dict(fields, action="pass")),
                    ("pass_all", FROM_GUEST), ("pass_all", TO_GUEST)]
        c.done = True
        return [("alert", f"e-mail: {v.detail}; connection killed", dict(fields, action="kill")),
                ("kill", v.reason)]

    def _message(self, c: _Conn, msg: Message) -> list:
        self.stats["messages"] += 1
        hits, errors, notes = self.check(msg.data)
        if errors and self.cfg["engine_error"] == "kill" or "unparseable" in notes:
            self.stats["engine_errors"] += bool(errors)
            if not hits:
                c.done = True
                what = "; ".join(errors + notes)[:500]
                return [("alert", f"e-mail: message not checked ({what}); connection killed",
                         dict(self._msg_fields(c, msg), event="unchecked", errors=errors + notes)),
                        ("kill", "unchecked")]
        if not hits:
            self.stats["clean"] += 1
            return []
        self.stats["infected"] += 1
        return self._infected(c, msg, hits)

    def _infected(self, c: _Conn, msg: Message, hits: list) -> list:
        """Replaces every infected part (data() then passes the rest of the message as for a
        clean one), or kills the connection when that cannot be done."""
        first = hits[0]
        name = first.part.filename if first.part and first.part.filename else \
            (first.part.path if first.part else "the message")
        title = f"e-mail virus {first.verdict} in {name!r} ({msg.protocol})"
        fields = dict(self._msg_fields(c, msg), event="virus", **first.fields(),
                      hits=[h.fields() for h in hits[:20]])
        plans, why = self._plans(msg, hits)
        if plans is None:
            c.done = True
            return [("alert", f"{title}; connection killed ({why})", dict(fields, action="kill", why=why)),
                    ("kill", "virus")]
        d = c.dirs[msg.side]
        injection = self.cfg["replacement_injection"]
        acts: list = []
        for plan in plans:    # in stream order, each injection before the bytes it replaces
            acts += [("inject", d, plan["inject_at"], injection), ("cut", d, *plan["cut"])]
        for act in acts:
            c.replacing[act] = (title, fields)
        self.stats["replaced"] += len(plans)
        what = "attachment replaced" if len(plans) == 1 else f"{len(plans)} attachments replaced"
        # the alert after the edits: if the kernel refuses one, edit_refused alerts instead
        return acts + [("alert", f"{title}; {what}",
                        dict(fields, action="replace", replaced=[p["cut"] for p in plans]))]

    def _plans(self, msg: Message, hits: list) -> tuple[Optional[list], str]:
        """A replacement plan for every hit, in stream order, or (None, why not)."""
        plans = []
        for h in hits:
            why = unreplaceable(msg, h.part)
            if why:
                return None, why
            plans.append(replacement_plan(msg, h.part))
        injection = self.cfg["replacement_injection"]
        if not injection:
            return None, "replacement_injection is off"
        if injection not in self.stream_injections:
            return None, f"no replacement injection {injection!r} registered"
        why = self._rest_infected(msg, hits)
        if why:
            return None, why
        return sorted(plans, key=lambda p: p["inject_at"]), ""

    def _rest_infected(self, msg: Message, hits: list) -> Optional[str]:
        """check() hands the whole message to the engine only when no part hit: what goes on
        after the replacement (the message without its infected parts) gets that scan now."""
        if self.engine is None or not self.cfg["scan_whole_message"]:
            return None
        rest, at = [], 0
        for h in sorted(hits, key=lambda h: h.part.start):
            rest.append(msg.data[at:h.part.start])
            at = h.part.end
        rest.append(msg.data[at:])
        try:
            verdict = self.engine(b"".join(rest))
        except EngineError as exc:
            self.stats["engine_errors"] += 1
            if self.cfg["engine_error"] == "kill":
                return f"the rest of the message not checked ({exc})"[:500]
            return None
        return f"the rest of the message is infected too ({verdict})" if verdict else None

    def edit_refused(self, sid: int, act: tuple, error: str) -> list:
        """The NI kernel refused a cut or inject of a replacement: the infected part would go on
        (or the message be left half edited), so the connection is killed instead."""
        self.stats["replace_refused"] += 1
        c = self.conns.get(sid)
        title, fields = c.replacing.get(act, ("e-mail virus", {})) if c else ("e-mail virus", {})
        if c is not None:
            c.done = True
        why = f"the NI refused the replacement: {error}"[:500]
        return [("alert", f"{title}; connection killed ({why})", dict(fields, action="kill", why=why)),
                ("kill", "virus")]

    def _msg_fields(self, c: _Conn, msg: Message) -> dict:
        n = self.cfg["alert_message_bytes"]
        return {"protocol": msg.protocol, "how": msg.how, "tuple": c.tuple,
                "message_offset": msg.start, "message_size": len(msg.data),
                "message_sha256": hashlib.sha256(msg.data).hexdigest(),
                "envelope": msg.envelope or None,
                "message_b64": base64.b64encode(msg.data[:n]).decode(),
                "message_truncated": len(msg.data) > n}

    def check(self, raw: bytes) -> tuple[list, list, list]:
        """(hits, engine errors, notes) for one whole message."""
        hits: list[Hit] = []
        errors: list[str] = []
        notes: list[str] = []
        try:
            parts = parse_message(raw, self.cfg["max_depth"], self.cfg["max_parts"])
        except MailError as exc:
            if self.cfg["unparseable"] == "kill":
                notes.append("unparseable")
                notes.append(str(exc))
                parts = []
            else:
                parts = [Part("", "application/octet-stream", "7bit", None, raw, 0, 0, len(raw),
                              False, [str(exc)])]
        table = self.cfg["_table"]
        for p in parts:
            self.stats["parts"] += 1
            digest = hashlib.sha256(p.data).hexdigest()
            if digest in table:
                hits.append(Hit(p, "sha256", table[digest], digest))
                continue
            if self.engine is not None and p.data:
                try:
                    v = self.engine(p.data)
                except EngineError as exc:
                    errors.append(str(exc))
                    continue
                if v:
                    hits.append(Hit(p, "clamd", v, digest))
        if not hits and self.engine is not None and self.cfg["scan_whole_message"] and raw:
            try:
                v = self.engine(raw)
            except EngineError as exc:
                errors.append(str(exc))
                v = None
            if v:
                hits.append(Hit(None, "clamd", v, hashlib.sha256(raw).hexdigest()))
        return hits, errors, notes
