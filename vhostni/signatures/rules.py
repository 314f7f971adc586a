"""Suricata-syntax rules: a strict parser and compiler into the IR the C matcher (csrc/sig.c) runs.

Sans-I/O: ``parse_rules(text, filename)`` takes the text of a rules file; ``load_rule_files`` is the
only function that opens files.  A rule that cannot be enforced exactly as Suricata would is never
half-accepted: it becomes a ``Problem`` with its file:line and the reason (unknown keyword, a sticky
buffer that needs the L7 stage, an unsupported modifier, a syntax error), and the caller's policy
(``on_unsupported``) decides whether that fails the load or skips the rule.

Why our own tokenizer and not ``suricataparser`` (PyPI): that package splits options with a regular
expression, keeps values as raw strings (no content/hex/escape decoding, no modifier binding, no
address or port semantics) and reports no line numbers for rules continued over several lines; we
would have had to re-parse every value anyway, and leniency there is a security problem (a rule
silently read differently from Suricata is a rule that does not block).

Accepted subset (see README, "Signatures (payload stage)"):
  actions alert drop reject pass; protocols tcp udp icmp ip (and tcp-pkt, tcp-stream);
  addresses and ports: any, literals, CIDR, IPv4 ranges, port ranges (a:b, a:, :b), lists, nesting,
  negation, $VARIABLES; directions -> and <>;
  msg sid rev gid classtype priority metadata reference target;
  content (|hex|, \\" \\; \\: \\\\ escapes, !negation) with nocase offset depth distance within
  fast_pattern (plain, only, offset,length) startswith rawbytes; pcre "/re/flags" (i s m x A E G R,
  O and B accepted) with !negation; flow (to_server from_client to_client from_server established
  not_established stateless only_stream no_stream); dsize (N <N >N <=N >=N N<>M !N);
  isdataat ([!]N[,relative]); threshold and detection_filter (applied per rule by the in-line stage,
  csrc/sigstage.c; count 1..1000000, seconds 1..604800).
"""
from __future__ import annotations

import errno
import os
import stat
import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

ACTIONS = ("alert", "drop", "reject", "pass")
PROTOCOLS = ("tcp", "udp", "icmp", "ip", "tcp-pkt", "tcp-stream", "http", "http1")

# HTTP buffers (csrc/http.h VN_HTTP_B_*): Suricata's sticky buffer names and their legacy names,
# and which messages have them ("req", "resp", "both")
HTTP_BUFFERS = {
    "http.method": (0, "req"), "http.uri": (1, "req"), "http.uri.raw": (2, "req"),
    "http.request_line": (3, "req"), "http.protocol": (4, "both"), "http.header": (5, "both"),
    "http.header.raw": (6, "both"), "http.cookie": (7, "both"), "http.user_agent": (8, "req"),
    "http.host": (9, "req"), "http.host.raw": (10, "req"), "http.accept": (11, "req"),
    "http.accept_lang": (12, "req"), "http.accept_enc": (13, "req"), "http.referer": (14, "req"),
    "http.connection": (15, "req"), "http.content_type": (16, "both"), "http.content_len": (17, "both"),
    "http.start": (18, "both"), "http.header_names": (19, "both"), "http.request_body": (20, "req"),
    "http.stat_code": (21, "resp"), "http.stat_msg": (22, "resp"), "http.response_line": (23, "resp"),
    "http.server": (24, "resp"), "http.location": (25, "resp"),
}
HTTP_LEGACY = {
    "http_method": "http.method", "http_uri": "http.uri", "http_raw_uri": "http.uri.raw",
    "http_request_line": "http.request_line", "http_protocol": "http.protocol",
    "http_header": "http.header", "http_raw_header": "http.header.raw", "http_cookie": "http.cookie",
    "http_user_agent": "http.user_agent", "http_host": "http.host", "http_raw_host": "http.host.raw",
    "http_accept": "http.accept", "http_accept_lang": "http.accept_lang", "http_accept_enc": "http.accept_enc",
    "http_referer": "http.referer", "http_connection": "http.connection",
    "http_content_type": "http.content_type", "http_content_len": "http.content_len",
    "http_start": "http.start", "http_header_names": "http.header_names",
    "http_client_body": "http.request_body", "http.client_body": "http.request_body",
    "http_stat_code": "http.stat_code", "http_stat_msg": "http.stat_msg",
    "http_response_line": "http.response_line", "http_server": "http.server", "http_location": "http.location",
}
# legacy names that modify the content before them (the others are sticky buffers, as in Suricata)
HTTP_CONTENT_MODIFIERS = {"http_method", "http_uri", "http_raw_uri", "http_header", "http_raw_header",
                          "http_cookie", "http_user_agent", "http_host", "http_raw_host", "http_client_body",
                          "http_stat_code", "http_stat_msg"}
# pcre's HTTP buffer flags
PCRE_HTTP_FLAGS = {"U": "http.uri", "I": "http.uri.raw", "P": "http.request_body", "H": "http.header",
                   "D": "http.header.raw", "M": "http.method", "C": "http.cookie", "S": "http.stat_code",
                   "Y": "http.stat_msg", "V": "http.user_agent", "W": "http.host", "Z": "http.host.raw"}
_HTTP_NOT_YET = ("file_data", "file.data", "http.response_body", "http_server_body", "http.server_body")
# the groups an HTTP rule is matched in (csrc/sigstage.h VN_SIG_HG_*)
HG_REQ, HG_REQ_BODY, HG_RESP = 0, 1, 2
HTTP_BODY = HTTP_BUFFERS["http.request_body"][0]
MAX_RULE_CHARS = 64 * 1024
MAX_ITEMS = 32            # csrc/sig.h VN_SIG_MAX_ITEMS
MAX_PATTERN = 8192        # csrc/sig.h VN_SIG_MAX_PATTERN
MAX_RULES = 65536         # csrc/sig.h VN_SIG_MAX_RULES
MAX_VAR_DEPTH = 16

