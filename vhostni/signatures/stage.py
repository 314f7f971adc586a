"""The in-line signature stage of one policy (csrc/sigstage.c): the rules' headers and the two
matcher databases (stream rules, packet rules) as one C object an NI's switch port runs.

Building one compiles every rule with Hyperscan and PCRE2 (seconds for 10,000 rules): it is done
where the policy is loaded, which for a SIGHUP reload is a worker thread (vhostni/daemon.py);
cffi releases the GIL for the compile, so the data plane goes on meanwhile.  Installing it on a
port (``Port.set_sigstage``) is one pointer swap on the data-plane thread between batches.

Also here: what a match in the stage's alert ring becomes in the alert log (Suricata EVE
``alert`` field names).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Optional, Sequence

from .._fastpath import ffi, lib
from .engine import DEFAULT_LOOKBACK, DEFAULT_STREAM_MEMCAP, SigError, SignatureDB
from .rules import HTTP_BUFFERS, Content, IsDataAt, Pcre, Problem, Rule

ACTION_CODES = {"alert": 0, "drop": 1, "reject": 2, "pass": 3}
ACTION_NAMES = {v: k for k, v in ACTION_CODES.items()}
PROTO_CODES = {"ip": 0, "icmp": 1, "tcp": 6, "udp": 17}
PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP"}
DIR_CODES = {"any": 0, "to_server": 1, "to_client": 2}
THRESHOLD_TYPES = {"limit": 1, "threshold": 2, "both": 3}
TRACK_CODES = {"by_src": 1, "by_dst": 2, "by_rule": 3, "by_both": 4}
DEFAULT_TRACK_ENTRIES = 16384           # threshold table slots (64 bytes each), if a rule needs it
DEFAULT_HTTP_BODY_LIMIT = 65536         # request-body bytes HTTP rules see (Suricata: request-body-limit)
DEFAULT_HTTP_MEMCAP = 64 << 20          # all connections' HTTP reader memory
# Suricata's default priorities of the classtypes its rules use most (classification.config)
CLASSTYPE_PRIORITY = {
    "attempted-admin": 1, "successful-admin": 1, "attempted-user": 1, "successful-user": 1,
    "shellcode-detect": 1, "trojan-activity": 1, "web-application-attack": 1, "exploit-kit": 1,
    "command-and-control": 1, "domain-c2": 1, "targeted-activity": 1, "credential-theft": 1,
    "attempted-dos": 2, "attempted-recon": 2, "bad-unknown": 2, "web-application-activity": 2,
    "policy-violation": 1, "misc-attack": 2, "successful-recon-limited": 2, "denial-of-service": 2,
    "misc-activity": 3, "not-suspicious": 3, "protocol-command-decode": 3, "unknown": 3,
    "network-scan": 3, "icmp-event": 3,
}


def _proto(r: Rule) -> int:
    return PROTO_CODES["tcp" if r.proto.startswith(("tcp", "http")) else r.proto]


def _hmask(r: Rule, g: int) -> int:
    return sum(1 << HTTP_BUFFERS[b][0] for b in r.http_groups.get(g, ()))


def _header(r: Rule) -> bytes:
    flags = (1 if r.bidirectional else 0) | (2 if r.mode in ("stream", "http") else 0) | \
        (4 if r.mode == "http" else 0)
    src4, src6 = r.src.v4.ranges, r.src.v6.ranges
    dst4, dst6 = r.dst.v4.ranges, r.dst.v6.ranges
    th, df = r.threshold or {}, r.detection_filter or {}
    out = [struct.pack("<BBBBIIBBBBIIII3I6I", ACTION_CODES[r.action], _proto(r), DIR_CODES[r.direction], flags,
                       r.sid & 0xFFFFFFFF, r.rev & 0xFFFFFFFF,
                       THRESHOLD_TYPES.get(th.get("type"), 0), TRACK_CODES.get(th.get("track"), 0),
                       TRACK_CODES.get(df.get("track"), 0), 0, th.get("count", 0), th.get("seconds", 0),
                       df.get("count", 0), df.get("seconds", 0), _hmask(r, 0), _hmask(r, 1), _hmask(r, 2),
                       len(src4), len(src6), len(dst4), len(dst6), len(r.sport.ranges), len(r.dport.ranges))]
    out += [struct.pack("<II", lo, hi) for lo, hi in src4]
    out += [lo.to_bytes(16, "big") + hi.to_bytes(16, "big") for lo, hi in src6]
    out += [struct.pack("<II", lo, hi) for lo, hi in dst4]
    out += [lo.to_bytes(16, "big") + hi.to_bytes(16, "big") for lo, hi in dst6]
    out += [struct.pack("<HH", lo, hi) for lo, hi in r.sport.ranges]
    out += [struct.pack("<HH", lo, hi) for lo, hi in r.dport.ranges]
    return b"".join(out)


def encode_headers(rules: Sequence[Rule], track_entries: int = DEFAULT_TRACK_ENTRIES,
                   http_body_limit: int = DEFAULT_HTTP_BODY_LIMIT, http_memcap: int = DEFAULT_HTTP_MEMCAP) -> bytes:
    """csrc/sigstage.h's header blob: stream rules first (plain, then HTTP), then packet rules.
    The threshold table gets ``track_entries`` slots if some rule has threshold or
    detection_filter."""
    need = any(r.threshold or r.detection_filter for r in rules)
    return b"".join([b"VSH3", struct.pack("<IIII", len(rules), track_entries if need else 0, http_body_limit,
                                          http_memcap >> 10)]
                    + [_header(r) for r in rules])


def _absolute(it) -> bool:
    if getattr(it, "buf", None) is not None or it.relative:
        return False
    if isinstance(it, Content):
        return it.offset is not None or it.depth is not None
    if isinstance(it, Pcre):             # anchored at the buffer's start
        return "A" in it.flags or it.pattern.startswith(b"^")
    return isinstance(it, IsDataAt)


def absolute_positions(r: Rule) -> bool:
    """A ``tcp`` rule (not ``tcp-stream``) with a payload item positioned from the start of the
    buffer (a content's ``offset``/``depth`` or ``startswith``, a ``pcre`` anchored with ``^`` or
    ``A``, an absolute ``isdataat``): Suricata inspects it over each packet's payload as well as
    over the stream, and counts those positions from the packet's first byte.  The stage matches
    it over the stream (from the stream's first byte) and over each segment."""
    return r.proto == "tcp" and r.mode == "stream" and any(_absolute(it) for it in r.items)


def http_subrules(r: Rule) -> list[tuple[int, str, Rule]]:
    """An HTTP rule as (group, buffer, sub-rule) triples: each sub-rule holds the rule's items
    in that buffer (its relative modifiers chain within the buffer, as in Suricata), and its
    length condition (bsize, urilen) as the block's dsize."""
    out = []
    for g, bufs in sorted(r.http_groups.items()):
        for b in sorted(bufs, key=lambda x: HTTP_BUFFERS[x][0]):
            sub = dataclasses.replace(r, proto="tcp", items=[it for it in r.items if it.buf == b],
                                      dsize=r.bsize.get(b), http_groups={}, bsize={})
            out.append((g, b, sub))
    return out


class Stage:
    """The compiled stage of one rule set.  ``rules``: stream rules then packet rules, the index
    the C stage names a rule by.  ``problems``: rules Hyperscan or PCRE2 rejected (left out)."""

    def __init__(self, rules: Sequence[Rule], lookback: int = DEFAULT_LOOKBACK,
                 stream_memcap: int = DEFAULT_STREAM_MEMCAP, track_entries: int = DEFAULT_TRACK_ENTRIES,
                 http_body_limit: int = DEFAULT_HTTP_BODY_LIMIT, http_memcap: int = DEFAULT_HTTP_MEMCAP):
        self.problems: list[Problem] = []
        stream = [r for r in rules if r.mode == "stream"]
        http = [r for r in rules if r.mode == "http"]
        packet = []
        for r in rules:
            if r.mode in ("stream", "http"):
                continue
            state = r.flow & {"to_server", "from_client", "to_client", "from_server", "established",
                              "not_established"}
            if state:
                # the packet stage keeps no flow state: it cannot tell a direction or a handshake
                self.problems.append(Problem(r.file, r.line, r.sid, f"flow:{','.join(sorted(state))} on a "
                                             "packet rule: the packet stage keeps no flow state to enforce it"))
                continue
            packet.append(r)
        self.rules = stream + http + packet
        self.nstream = len(stream) + len(http)
        dbs = []
        hdbs: dict = {}
        seg = None
        try:
            for group, mode in ((stream, "stream"), (packet, "packet")):
                db = SignatureDB(group, mode, lookback=lookback, stream_memcap=stream_memcap) if group else None
                dbs.append(db)
                if db is not None:
                    self.problems += db.problems
            # the HTTP rules: one block-mode database per (group, buffer), named by stage index
            subs: dict = {}
            for i, r in enumerate(http, len(stream)):
                for g, b, sub in http_subrules(r):
                    subs.setdefault((g, b), []).append((i, sub))
            seen = set()
            for (g, b), lst in sorted(subs.items()):
                db = SignatureDB([x[1] for x in lst], "packet", ids=[x[0] for x in lst])
                hdbs[(g, b)] = db
                for p in db.problems:
                    if (p.file, p.line) not in seen:
                        seen.add((p.file, p.line))
                        self.problems.append(p)
            hdr = encode_headers(self.rules, track_entries, http_body_limit, http_memcap)
            rc = ffi.new("int *")
            st = lib.vn_sigstage_build(hdr, len(hdr), dbs[0]._db if dbs[0] else ffi.NULL,
                                       dbs[1]._db if dbs[1] else ffi.NULL, rc)
            if st == ffi.NULL:
                raise SigError("signature stage", rc[0])
            for db in dbs:          # the stage owns their C databases now
                if db is not None:
                    db._db = ffi.NULL
            self._st = ffi.gc(st, lib.vn_sigstage_free)
            for (g, b), db in hdbs.items():
                rc = lib.vn_sigstage_add_http(st, g, HTTP_BUFFERS[b][0], db._db)
                if rc:
                    raise SigError(f"signature stage ({b})", rc)
                db._db = ffi.NULL
            # tcp rules with absolute positions: also over each segment, as Suricata reads them
            # over each packet (their problems are the stream database's, reported above)
            bad = {(p.file, p.line) for p in self.problems}
            idx = [i for i, r in enumerate(stream) if absolute_positions(r) and (r.file, r.line) not in bad]
            if idx:
                seg = SignatureDB([stream[i] for i in idx], "packet", ids=idx)
                if not seg.problems:
                    rc = lib.vn_sigstage_add_seg(st, seg._db)
                    if rc:
                        raise SigError("signature stage (segments)", rc)
                    seg._db = ffi.NULL
        finally:
            for db in dbs + list(hdbs.values()) + [seg]:
                if db is not None:
                    db.close()

    @property
    def ptr(self):
        return self._st

    def db_stats(self, stream: bool) -> dict:
        s = ffi.new("struct vn_sig_stats *")
        lib.vn_sigstage_db_stats(self._st, 1 if stream else 0, s)
        return {k: getattr(s, k) for k, _ in ffi.typeof("struct vn_sig_stats").fields}


    def track_stats(self) -> dict:
        """The threshold table: entries, used, evictions, alerts_suppressed, matches_filtered."""
        s = ffi.new("struct vn_sig_track_stats *")
        lib.vn_sigstage_track_stats(self._st, s)
        return {k: getattr(s, k) for k, _ in ffi.typeof("struct vn_sig_track_stats").fields}


def _addr(family: int, raw) -> str:
    b = bytes(raw)
    return str(ipaddress.ip_address(b[:4] if family == 4 else b[:16]))


def alert_fields(a, rule: Optional[Rule]) -> tuple[str, dict]:
    """One ``struct vn_sig_alert`` as (message, fields) for the alert log, with Suricata EVE's
    names: ``alert`` {action, gid, signature_id, rev, signature, category, severity}, the flow's
    src_ip/src_port/dest_ip/dest_port/proto, ``direction`` and the stream offset."""
    taken = ACTION_NAMES.get(a.taken, "alert")
    action = ACTION_NAMES.get(a.action, "alert")
    sev = None
    if rule is not None:
        sev = rule.priority if rule.priority is not None else CLASSTYPE_PRIORITY.get(rule.classtype or "", 3)
    alert = {"action": "blocked" if taken in ("drop", "reject") else "allowed",
             "rule_action": action, "taken": taken,
             "gid": rule.gid if rule else 1, "signature_id": int(a.sid), "rev": int(a.rev),
             "signature": rule.msg if rule else "", "category": (rule.classtype or "") if rule else "",
             "severity": sev}
    if rule is not None:
        alert["metadata"] = list(rule.metadata)
        alert["source"] = rule.where()
    if a.limit:
        alert["unproven"] = "a confirmation hit its limit (PCRE2 match limit or step limit)"
    fields = {"event_type": "alert", "alert": alert,
              "src_ip": _addr(a.family, a.src), "src_port": int(a.sport),
              "dest_ip": _addr(a.family, a.dst), "dest_port": int(a.dport),
              "proto": PROTO_NAMES.get(a.proto, str(a.proto)),
              "direction": {0: "to_client", 1: "to_server"}.get(a.to_server),
              "ni_direction": "from_guest" if a.dir == lib.VN_DIR_FROM_GUEST else "to_guest"}
    if a.http:
        http = {"http_method": ffi.string(a.http_method).decode("latin-1"),
                "hostname": ffi.string(a.http_host).decode("latin-1"),
                "url": ffi.string(a.http_url).decode("latin-1")}
        http = {k: v for k, v in http.items() if v}
        if a.http_status:
            http["status"] = int(a.http_status)
        if a.http_trunc:
            http["truncated"] = [n for bit, n in ((1, "http_method"), (2, "hostname"), (4, "url"))
                                 if a.http_trunc & bit]
        fields["http"] = http
    if a.stream:
        fields["stream_offset"] = int(a.offset)
        fields["flow_id"] = int(a.flow)
    else:
        fields["payload_offset"] = int(a.offset)
    msg = f"signature {a.sid}: {rule.msg if rule else ''} ({alert['action']})"
    return msg, fields