# Keywords that name a sticky buffer or application-layer field: they need the L7 stage.
_L7_PREFIXES = ("http", "dns", "tls", "ssl_", "ssh", "file", "ja3", "ja4", "dce_", "smb", "krb5", "sip",
                "snmp", "ike", "quic", "mqtt", "rfb", "nfs", "tftp", "ftp", "modbus", "dnp3", "enip",
                "cip_", "uricontent", "urilen", "app-layer", "dhcp", "rdp", "smtp", "imap", "pop3",
                "websocket", "email", "x509", "pgsql", "bittorrent", "base64_", "pkt_data", "dcerpc",
                "ntp", "ldap", "snmp")
# Keywords Suricata has that this stage does not enforce (yet), and why.
_UNSUPPORTED = {
    "flags": "TCP flags belong to the header filter (prevent rules), not the payload stage",
    "flowbits": "flowbits need per-flow state the payload stage does not keep",
    "flowint": "flowint needs per-flow state the payload stage does not keep",
    "xbits": "xbits need per-flow state the payload stage does not keep",
    "byte_test": "byte_test is not supported yet", "byte_jump": "byte_jump is not supported yet",
    "byte_extract": "byte_extract is not supported yet", "byte_math": "byte_math is not supported yet",
    "endswith": "endswith needs the end of the buffer, which a stream does not have",
    "bsize": "bsize applies to sticky buffers (the L7 stage)",
    "stream_size": "stream_size is not supported yet", "tag": "tag is not supported",
    "ttl": "ttl belongs to the header filter", "tos": "tos belongs to the header filter",
    "ipopts": "ipopts belongs to the header filter", "fragbits": "fragbits belongs to the header filter",
    "fragoffset": "fragoffset belongs to the header filter", "id": "id belongs to the header filter",
    "ip_proto": "ip_proto belongs to the header filter", "sameip": "sameip belongs to the header filter",
    "seq": "seq belongs to the header filter", "ack": "ack belongs to the header filter",
    "window": "window belongs to the header filter", "itype": "itype belongs to the header filter",
    "icode": "icode belongs to the header filter", "icmp_id": "icmp_id belongs to the header filter",
    "icmp_seq": "icmp_seq belongs to the header filter", "tcp.mss": "tcp.mss belongs to the header filter",
    "replace": "replace (IPS rewrite) is not supported", "noalert": "noalert is not supported",
    "prefilter": "prefilter is not supported", "requires": "requires is not supported",
    "lua": "lua scripts are not supported", "luajit": "lua scripts are not supported",
    "datarep": "datasets are not supported", "dataset": "datasets are not supported",
    "iprep": "iprep is not supported", "geoip": "geoip is not supported",
    "decode-event": "decoder events are not supported", "stream-event": "stream events are not supported",
    "engine-event": "engine events are not supported", "app-layer-event": "needs the L7 stage",
    "content_limit": "not supported",
}
_PCRE_FLAGS = {"i": 1, "s": 2, "m": 4, "x": 8, "A": 16, "E": 32, "G": 64}
_PCRE_NOOP_FLAGS = set("OBR")          # R is relative (handled), O and B change nothing here
_PCRE_L7_FLAGS = set("UIPQHDMCSYVWZXKLJ")

# csrc/sig.h constants (kept here so parsing needs no compiled module; tests check they agree)
K_CONTENT, K_PCRE, K_ISDATAAT = 1, 2, 3
I_NEGATED, I_NOCASE, I_RELATIVE, I_OFFSET, I_DEPTH, I_DISTANCE, I_WITHIN = 1, 2, 4, 8, 16, 32, 64
R_DSIZE, R_DSIZE_NOT = 1, 2
NO_ANCHOR = 0xFFFFFFFF

DEFAULT_VARS = {
    "HTTP_SERVERS": "$HOME_NET", "SMTP_SERVERS": "$HOME_NET", "SQL_SERVERS": "$HOME_NET",
    "DNS_SERVERS": "$HOME_NET", "TELNET_SERVERS": "$HOME_NET", "AIM_SERVERS": "$EXTERNAL_NET",
    "DC_SERVERS": "$HOME_NET", "DNP3_SERVER": "$HOME_NET", "DNP3_CLIENT": "$HOME_NET",
    "MODBUS_CLIENT": "$HOME_NET", "MODBUS_SERVER": "$HOME_NET", "ENIP_CLIENT": "$HOME_NET",
    "ENIP_SERVER": "$HOME_NET",
    "HTTP_PORTS": "[80,8080,8000,8008,8888]", "SHELLCODE_PORTS": "!80", "ORACLE_PORTS": "1521",
    "SSH_PORTS": "22", "DNP3_PORTS": "20000", "MODBUS_PORTS": "502", "FTP_PORTS": "21",
    "FILE_DATA_PORTS": "[$HTTP_PORTS,110,143]", "GENEVE_PORTS": "6081", "VXLAN_PORTS": "4789",
    "TEREDO_PORTS": "3544", "SMTP_PORTS": "[25,465,587]", "DNS_PORTS": "53",
}
PRIVATE_NETS = "[192.168.0.0/16,10.0.0.0/8,172.16.0.0/12,fc00::/7]"


class RuleError(ValueError):
    """One rule cannot be accepted; the message says why."""


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    sid: Optional[int]
    reason: str
    unsupported: bool = True     # False: a syntax error (the rule is not even well-formed)

    def __str__(self) -> str:
        sid = f" sid {self.sid}:" if self.sid is not None else ""
        return f"{self.file}:{self.line}:{sid} {self.reason}"


class RulesError(ValueError):
    """A rule set the policy refuses (on_unsupported = "fail" and problems were found)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")


# ---------------------------------------------------------------- address and port sets

class RangeSet:
    """A set of integers as sorted disjoint closed ranges, inside [0, top]."""

    __slots__ = ("top", "ranges")

    def __init__(self, top: int, ranges: Iterable[tuple[int, int]] = ()):
        self.top = top
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.ranges = tuple(merged)

    def union(self, o: "RangeSet") -> "RangeSet":
        return RangeSet(self.top, self.ranges + o.ranges)

    def complement(self) -> "RangeSet":
        out, at = [], 0
        for lo, hi in self.ranges:
            if lo > at:
                out.append((at, lo - 1))
            at = hi + 1
        if at <= self.top:
            out.append((at, self.top))
        return RangeSet(self.top, out)

    def minus(self, o: "RangeSet") -> "RangeSet":
        return self.complement().union(o).complement()

    def __contains__(self, v: int) -> bool:
        return any(lo <= v <= hi for lo, hi in self.ranges)

    def __eq__(self, o: object) -> bool:
        return isinstance(o, RangeSet) and (self.top, self.ranges) == (o.top, o.ranges)

    def is_empty(self) -> bool:
        return not self.ranges


@dataclass(frozen=True, eq=True)
class AddrSet:
    v4: RangeSet
    v6: RangeSet

    @staticmethod
    def any() -> "AddrSet":
        return AddrSet(RangeSet(2**32 - 1, [(0, 2**32 - 1)]), RangeSet(2**128 - 1, [(0, 2**128 - 1)]))

    @staticmethod
    def empty() -> "AddrSet":
        return AddrSet(RangeSet(2**32 - 1), RangeSet(2**128 - 1))

    def union(self, o: "AddrSet") -> "AddrSet":
        return AddrSet(self.v4.union(o.v4), self.v6.union(o.v6))

    def minus(self, o: "AddrSet") -> "AddrSet":
        return AddrSet(self.v4.minus(o.v4), self.v6.minus(o.v6))

    def complement(self) -> "AddrSet":
        return AddrSet(self.v4.complement(), self.v6.complement())

    def __contains__(self, addr) -> bool:
        a = ipaddress.ip_address(addr)
        return int(a) in (self.v4 if a.version == 4 else self.v6)

    def is_empty(self) -> bool:
        return self.v4.is_empty() and self.v6.is_empty()


def _split_list(text: str, what: str) -> list[str]:
    """Splits 'a,[b,c],d' at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise RuleError(f"{what}: unbalanced ']'")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise RuleError(f"{what}: unbalanced '['")
    out.append(cur.strip())
    if any(not x for x in out):
        raise RuleError(f"{what}: empty list element")
    return out


class Vars:
    """Rule variables ($HOME_NET, $HTTP_PORTS, ...): the policy's, over defaults from the NI."""

    def __init__(self, given: Optional[Mapping[str, str]] = None, home: Sequence = ()):
        self.values = dict(DEFAULT_VARS)
        self.cache: dict = {}       # parsed address and port specs (results are never mutated)
        nets = [str(ipaddress.ip_network(a, strict=False)) for a in home]
        self.values["HOME_NET"] = f"[{','.join(nets)}]" if nets else PRIVATE_NETS
        self.values["EXTERNAL_NET"] = "!$HOME_NET"
        for k, v in (given or {}).items():
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k):
                raise RuleError(f"variable name {k!r}: letters, digits and _")
            if isinstance(v, list):
                v = "[" + ",".join(str(x) for x in v) + "]"
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise RuleError(f"variable {k}: expected a string")
            self.values[k] = str(v)

    def get(self, name: str, depth: int) -> str:
        if depth > MAX_VAR_DEPTH:
            raise RuleError(f"${name}: variables nest too deep (a loop?)")
        if name not in self.values:
            raise RuleError(f"${name}: undefined variable (set it in [signatures] vars)")
        return self.values[name]


def parse_addr(text: str, vars: Vars, depth: int = 0) -> AddrSet:
    if depth == 0:                  # rule sets repeat a few address specs thousands of times
        hit = vars.cache.get(("a", text))
        if hit is None:
            hit = vars.cache[("a", text)] = _parse_addr(text, vars, 0)
        return hit
    return _parse_addr(text, vars, depth)


def _parse_addr(text: str, vars: Vars, depth: int) -> AddrSet:
    text = text.strip()
    what = f"address {text!r}"
    if depth > MAX_VAR_DEPTH:
        raise RuleError(f"{what}: nested too deep")
    if text.startswith("!"):
        return parse_addr(text[1:], vars, depth + 1).complement()
    if text.startswith("["):
        if not text.endswith("]"):
            raise RuleError(f"{what}: unbalanced '['")
        pos, neg = AddrSet.empty(), AddrSet.empty()
        any_pos = False
        for el in _split_list(text[1:-1], what):
            if el.startswith("!"):
                neg = neg.union(parse_addr(el[1:], vars, depth + 1))
            else:
                pos = pos.union(parse_addr(el, vars, depth + 1))
                any_pos = True
        return (pos if any_pos else AddrSet.any()).minus(neg)
    if text.startswith("$"):
        return parse_addr(vars.get(text[1:], depth), vars, depth + 1)
    if text == "any":
        return AddrSet.any()
    try:
        if "-" in text:
            lo, hi = (ipaddress.ip_address(x.strip()) for x in text.split("-", 1))
            if lo.version != hi.version or int(lo) > int(hi):
                raise ValueError
            r = [(int(lo), int(hi))]
        else:
            net = ipaddress.ip_network(text, strict=False)
            lo, r = net, [(int(net.network_address), int(net.broadcast_address))]
    except ValueError:
        raise RuleError(f"{what}: not an address, network, range, list or variable") from None
    e = AddrSet.empty()
    return AddrSet(RangeSet(e.v4.top, r), e.v6) if lo.version == 4 else AddrSet(e.v4, RangeSet(e.v6.top, r))


def parse_ports(text: str, vars: Vars, depth: int = 0) -> RangeSet:
    if depth == 0:
        hit = vars.cache.get(("p", text))
        if hit is None:
            hit = vars.cache[("p", text)] = _parse_ports(text, vars, 0)
        return hit
    return _parse_ports(text, vars, depth)


def _parse_ports(text: str, vars: Vars, depth: int) -> RangeSet:
    text = text.strip()
    what = f"port {text!r}"
    if depth > MAX_VAR_DEPTH:
        raise RuleError(f"{what}: nested too deep")
    full = RangeSet(65535, [(0, 65535)])
    if text.startswith("!"):
        return parse_ports(text[1:], vars, depth + 1).complement()
    if text.startswith("["):
        if not text.endswith("]"):
            raise RuleError(f"{what}: unbalanced '['")
        pos, neg, any_pos = RangeSet(65535), RangeSet(65535), False
        for el in _split_list(text[1:-1], what):
            if el.startswith("!"):
                neg = neg.union(parse_ports(el[1:], vars, depth + 1))
            else:
                pos, any_pos = pos.union(parse_ports(el, vars, depth + 1)), True
        return (pos if any_pos else full).minus(neg)
    if text.startswith("$"):
        return parse_ports(vars.get(text[1:], depth), vars, depth + 1)
    if text == "any":
        return full
    m = re.fullmatch(r"(\d{1,5})?(:)?(\d{1,5})?", text)
    if not m or not (m.group(1) or m.group(3)) or (m.group(3) and not m.group(2)):
        raise RuleError(f"{what}: not a port, range (a:b, a:, :b), list or variable")
    lo = int(m.group(1)) if m.group(1) else 0
    hi = int(m.group(3)) if m.group(3) else (65535 if m.group(2) else lo)
    if hi > 65535 or lo > hi:
        raise RuleError(f"{what}: ports are 0..65535, low before high")
    return RangeSet(65535, [(lo, hi)])


# ---------------------------------------------------------------- IR

@dataclass
class Content:
    pattern: bytes
    negated: bool = False
    nocase: bool = False
    offset: Optional[int] = None
    depth: Optional[int] = None
    distance: Optional[int] = None
    within: Optional[int] = None
    fast_pattern: bool = False
    fp_only: bool = False
    fp_chop: Optional[tuple[int, int]] = None
    buf: Optional[str] = None        # an HTTP buffer (http.uri, ...); None: the payload or stream

    @property
    def relative(self) -> bool:
        return self.distance is not None or self.within is not None


@dataclass
class Pcre:
    pattern: bytes
    flags: str = ""
    negated: bool = False
    buf: Optional[str] = None

    @property
    def relative(self) -> bool:
        return "R" in self.flags


@dataclass
class IsDataAt:
    value: int
    relative: bool = False
    negated: bool = False
    buf: Optional[str] = None


@dataclass
class Rule:
    action: str
    proto: str
    src: AddrSet
    sport: RangeSet
    bidirectional: bool
    dst: AddrSet
    dport: RangeSet
    sid: int
    rev: int = 1
    gid: int = 1
    msg: str = ""
    classtype: Optional[str] = None
    priority: Optional[int] = None
    metadata: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    flow: frozenset = frozenset()
    dsize: Optional[tuple[int, int, bool]] = None      # (lo, hi, negated), inclusive
    items: list = field(default_factory=list)          # Content | Pcre | IsDataAt, in rule order
    threshold: Optional[dict] = None
    detection_filter: Optional[dict] = None
    bsize: dict = field(default_factory=dict)           # HTTP buffer -> (lo, hi, negated): its length
    http_groups: dict = field(default_factory=dict)     # HG_* -> set of HTTP buffers (an HTTP rule)
    file: str = "<rules>"
    line: int = 0
    text: str = ""

    @property
    def mode(self) -> str:
        """'stream' (matched over the reassembled TCP stream) or 'packet' (each payload alone)."""
        if self.http_groups:
            return "http"
        if self.proto == "tcp-stream":
            return "stream"
        if self.proto != "tcp" or self.dsize is not None or "no_stream" in self.flow:
            return "packet"
        return "stream" if self.anchor()[0] != NO_ANCHOR else "packet"

    @property
    def direction(self) -> str:
        """'to_server', 'to_client' or 'any' (from the flow keyword)."""
        if self.flow & {"to_server", "from_client"}:
            return "to_server"
        if self.flow & {"to_client", "from_server"}:
            return "to_client"
        return "any"

    def anchor(self) -> tuple[int, int, int]:
        """(item index, offset, length) of the fast pattern Hyperscan looks for, or NO_ANCHOR."""
        best = None
        for i, it in enumerate(self.items):
            if isinstance(it, Content) and it.fast_pattern:
                off, ln = it.fp_chop or (0, len(it.pattern))
                return i, off, ln
        for i, it in enumerate(self.items):
            if isinstance(it, Content) and not it.negated and (
                    best is None or len(it.pattern) > len(self.items[best].pattern)):
                best = i
        if best is not None:
            return best, 0, len(self.items[best].pattern)
        for i, it in enumerate(self.items):
            if isinstance(it, Pcre) and not it.negated:
                return i, 0, 0
        return NO_ANCHOR, 0, 0

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def matches_header(self, proto: str, src: str, sport: int, dst: str, dport: int) -> bool:
        """The rule's protocol, addresses and ports against one packet's (both ways if <>)."""
        mine = "tcp" if self.proto in ("http", "http1") else self.proto.split("-")[0]
        if self.proto not in ("ip",) and proto != mine:
            return False

        def one(s, sp, d, dp):
            return s in self.src and sp in self.sport and d in self.dst and dp in self.dport
        return one(src, sport, dst, dport) or (self.bidirectional and one(dst, dport, src, sport))


# ---------------------------------------------------------------- the text

def logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, rule text) for each rule: comments and blank lines skipped, lines
    ending in a backslash continued."""
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not buf:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = no
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        yield start, buf.strip()
        buf = ""
    if buf.strip():
        yield start, buf.strip()


def _split_options(body: str) -> list[tuple[str, Optional[str]]]:
    """'k:v; k2; ...' into (key, raw value) pairs; ';' inside a value is escaped as '\\;'.

    Linear time by construction (str.find and a backslash count per ';'): a backtracking regex
    here took exponential time on an option without its ';'."""
    out, start, i = [], 0, 0
    while (j := body.find(";", i)) >= 0:
        k = j
        while k > start and body[k - 1] == "\\":
            k -= 1
        i = j + 1
        if (j - k) % 2:             # an odd run of backslashes escapes this ';'
            continue
        out.append(body[start:j])
        start = i
    rest = body[start:]
    if rest.strip():
        raise RuleError(f"option {rest.strip()[:40]!r} is not ended by ';'")
    opts = []
    for o in out:
        o = o.strip()
        if not o:
            raise RuleError("an empty option (';;')")
        k, sep, v = o.partition(":")
        k = k.strip()
        if not re.fullmatch(r"[a-z0-9_.\-]+", k):
            raise RuleError(f"option name {k[:40]!r} is not a keyword")
        opts.append((k, v.strip() if sep else None))
    return opts


def _unquote(v: Optional[str], what: str) -> tuple[bool, str]:
    """'!"x"' -> (True, 'x') with the quotes' content still escaped."""
    if v is None:
        raise RuleError(f"{what} needs a value")
    neg = v.startswith("!")
    if neg:
        v = v[1:].lstrip()
    if len(v) < 2 or v[0] != '"' or v[-1] != '"' or (v[-2] == "\\" and not v.endswith('\\\\"')):
        raise RuleError(f"{what}: expected a quoted string")
    return neg, v[1:-1]


def _unescape_text(s: str, what: str) -> str:
    out, i = "", 0
    while i < len(s):
        if s[i] == "\\":
            if i + 1 >= len(s) or s[i + 1] not in '";\\:':
                raise RuleError(f"{what}: bad escape {s[i:i + 2]!r} (allowed: \\\" \\; \\: \\\\)")
            out += s[i + 1]
            i += 2
        elif s[i] == '"':
            raise RuleError(f"{what}: an unescaped '\"' inside the string")
        else:
            out += s[i]
            i += 1
    return out


def decode_content(s: str) -> bytes:
    """A content string's bytes: |41 42| hex blocks, \\" \\; \\: \\\\ escapes."""
    out = bytearray()
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "|":
            j = s.find("|", i + 1)
            if j < 0:
                raise RuleError("content: an unterminated |hex| block")
            hexs = s[i + 1:j].replace(" ", "")
            if not re.fullmatch(r"([0-9A-Fa-f]{2})*", hexs) or not hexs:
                raise RuleError(f"content: bad hex block |{s[i + 1:j]}|")
            out += bytes.fromhex(hexs)
            i = j + 1
        elif ch == "\\":
            if i + 1 >= len(s) or s[i + 1] not in '";\\:':
                raise RuleError(f"content: bad escape {s[i:i + 2]!r} (allowed: \\\" \\; \\: \\\\)")
            out.append(ord(s[i + 1]))
            i += 2
        elif ch == '"':
            raise RuleError("content: an unescaped '\"' inside the string")
        else:
            b = ch.encode()
            out += b
            i += 1
    return bytes(out)


THRESHOLD_COUNT_MAX = 1_000_000         # VN_SIG_TRACK_COUNT_MAX
THRESHOLD_SECONDS_MAX = 7 * 86400       # VN_SIG_TRACK_SECONDS_MAX


def _int(v: Optional[str], what: str, lo: int, hi: int) -> int:
    if v is None or not re.fullmatch(r"-?\d{1,10}", v.strip()):
        raise RuleError(f"{what}: expected an integer, not {v!r}")
    n = int(v)
    if not lo <= n <= hi:
        raise RuleError(f"{what}: {n} is outside {lo}..{hi}")
    return n


def _threshold(v: Optional[str], what: str, need_type: bool) -> dict:
    if v is None:
        raise RuleError(f"{what} needs a value")
    d = {}
    for part in v.split(","):
        k, _, val = part.strip().partition(" ")
        k, val = k.strip(), val.strip()
        if k in d or k not in ("type", "track", "count", "seconds"):
            raise RuleError(f"{what}: unknown or repeated {k!r}")
        d[k] = val
    if need_type and d.get("type") not in ("limit", "threshold", "both"):
        raise RuleError(f"{what}: type limit, threshold or both")
    if not need_type and "type" in d:
        raise RuleError(f"{what}: detection_filter has no type")
    if d.get("track") not in ("by_src", "by_dst", "by_rule", "by_both"):
        raise RuleError(f"{what}: track by_src, by_dst, by_rule or by_both")
    # bounded as the C stage checks them (csrc/sigstage.h): a count past a million or a window
    # past a week is a typo or a way to pin tracker slots, not a rule
    d["count"] = _int(d.get("count"), f"{what} count", 1, THRESHOLD_COUNT_MAX)
    d["seconds"] = _int(d.get("seconds"), f"{what} seconds", 1, THRESHOLD_SECONDS_MAX)
    return d


def _dsize(v: Optional[str]) -> tuple[int, int, bool]:
    s = (v or "").replace(" ", "")
    top = 65535
    if m := re.fullmatch(r"(\d+)<>(\d+)", s):
        lo, hi = int(m.group(1)) + 1, int(m.group(2)) - 1
        if lo > hi:
            raise RuleError("dsize: N<>M needs N < M - 1 (both ends excluded)")
        return lo, min(hi, top), False
    m = re.fullmatch(r"(<=|>=|<|>|!|=)?(\d+)", s)
    if not m or int(m.group(2)) > top:
        raise RuleError(f"dsize: expected N, <N, >N, <=N, >=N, !N or N<>M (N <= {top}), not {v!r}")
    op, n = m.group(1) or "=", int(m.group(2))
    if op == "<":
        if n == 0:
            raise RuleError("dsize:<0 can never match")
        return 0, n - 1, False
    if op == ">":
        return n + 1, top, False
    return {"<=": (0, n, False), ">=": (n, top, False), "!": (n, n, True), "=": (n, n, False)}[op]


def _pcre(v: Optional[str]) -> Pcre:
    neg, raw = _unquote(v, "pcre")
    if not raw.startswith("/") or raw.count("/") < 2:
        raise RuleError("pcre: expected \"/regex/flags\"")
    end = raw.rindex("/")
    pattern, flags = raw[1:end], raw[end + 1:]
    if not pattern:
        raise RuleError("pcre: an empty pattern")
    buf = None
    for f in flags:
        if f in PCRE_HTTP_FLAGS:
            if buf is not None:
                raise RuleError("pcre: two HTTP buffer flags")
            buf = PCRE_HTTP_FLAGS[f]
        elif f in _PCRE_L7_FLAGS:
            raise RuleError(f"pcre flag {f!r} selects a buffer this stage does not have (response bodies)")
        elif f not in _PCRE_FLAGS and f not in _PCRE_NOOP_FLAGS:
            raise RuleError(f"pcre: unknown flag {f!r}")
    if len(set(flags)) != len(flags):
        raise RuleError("pcre: a repeated flag")
    # '\;' and '\"' are rule-level escapes: PCRE reads them as literal ';' and '"' too
    data = pattern.encode()
    if len(data) > MAX_PATTERN or b"\0" in data:
        raise RuleError(f"pcre: longer than {MAX_PATTERN} bytes or holds a NUL")
    return Pcre(data, "".join(f for f in flags if f not in PCRE_HTTP_FLAGS), neg, buf)


def _l7(key: str) -> bool:
    return key.startswith(_L7_PREFIXES)


def parse_rule(text: str, vars: Vars, file: str = "<rules>", line: int = 0) -> Rule:
    """One rule's text into a Rule, or RuleError saying why it cannot be enforced exactly."""
    if len(text) > MAX_RULE_CHARS:
        raise RuleError(f"longer than {MAX_RULE_CHARS} characters")
    op = text.find("(")
    if op < 0 or not text.endswith(")"):
        raise RuleError("expected 'action proto src sport -> dst dport (options)'")
    head, body = text[:op].strip(), text[op + 1:-1]
    # header tokens; [a, b] lists may contain blanks
    toks, depth, cur = ([], 0, "") if "[" in head else (head.split(), 0, "")
    for ch in head if "[" in head else "":
        depth += ch == "["
        depth -= ch == "]"
        if ch.isspace() and depth == 0:
            if cur:
                toks.append(cur)
            cur = ""
        else:
            cur += ch.replace(" ", "")
    if cur:
        toks.append(cur)
    if len(toks) != 7:
        raise RuleError(f"header {head!r}: expected 'action proto src sport -> dst dport'")
    action, proto, src, sport, arrow, dst, dport = toks
    if action not in ACTIONS:
        raise RuleError(f"action {action!r}: expected one of {', '.join(ACTIONS)}")
    if proto not in PROTOCOLS:
        raise RuleError(f"protocol {proto!r} needs the L7 stage or is unknown "
                        f"(supported: {', '.join(PROTOCOLS)})")
    if arrow not in ("->", "<>"):
        raise RuleError(f"direction {arrow!r}: expected -> or <>")
    rule = Rule(action=action, proto=proto, src=parse_addr(src, vars), sport=parse_ports(sport, vars),
                bidirectional=arrow == "<>", dst=parse_addr(dst, vars), dport=parse_ports(dport, vars),
                sid=0, file=file, line=line, text=text)
    if rule.src.is_empty() or rule.dst.is_empty() or rule.sport.is_empty() or rule.dport.is_empty():
        raise RuleError("an address or port set is empty (negated everything): the rule can never match")
    if proto in ("icmp",) and (sport != "any" or dport != "any"):
        raise RuleError("icmp has no ports: use any")
    seen: set[str] = set()
    last: Optional[Content] = None
    flow: set[str] = set()
    cur: Optional[str] = None           # the sticky buffer the next contents read (None: payload)
    urilen = None
    for key, val in _split_options(body):
        once = key in ("msg", "sid", "rev", "gid", "classtype", "priority", "flow", "dsize",
                       "threshold", "detection_filter")
        if once and key in seen:
            raise RuleError(f"{key} given twice")
        seen.add(key)
        if key == "msg":
            rule.msg = _unescape_text(_unquote(val, "msg")[1], "msg")
        elif key == "sid":
            rule.sid = _int(val, "sid", 1, 2**32 - 1)
        elif key == "rev":
            rule.rev = _int(val, "rev", 0, 2**32 - 1)
        elif key == "gid":
            rule.gid = _int(val, "gid", 0, 2**32 - 1)
        elif key == "classtype":
            if not val or not re.fullmatch(r"[A-Za-z0-9_\-]+", val):
                raise RuleError(f"classtype {val!r}: a name")
            rule.classtype = val
        elif key == "priority":
            rule.priority = _int(val, "priority", 1, 255)
        elif key == "metadata":
            rule.metadata += [m.strip() for m in (val or "").split(",") if m.strip()]
        elif key == "reference":
            rule.references.append(val or "")
        elif key in ("target", "rawbytes"):
            pass
        elif key in ("content", "uricontent"):
            neg, raw = _unquote(val, key)
            pat = decode_content(raw)
            if not pat:
                raise RuleError(f"{key}: empty")
            if len(pat) > MAX_PATTERN:
                raise RuleError(f"{key}: longer than {MAX_PATTERN} bytes")
            if key == "uricontent" and cur is not None:
                raise RuleError("uricontent inside a sticky buffer")
            last = Content(pat, negated=neg, buf="http.uri" if key == "uricontent" else cur)
            rule.items.append(last)
        elif key == "pcre":
            pc = _pcre(val)
            if pc.buf is not None and cur is not None:
                raise RuleError(f"pcre with an HTTP buffer flag inside the sticky buffer {cur}")
            pc.buf = pc.buf or cur
            rule.items.append(pc)
            last = None
        elif key in HTTP_BUFFERS or (key in HTTP_LEGACY and key not in HTTP_CONTENT_MODIFIERS):
            if val is not None:
                raise RuleError(f"{key} takes no value")
            cur = HTTP_LEGACY.get(key, key)
            last = None
        elif key in HTTP_CONTENT_MODIFIERS:
            if val is not None:
                raise RuleError(f"{key} takes no value")
            if last is None or cur is not None:
                raise RuleError(f"{key} must follow a content outside a sticky buffer")
            if last.buf is not None:
                raise RuleError(f"{key}: the content is already in {last.buf}")
            last.buf = HTTP_LEGACY[key]
        elif key == "pkt_data":
            cur, last = None, None
        elif key in _HTTP_NOT_YET:
            raise RuleError(f"{key}: HTTP response bodies are not inspected (yet)")
        elif key == "urilen":
            if urilen is not None:
                raise RuleError("urilen given twice")
            v, _, kind = (val or "").partition(",")
            kind = kind.strip() or "norm"
            if kind not in ("norm", "raw"):
                raise RuleError(f"urilen: norm or raw, not {kind!r}")
            urilen = ("http.uri" if kind == "norm" else "http.uri.raw", _dsize(v.replace("urilen", "")))
        elif key == "bsize":
            if cur is None:
                raise RuleError("bsize needs a sticky buffer before it (http.uri, http.header, ...)")
            if cur in rule.bsize:
                raise RuleError(f"bsize given twice for {cur}")
            rule.bsize[cur] = _dsize(val)
        elif key == "isdataat":
            parts = [p.strip() for p in (val or "").split(",")]
            neg = parts[0].startswith("!")
            n = _int(parts[0].lstrip("!"), "isdataat", 0, 65535 * 16)
            for p in parts[1:]:
                if p not in ("relative", "rawbytes"):
                    raise RuleError(f"isdataat: unknown option {p!r}")
            rule.items.append(IsDataAt(n, "relative" in parts[1:], neg, cur))
            last = None
        elif key in ("nocase", "offset", "depth", "distance", "within", "fast_pattern", "startswith"):
            if last is None:
                raise RuleError(f"{key} must follow a content")
            _modifier(last, key, val, rule)
        elif key == "flow":
            for f in (val or "").split(","):
                f = f.strip()
                if f in ("only_frag", "no_frag"):
                    raise RuleError(f"flow:{f} is not supported yet")
                if f not in ("to_server", "from_client", "to_client", "from_server", "established",
                             "not_established", "stateless", "only_stream", "no_stream"):
                    raise RuleError(f"flow: unknown option {f!r}")
                flow.add(f)
            if flow & {"to_server", "from_client"} and flow & {"to_client", "from_server"}:
                raise RuleError("flow: both directions at once")
            if {"established", "not_established"} <= flow or {"only_stream", "no_stream"} <= flow:
                raise RuleError("flow: contradictory options")
        elif key == "dsize":
            rule.dsize = _dsize(val)
        elif key == "threshold":
            rule.threshold = _threshold(val, "threshold", True)
        elif key == "detection_filter":
            rule.detection_filter = _threshold(val, "detection_filter", False)
        elif key in _UNSUPPORTED:
            raise RuleError(f"{key}: {_UNSUPPORTED[key]}")
        elif _l7(key):
            raise RuleError(f"{key}: an application-layer keyword this stage does not have")
        elif "." in key:
            raise RuleError(f"{key}: a buffer or header field the payload stage does not have")
        else:
            raise RuleError(f"{key}: unknown keyword")
    rule.flow = frozenset(flow)
    if not rule.sid:
        raise RuleError("no sid")
    if urilen is not None:
        if urilen[0] in rule.bsize:
            raise RuleError(f"urilen and bsize both on {urilen[0]}")
        rule.bsize[urilen[0]] = urilen[1]
    _http_groups(rule)
    if len(rule.items) > MAX_ITEMS:
        raise RuleError(f"more than {MAX_ITEMS} content/pcre/isdataat")
    if sum(1 for it in rule.items if isinstance(it, Content) and it.fast_pattern) > 1:
        raise RuleError("fast_pattern on more than one content")
    for it in rule.items:
        if isinstance(it, Content) and it.fp_only and (
                it.negated or it.offset is not None or it.depth is not None or it.relative):
            raise RuleError("fast_pattern:only cannot be combined with offset/depth/distance/within")
        if isinstance(it, Content) and rule.dsize is not None and not it.negated and not it.relative:
            if (it.offset or 0) + len(it.pattern) > rule.dsize[1] and not rule.dsize[2]:
                raise RuleError(f"content {it.pattern[:20]!r} cannot fit in dsize (at most "
                                f"{rule.dsize[1]} bytes): the rule can never match")
    if rule.proto == "tcp-stream" and rule.anchor()[0] == NO_ANCHOR:
        raise RuleError("tcp-stream rules need a positive content or pcre")
    if rule.proto == "tcp-stream" and rule.dsize is not None:
        raise RuleError("dsize is per packet: not with tcp-stream")
    if rule.proto == "tcp-pkt" and "only_stream" in flow:
        raise RuleError("tcp-pkt with flow:only_stream")
    if "only_stream" in flow and rule.mode not in ("stream", "http"):
        raise RuleError("flow:only_stream needs a positive content or pcre and no dsize")
    return rule


def _http_groups(rule: Rule) -> None:
    """An HTTP rule (protocol http, or contents in HTTP buffers): the groups (request head,
    request body, response head) it is matched in, and the buffers it needs in each; a rule
    the stage cannot match exactly as Suricata does is refused here."""
    bufs = {it.buf for it in rule.items if it.buf} | set(rule.bsize)
    if rule.proto not in ("http", "http1") and not bufs:
        return
    if rule.proto not in ("tcp", "http", "http1"):
        raise RuleError(f"HTTP buffers on a {rule.proto} rule: HTTP is over tcp")
    if any(it.buf is None for it in rule.items):
        raise RuleError("payload contents (no HTTP buffer) in an HTTP rule: not supported yet")
    if rule.dsize is not None:
        raise RuleError("dsize in an HTTP rule: use bsize or urilen")
    if rule.flow & {"stateless", "no_stream"}:
        raise RuleError("HTTP buffers need the connection's stream: not with flow:stateless/no_stream")
    sides = {HTTP_BUFFERS[b][1] for b in bufs}
    d = rule.direction
    if {"req", "resp"} <= sides:
        raise RuleError("request and response buffers in one rule: not supported yet")
    if "req" in sides:
        if d == "to_client":
            raise RuleError("request buffers with flow:to_client: the rule could never match")
        groups = {HG_REQ_BODY if "http.request_body" in bufs else HG_REQ: bufs or {"http.method"}}
    elif "resp" in sides:
        if d == "to_server":
            raise RuleError("response buffers with flow:to_server: the rule could never match")
        groups = {HG_RESP: bufs}
    else:
        # buffers both messages have (or none: any request, any response)
        groups = {}
        if d != "to_client":
            groups[HG_REQ] = bufs or {"http.method"}
        if d != "to_server":
            groups[HG_RESP] = bufs or {"http.stat_code"}
    rule.http_groups = groups


def _modifier(c: Content, key: str, val: Optional[str], rule: Rule) -> None:
    big = 2**30
    if key == "nocase":
        if val is not None or c.nocase:
            raise RuleError("nocase takes no value and is given once")
        c.nocase = True
        return
    if key == "fast_pattern":
        if c.fast_pattern:
            raise RuleError("fast_pattern given twice")
        if c.negated:
            raise RuleError("fast_pattern on a negated content")
        c.fast_pattern = True
        c.fp_only = val == "only"
        if val is not None and val != "only":
            m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", val)
            if not m or int(m.group(2)) == 0 or int(m.group(1)) + int(m.group(2)) > len(c.pattern):
                raise RuleError(f"fast_pattern:{val}: expected only or offset,length within the content")
            c.fp_chop = (int(m.group(1)), int(m.group(2)))
        return
    if key == "startswith":
        if val is not None or c.offset is not None or c.depth is not None or c.relative:
            raise RuleError("startswith takes no value and excludes offset/depth/distance/within")
        c.offset, c.depth = 0, len(c.pattern)
        return
    if getattr(c, key) is not None:
        raise RuleError(f"{key} given twice for one content")
    if key == "distance":
        n = _int(val, key, -65535, big)
    else:
        n = _int(val, key, 0, big)
    setattr(c, key, n)
    if (c.offset is not None or c.depth is not None) and c.relative:
        raise RuleError("a content cannot mix offset/depth with distance/within")
    if key == "depth" and n < len(c.pattern):
        raise RuleError(f"depth {n} is shorter than the content ({len(c.pattern)} bytes)")
    if key == "within" and n < len(c.pattern):
        raise RuleError(f"within {n} is shorter than the content ({len(c.pattern)} bytes)")


# ---------------------------------------------------------------- rule sets

@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.rules)

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def groups(self) -> dict[tuple[str, str, str], list[Rule]]:
        """Rules by (mode, protocol, direction): one matcher database each."""
        out: dict = {}
        for r in self.rules:
            proto = "tcp" if r.proto.startswith("tcp") else r.proto
            out.setdefault((r.mode, proto, r.direction), []).append(r)
        return out


def parse_rules(text: str, vars: Vars, file: str = "<rules>", into: Optional[RuleSet] = None) -> RuleSet:
    """Every rule of one file's text; the ones that cannot be enforced become problems."""
    rs = into if into is not None else RuleSet()
    sids = {(r.gid, r.sid): r for r in rs.rules}
    for line, rule_text in logical_lines(text):
        try:
            rule = parse_rule(rule_text, vars, file, line)
        except RuleError as exc:
            m = re.search(r"\bsid\s*:\s*(\d+)\s*;", rule_text)
            rs.problems.append(Problem(file, line, int(m.group(1)) if m else None, str(exc)))
            continue
        if (rule.gid, rule.sid) in sids:
            first = sids[(rule.gid, rule.sid)]
            rs.problems.append(Problem(file, line, rule.sid, f"duplicate sid (first at {first.where()})"))
            continue
        if len(rs.rules) >= MAX_RULES:
            rs.problems.append(Problem(file, line, rule.sid, f"more than {MAX_RULES} rules"))
            continue
        sids[(rule.gid, rule.sid)] = rule
        rs.rules.append(rule)
    return rs


def load_rule_files(paths: Sequence[str], vars: Vars) -> RuleSet:
    rs = RuleSet()
    for path in paths:
        try:
            # a regular file only: a FIFO or a device would block the worker compiling it forever
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                raw = f.read(64 << 20)
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            rs.problems.append(Problem(path, 0, None, f"cannot read: {exc}", unsupported=False))
            continue
        parse_rules(text, vars, path, rs)
    return rs


# ---------------------------------------------------------------- the C engine's input

def encode(rules: Sequence[Rule], ids: Optional[Sequence[int]] = None) -> bytes:
    """The blob csrc/sig.c's vn_sig_db_build reads: rule ids are ``ids`` (default: indexes
    into ``rules``)."""
    out = [b"VSG1", struct.pack("<I", len(rules))]
    for idx, r in zip(ids if ids is not None else range(len(rules)), rules):
        flags, lo, hi = 0, 0, 0
        if r.dsize is not None:
            lo, hi, neg = r.dsize
            flags = R_DSIZE | (R_DSIZE_NOT if neg else 0)
        anchor, aoff, alen = r.anchor()
        out.append(struct.pack("<8I", idx, flags, lo, hi, len(r.items), anchor, aoff, alen))
        for it in r.items:
            off = depth = dist = within = 0
            pf = 0
            if isinstance(it, Content):
                kind, data = K_CONTENT, it.pattern
                f = (I_NEGATED if it.negated else 0) | (I_NOCASE if it.nocase else 0)
                if it.offset is not None:
                    f, off = f | I_OFFSET, it.offset
                if it.depth is not None:
                    f, depth = f | I_DEPTH, it.depth
                if it.distance is not None:
                    f, dist = f | I_DISTANCE | I_RELATIVE, it.distance
                if it.within is not None:
                    f, within = f | I_WITHIN | I_RELATIVE, it.within
            elif isinstance(it, Pcre):
                kind, data = K_PCRE, it.pattern
                f = (I_NEGATED if it.negated else 0) | (I_RELATIVE if it.relative else 0)
                for ch in it.flags:
                    pf |= _PCRE_FLAGS.get(ch, 0)
            else:
                kind, data = K_ISDATAAT, b""
                f = (I_NEGATED if it.negated else 0) | (I_RELATIVE if it.relative else 0)
                off = it.value
            out.append(struct.pack("<IiiiiII", kind | f << 8, off, depth, dist, within, pf, len(data)))
            out.append(data)
    return b"".join(out)
