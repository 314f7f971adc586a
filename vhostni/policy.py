"""NI policy: what the administrator allows on one NI, parsed, validated and compiled.

A policy file (TOML or JSON) holds the NI's anti-spoofing identity, prevent rules (a header
firewall applied in C), the scanners to run with their rights (which subscriptions each may
hold, with read or contain rights) and pre-registered injections, what a quarantined NI may
still exchange (``[quarantine] allow``, matches) and the NI's own containment action when a
scanner alerts (``[ni] on_alert``).  Errors name the key:
``scanner[0].allow[1].dport: port 70000 out of range``.

A *match* (a prevent rule, a right, or a scanner's subscription request) is a table of
optional keys: ``direction`` (from_guest, to_guest, both), ``ethertype`` (ipv4, ipv6, arp,
or a number; the innermost type, inside VLAN tags and LLC/SNAP), ``proto`` (tcp, udp, icmp, icmpv6, sctp or a number), ``src`` and ``dst``
(CIDR), ``sport`` and ``dport`` (a port, "lo-hi" or [lo, hi]), ``tcp_flags`` ("syn,!ack":
listed flags set, !-prefixed clear) and ``terms`` (raw [{offset, value, mask}] byte tests on
the frame, hex strings).  A subscription is granted only if it is at least as narrow as
one of the scanner's rights (every constraint of the right holds for it).

A subscription or right (not a prevent or quarantine rule: those run before the flow stage)
may add ``flow = "new"``: only the frames that open their flow in their direction, in the
NI's flow table (csrc/flow.c, one entry per 5-tuple): a flow's first frame, and every later
one that way until one of them left the NI (forwarded unheld, or passed by every scanner
holding it).  So a scanner that decides destinations holds a UDP flow's or an echo's first
datagram, not the rest; a frame it cut leaves the flow unopened, so the next one is held
too, and frames that come while the first waits for its decision are held with it.  A
frame the flow stage cannot put in a flow (a later fragment whose first was not seen, an
unparsed header let through, ICMP other than echo-like, the table full with ``flows_over =
pass``) counts as opening one: it is matched (held), never waved through.  Such a
subscription turns the flow stage on for the NI.  A right without ``flow`` covers a
subscription with it (it is narrower); a right with it covers only such subscriptions.
TCP data that a stream subscription held meets frame subscriptions again when released, and
then counts as opening its flow (no flow stage sees it there); a SYN that reuses the 5-tuple of a
connection still in the table does not open a new flow: for TCP, match ``tcp_flags`` instead.

A *stream* right or subscription (``stream = true``) names reconstructed TCP streams instead
of frames: ``port`` (the server port, i.e. the destination port of the connection's SYN; a
port, "lo-hi" or [lo, hi]; all ports if absent) and ``direction`` (which bytes: from_guest,
to_guest or both, the default).  A stream subscription is granted only if its ports and
directions lie within one of the scanner's stream rights (and contain only if that right
has contain).

A *flows* right or subscription (``flows = true``) names the events of the NI's flow stage
(csrc/flow.c: one entry per 5-tuple, both directions) instead of frames: ``proto`` (a
protocol name or number, or a list of them; all if absent), ``direction`` (who opened the
flow: from_guest, to_guest, or both, the default) and, in a subscription only, ``events``
(open, state, close, summary; all if absent).  Flows are read rights only: an event
reports, it holds nothing.  A flows subscription is granted only if its protocols and
directions lie within one of the scanner's flows rights.  The stage runs on an NI only
while a scanner subscribes to flows or ``[ni] flows = true``; ``[ni] flows_max`` bounds its
table (``flows_over``: drop, fail closed, or pass), ``flow_events_max`` the events waiting
for the kernel, ``flow_tcp_idle_ms``, ``flow_udp_idle_ms`` and ``flow_other_idle_ms`` expire
idle flows, ``flow_tcp_syn_ms`` is how long a SYN waits for its answer (and how long a reset
or finished connection lingers) and ``flow_summary_ms`` how often a long flow is summarised
(0: never).

``[[scanner.inject]]`` pre-registers what a scanner may put on the wire, by index or name:
``{name, frame}`` a whole Ethernet frame (hex), or ``{name, stream}`` / ``{name, stream_hex}``
bytes a contain scanner may insert into a TCP stream it holds (text, as given: TOML basic
strings write CR LF as ``\\r\\n``; or hex).  The two kinds are numbered separately, each in
the order of the array (``ScannerSpec.injections`` and ``.stream_injections``): a scanner
never chooses the bytes it sends, only which of the administrator's.  ``resets = true`` on a
``[[scanner]]`` lets it have the NI send TCP resets from the guest's own addresses
(``Scanner.reset``, to repair a SYN bomb's victim): the NI builds them, from an address
in ``[ni] addresses`` and the guest's MAC, and sends them through the guest's own checks.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ._fastpath import ffi, lib
from .scanner import wire

DIR_FROM = lib.VN_DIR_FROM_GUEST
DIR_TO = lib.VN_DIR_TO_GUEST
DIRECTIONS = {"from_guest": DIR_FROM, "to_guest": DIR_TO, "both": DIR_FROM | DIR_TO}
ETHERTYPES = {"ipv4": 0x0800, "ipv6": 0x86DD, "arp": 0x0806}  # the innermost type (csrc/parse.c)
PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20,
             "ece": 0x40, "cwr": 0x80}
MATCH_KEYS = {"direction", "ethertype", "proto", "src", "dst", "sport", "dport", "tcp_flags", "terms",
              "flow"}
# a match's ``flow`` key (subscriptions and rights only): "new", frames that open their flow
FLOW_MATCH = ("new",)
# [ni] on_alert: what the NI does by itself when one of its scanners raises an alert
# (none; quarantine, see [quarantine]; link-down: QEMU's set_link plus dropping every frame).
ON_ALERT = ("none", "quarantine", "link-down")
# [ni] tcp_midstream: data of a TCP connection the NI never saw open, on a port a stream
# subscription covers (after a daemon restart, say): what the fast path does with it
# (with tcp_flows_over = "pass" such data passes: it may be a connection the full flow
# table let through uninspected)
MIDSTREAM = {"drop": lib.VN_MIDSTREAM_DROP, "reset": lib.VN_MIDSTREAM_RESET,
             "pass": lib.VN_MIDSTREAM_PASS, "adopt": lib.VN_MIDSTREAM_ADOPT}
# the longest stream injection (csrc/vhostni.h VN_TCP_INJECT_MAX: what vn_stream_inject takes)
STREAM_INJECT_MAX = 65536
INJECT_KEYS = ("frame", "stream", "stream_hex")
NI_NAME_MAX = 32       # NI names are 1-32 of [A-Za-z0-9_.-] (vhostni.cli, admin/state.py)
# how deeply a policy document may nest at all: a scanner's config sits 3 levels down
# (document, scanner array, scanner table) and may nest as deep as the wire lets its hello
DOC_MAX_DEPTH = wire.MAX_DEPTH + 3


class PolicyError(ValueError):
    """A policy (or a scanner's request) that does not validate; names the bad key."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Match:
    dirs: int = 0
    ethertype: int = 0
    proto: int = -1
    src: Optional[ipaddress._BaseNetwork] = None
    dst: Optional[ipaddress._BaseNetwork] = None
    sport: tuple[int, int] = (0, 0xFFFF)
    dport: tuple[int, int] = (0, 0xFFFF)
    flags_mask: int = 0
    flags_value: int = 0
    terms: tuple[tuple[int, bytes, bytes], ...] = ()
    flow_new: bool = False     # flow = "new": only frames that open their flow

    def directions(self) -> int:
        return self.dirs or (DIR_FROM | DIR_TO)

    def within(self, right: "Match") -> bool:
        """True if every frame this matches, ``right`` matches too (sufficient test)."""
        if self.directions() & ~right.directions():
            return False
        if right.ethertype and self.ethertype != right.ethertype:
            return False
        if right.proto >= 0 and self.proto != right.proto:
            return False
        if right.flow_new and not self.flow_new:
            return False       # a right to flow-opening frames only does not cover the rest
        for mine, theirs in ((self.src, right.src), (self.dst, right.dst)):
            if theirs is not None and (mine is None or mine.version != theirs.version
                                       or not mine.subnet_of(theirs)):
                return False
        for mine, theirs in ((self.sport, right.sport), (self.dport, right.dport)):
            if not (theirs[0] <= mine[0] and mine[1] <= theirs[1]):
                return False
        if right.flags_mask & ~self.flags_mask:
            return False
        if (self.flags_value & right.flags_mask) != right.flags_value:
            return False
        for off, val, mask in right.terms:
            if not any(_term_implies(t, (off, val, mask)) for t in self.terms):
                return False
        return True

    def fill(self, c) -> None:
        """Writes this match into a ``struct vn_match``."""
        c.dirs = self.dirs
        c.ethertype = self.ethertype
        c.proto = self.proto
        for net, fam, plen, addr in ((self.src, "src_family", "src_plen", "src"),
                                     (self.dst, "dst_family", "dst_plen", "dst")):
            if net is None:
                setattr(c, fam, 0)
                continue
            setattr(c, fam, net.version)
            setattr(c, plen, net.prefixlen)
            raw = net.network_address.packed
            getattr(c, addr)[0:len(raw)] = raw
        c.sport_lo, c.sport_hi = self.sport
        c.dport_lo, c.dport_hi = self.dport
        c.tcp_flags_mask = self.flags_mask
        c.tcp_flags_value = self.flags_value
        c.flow_new = 1 if self.flow_new else 0
        c.nterms = len(self.terms)
        for i, (off, val, mask) in enumerate(self.terms):
            c.terms[i].offset = off
            c.terms[i].len = len(val)
            c.terms[i].value[0:len(val)] = val
            c.terms[i].mask[0:len(mask)] = mask


def _term_implies(mine, theirs) -> bool:
    """Does term ``mine`` (a request's) imply term ``theirs`` (a right's)?"""
    moff, mval, mmask = mine
    toff, tval, tmask = theirs
    for k in range(len(tval)):
        pos = toff + k - moff
        # even a byte the right does not care about needs the frame to reach it (the C
        # matcher fails a term that runs past the frame's end), so ``mine`` must cover it
        if not 0 <= pos < len(mval):
            return False
        if tmask[k] == 0:
            continue
        if (mmask[pos] & tmask[k]) != tmask[k] or (mval[pos] & tmask[k]) != (tval[k] & tmask[k]):
            return False
    return True


def _port_range(where: str, v: Any) -> tuple[int, int]:
    if isinstance(v, bool):
        raise PolicyError(where, "expected a port, 'lo-hi' or [lo, hi]")
    if isinstance(v, int):
        lo = hi = v
    elif isinstance(v, str) and re.fullmatch(r"\d+(-\d+)?", v.strip()):
        a, _, b = v.strip().partition("-")
        lo, hi = int(a), int(b or a)
    elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        lo, hi = v
    else:
        raise PolicyError(where, f"expected a port, 'lo-hi' or [lo, hi], not {v!r}")
    if not (0 <= lo <= hi <= 0xFFFF):
        raise PolicyError(where, f"port range {lo}-{hi} out of 0-65535")
    return lo, hi


def _named_int(where: str, v: Any, names: dict, limit: int) -> int:
    if isinstance(v, str):
        if v.lower() in names:
            return names[v.lower()]
        try:
            v = int(v, 0)
        except ValueError:
            raise PolicyError(where, f"unknown name {v!r} (known: {', '.join(sorted(names))})") from None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
        raise PolicyError(where, f"expected one of {', '.join(sorted(names))} or 0..{limit}, not {v!r}")
    return v


def _hex(where: str, v: Any, maxlen: int) -> bytes:
    if not isinstance(v, str):
        raise PolicyError(where, "expected a hex string")
    try:
        b = bytes.fromhex(v.replace(":", "").replace(" ", ""))
    except ValueError:
        raise PolicyError(where, f"not hex: {v!r}") from None
    if not 0 < len(b) <= maxlen:
        raise PolicyError(where, f"{len(b)} bytes; 1..{maxlen} allowed")
    return b


def parse_match(where: str, d: Any, flow_ok: bool = True) -> Match:
    """A match (see the module doc); ``flow_ok``: the ``flow`` key is allowed (subscriptions and
    rights, not prevent or quarantine rules, which run before the flow stage)."""
    if not isinstance(d, dict):
        raise PolicyError(where, "expected a table of match keys")
    unknown = set(d) - MATCH_KEYS - {"contain", "action", "comment"}
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(MATCH_KEYS))})")
    kw: dict[str, Any] = {}
    if "flow" in d:
        if not flow_ok:
            raise PolicyError(f"{where}.flow", "only subscriptions and rights match by flow "
                                               "(rules run before the flow stage)")
        if d["flow"] not in FLOW_MATCH:
            raise PolicyError(f"{where}.flow", f"expected one of {', '.join(FLOW_MATCH)}, not {d['flow']!r}")
        kw["flow_new"] = True
    if "direction" in d:
        if not isinstance(d["direction"], str) or d["direction"] not in DIRECTIONS:
            raise PolicyError(f"{where}.direction", f"expected one of {', '.join(DIRECTIONS)}")
        kw["dirs"] = DIRECTIONS[d["direction"]]
        if kw["dirs"] == DIR_FROM | DIR_TO:
            kw["dirs"] = 0
    if "ethertype" in d:
        kw["ethertype"] = _named_int(f"{where}.ethertype", d["ethertype"], ETHERTYPES, 0xFFFF)
    if "proto" in d:
        kw["proto"] = _named_int(f"{where}.proto", d["proto"], PROTOS, 255)
    for key in ("src", "dst"):
        if key in d:
            try:
                kw[key] = ipaddress.ip_network(d[key], strict=False)
            except (ValueError, TypeError):
                raise PolicyError(f"{where}.{key}", f"not an address or CIDR prefix: {d[key]!r}") from None
    if kw.get("src") and kw.get("dst") and kw["src"].version != kw["dst"].version:
        raise PolicyError(where, "src and dst are of different IP versions")
    for key in ("sport", "dport"):
        if key in d:
            kw[key] = _port_range(f"{where}.{key}", d[key])
    if "tcp_flags" in d:
        v = d["tcp_flags"]
        if not isinstance(v, str):
            raise PolicyError(f"{where}.tcp_flags", "expected e.g. 'syn,!ack'")
        mask = value = 0
        for part in filter(None, (p.strip().lower() for p in v.split(","))):
            neg = part.startswith("!")
            name = part.lstrip("!")
            if name not in TCP_FLAGS:
                raise PolicyError(f"{where}.tcp_flags", f"unknown flag {name!r}")
            mask |= TCP_FLAGS[name]
            if not neg:
                value |= TCP_FLAGS[name]
        kw["flags_mask"], kw["flags_value"] = mask, value
        if "proto" not in kw:
            kw["proto"] = 6
    if ("sport" in kw or "dport" in kw) and kw.get("proto", -1) not in (6, 17, 132):
        raise PolicyError(where, "ports need proto tcp, udp or sctp")
    if "flags_mask" in kw and kw.get("proto") != 6:
        raise PolicyError(where, "tcp_flags need proto tcp")
    if "terms" in d:
        terms = d["terms"]
        if not isinstance(terms, list) or len(terms) > lib.VN_MAX_TERMS:
            raise PolicyError(f"{where}.terms", f"expected a list of at most {lib.VN_MAX_TERMS} terms")
        out = []
        for i, t in enumerate(terms):
            tw = f"{where}.terms[{i}]"
            if not isinstance(t, dict) or set(t) - {"offset", "value", "mask"} or "offset" not in t or "value" not in t:
                raise PolicyError(tw, "expected {offset, value[, mask]}")
            off = t["offset"]
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= 65535 - lib.VN_TERM_BYTES:
                raise PolicyError(f"{tw}.offset", "expected 0..65519")
            val = _hex(f"{tw}.value", t["value"], lib.VN_TERM_BYTES)
            mask = _hex(f"{tw}.mask", t["mask"], lib.VN_TERM_BYTES) if "mask" in t else b"\xff" * len(val)
            if len(mask) != len(val):
                raise PolicyError(f"{tw}.mask", "must be as long as value")
            out.append((off, val, mask))
        kw["terms"] = tuple(out)
    return Match(**kw)


@dataclass(frozen=True)
class StreamMatch:
    """TCP connections by server port, and which of their byte streams (data directions)."""
    ports: tuple[int, int] = (0, 0xFFFF)
    dirs: int = 0

    def directions(self) -> int:
        return self.dirs or (DIR_FROM | DIR_TO)

    def within(self, right: "StreamMatch") -> bool:
        return (right.ports[0] <= self.ports[0] and self.ports[1] <= right.ports[1]
                and not self.directions() & ~right.directions())

    def fill(self, c, contain: bool) -> None:
        """Writes this into a ``struct vn_stream_sub``."""
        c.port_lo, c.port_hi = self.ports
        c.dirs = self.directions()
        c.contain = 1 if contain else 0


STREAM_KEYS = {"stream", "port", "direction"}


def parse_stream_match(where: str, d: Any) -> StreamMatch:
    if not isinstance(d, dict):
        raise PolicyError(where, "expected a table of stream keys")
    unknown = set(d) - STREAM_KEYS - {"contain", "comment"}
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}",
                          f"unknown key for a stream (known: {', '.join(sorted(STREAM_KEYS))})")
    if d.get("stream") is not True:
        raise PolicyError(f"{where}.stream", "expected true")
    kw: dict[str, Any] = {}
    if "port" in d:
        kw["ports"] = _port_range(f"{where}.port", d["port"])
    if "direction" in d:
        if not isinstance(d["direction"], str) or d["direction"] not in DIRECTIONS:
            raise PolicyError(f"{where}.direction", f"expected one of {', '.join(DIRECTIONS)}")
        kw["dirs"] = DIRECTIONS[d["direction"]]
        if kw["dirs"] == DIR_FROM | DIR_TO:
            kw["dirs"] = 0
    return StreamMatch(**kw)


FLOW_KEYS = {"flows", "proto", "direction", "events"}
FLOW_EVENT_KINDS = ("open", "state", "close", "summary")


@dataclass(frozen=True)
class FlowMatch:
    """Flows by protocol and by who opened them, and which of their events."""
    protos: Optional[frozenset] = None     # None: every protocol
    dirs: int = 0                          # who initiated; 0: either
    events: frozenset = frozenset(FLOW_EVENT_KINDS)

    def directions(self) -> int:
        return self.dirs or (DIR_FROM | DIR_TO)

    def within(self, right: "FlowMatch") -> bool:
        protos_ok = right.protos is None or (self.protos is not None and self.protos <= right.protos)
        return protos_ok and not self.directions() & ~right.directions()

    def matches(self, proto: int, initiator: int, kind: str) -> bool:
        return (kind in self.events and (self.protos is None or proto in self.protos)
                and bool(self.directions() & initiator))


def parse_flow_match(where: str, d: Any, subscription: bool = False) -> FlowMatch:
    if not isinstance(d, dict):
        raise PolicyError(where, "expected a table of flows keys")
    known = FLOW_KEYS if subscription else FLOW_KEYS - {"events"}
    unknown = set(d) - known - {"comment", "contain"}
    if unknown:
        raise PolicyError(f"{where}.{sorted(unknown)[0]}",
                          f"unknown key for flows (known: {', '.join(sorted(known))})")
    if d.get("flows") is not True:
        raise PolicyError(f"{where}.flows", "expected true")
    if d.get("contain", False) is not False:
        raise PolicyError(f"{where}.contain", "flows are read rights only: an event holds nothing")
    kw: dict[str, Any] = {}
    if "proto" in d:
        v = d["proto"]
        items = v if isinstance(v, list) else [v]
        if not items or len(items) > 16:
            raise PolicyError(f"{where}.proto", "expected a protocol or a list of 1-16")
        kw["protos"] = frozenset(_named_int(f"{where}.proto", x, PROTOS, 255) for x in items)
    if "direction" in d:
        if not isinstance(d["direction"], str) or d["direction"] not in DIRECTIONS:
            raise PolicyError(f"{where}.direction", f"expected one of {', '.join(DIRECTIONS)}")
        kw["dirs"] = DIRECTIONS[d["direction"]]
        if kw["dirs"] == DIR_FROM | DIR_TO:
            kw["dirs"] = 0
    if "events" in d:
        ev = d["events"]
        if not isinstance(ev, list) or not ev or not all(isinstance(x, str) and x in FLOW_EVENT_KINDS
                                                         for x in ev):
            raise PolicyError(f"{where}.events", f"expected a list of {', '.join(FLOW_EVENT_KINDS)}")
        kw["events"] = frozenset(ev)
    return FlowMatch(**kw)


@dataclass
class Right:
    match: Match
    contain: bool


@dataclass
class StreamRight:
    match: StreamMatch
    contain: bool


@dataclass
class ScannerSpec:
    name: str
    argv: list[str]
    config: dict
    rights: list[Right]
    injections: list[tuple[str, bytes]]          # whole Ethernet frames ([[scanner.inject]] frame =)
    memory_mb: int = 512
    cpu_seconds: int = 3600
    open_files: int = 64
    max_timeouts: int = 3        # consecutive missed decisions before it counts as hung
    messages_per_second: int = 20000
    alerts_per_second: float = 10.0
    # the largest state the scanner may keep with the NI kernel (Scanner.checkpoint); 0: none
    checkpoint_max_bytes: int = 65536
    stream_rights: list[StreamRight] = field(default_factory=list)
    # bytes to insert into held TCP streams ([[scanner.inject]] stream = / stream_hex =)
    stream_injections: list[tuple[str, bytes]] = field(default_factory=list)
    # unix sockets (absolute paths) bound into its sandbox, which it may connect to (clamd)
    sockets: list[str] = field(default_factory=list)
    # may have the NI send TCP resets from the guest's own address (Scanner.reset): nothing
    # the guest could not send itself, but a scanner needs the administrator's word for it
    resets: bool = False
    # at most this many resets a second (a bucket as deep as one second's): past it, refused
    resets_per_second: float = 1000.0
    # the flow stage's events it may subscribe to ([[scanner.allow]] flows = true)
    flow_rights: list[FlowMatch] = field(default_factory=list)


@dataclass
class Policy:
    mac: Optional[bytes] = None
    addresses: list = field(default_factory=list)
    anti_spoof: bool = True
    hold_timeout: float = 1.0
    default_pass: bool = False
    held_frames_max: int = 4096
    held_bytes_max: int = 16 << 20
    over_cap_pass: bool = False
    # stream reassembly memcaps and their exception policies (False: drop, fail closed)
    tcp_flows_max: int = 4096
    tcp_flows_over_pass: bool = False
    tcp_bytes_max: int = 64 << 20
    tcp_bytes_over_pass: bool = False
    tcp_depth_max: int = 4 << 20
    tcp_depth_over_pass: bool = False
    tcp_idle_timeout: float = 600.0
    tcp_resend_max: int = 12         # the NI's own resends (injected / vouched bytes) before a reset
    unparsed_pass: bool = False      # [ni] unparsed: frames the parser cannot walk (drop, fail closed)
    tunnel_pass: bool = False        # [ni] tunnels: IP-in-IP, 6in4, GRE, EtherIP, MPLS-in-IP (drop)
    ipv6_router: bool = False        # [ni] ipv6_router: the guest may send RAs and redirects
    router: bool = False             # [ni] router: the guest forwards others' packets (its ICMP errors)
    dhcp_server: bool = False        # [ni] dhcp_server: the guest may answer DHCP and DHCPv6
    guest_vlan_drop: bool = False    # [ni] guest_vlan: VLAN-tagged frames from the guest (allow)
    # data of a connection the NI never saw open, on a subscribed port (MIDSTREAM): reset
    # both ends (fail closed, the default), drop, pass uninspected, or adopt (inspect it
    # from where the NI picked it up)
    tcp_midstream: str = "reset"
    # the flow stage (csrc/flow.c): on while a scanner subscribes to flows, or always if
    # `flows`; its table's bound and exception policy, its event queue, its timeouts
    flows: bool = False
    flows_max: int = 16384
    flows_over_pass: bool = False
    flow_events_max: int = 4096
    flow_tcp_idle_ms: int = 600_000
    flow_tcp_syn_ms: int = 3000
    flow_udp_idle_ms: int = 60_000
    flow_other_idle_ms: int = 30_000
    flow_summary_ms: int = 60_000
    prevent: list[Match] = field(default_factory=list)
    scanners: list[ScannerSpec] = field(default_factory=list)
    source: Optional[str] = None
    quarantine_allow: list[Match] = field(default_factory=list)   # [quarantine] allow
    on_alert: str = "none"       # containment when a scanner of this NI alerts (ON_ALERT)
    signatures: Optional[Any] = None    # [signatures]: a vhostni.signatures.config.SignatureConfig
    doc: Optional[dict] = None      # the document it was parsed from (what ni-get-policy shows)

    def compile(self, subs: list[tuple[Match, bool]] = (),
                stream_subs: list[tuple[StreamMatch, bool]] = (),
                flow_events: Optional[frozenset] = None, sub_rings: Sequence[int] = (),
                stream_sub_rings: Sequence[int] = ()):
        """A ``struct vn_policy`` for the fast path, with the kernel's live subscriptions;
        ``sub_rings``: per subscription, the scanner ring it delivers to (the ring's slot + 1;
        0 or missing: the kernel's punt queue); ``stream_sub_rings`` the same for the stream
        subscriptions;
        ``flow_events``: the flow events (FLOW_EVENT_KINDS) scanners subscribed to (None:
        no flows subscription; the stage then runs only if ``flows`` or a subscription has
        ``flow = "new"``)."""
        c = ffi.new("struct vn_policy *")
        # a subscription to flow-opening frames needs the stage to know the flows
        c.flows = 1 if self.flows or flow_events is not None or any(m.flow_new for m, _ in subs) else 0
        c.flow_events = sum(1 << getattr(lib, f"VN_FLOW_EV_{k.upper()}") for k in flow_events or ())
        c.flows_max = self.flows_max
        c.flows_over_pass = 1 if self.flows_over_pass else 0
        c.flow_events_max = self.flow_events_max
        c.flow_tcp_idle_ms = self.flow_tcp_idle_ms
        c.flow_tcp_syn_ms = self.flow_tcp_syn_ms
        c.flow_udp_idle_ms = self.flow_udp_idle_ms
        c.flow_other_idle_ms = self.flow_other_idle_ms
        c.flow_summary_ms = self.flow_summary_ms
        c.anti_spoof = 1 if self.anti_spoof else 0
        if self.mac:
            c.mac_set = 1
            c.mac[0:6] = self.mac
        c.naddrs = len(self.addresses)
        for i, net in enumerate(self.addresses):
            c.addrs[i].family = net.version
            c.addrs[i].plen = net.prefixlen
            raw = net.network_address.packed
            c.addrs[i].addr[0:len(raw)] = raw
        c.nrules = len(self.prevent)
        for i, m in enumerate(self.prevent):
            m.fill(c.rules[i])
        if len(subs) > lib.VN_MAX_SUBS:
            raise PolicyError("", f"more than {lib.VN_MAX_SUBS} subscriptions on one NI")
        c.nsubs = len(subs)
        for i, (m, contain) in enumerate(subs):
            m.fill(c.subs[i])
            c.sub_contain[i] = 1 if contain else 0
            c.sub_chan[i] = sub_rings[i] if i < len(sub_rings) else 0
        c.hold_timeout_ms = max(1, round(self.hold_timeout * 1000))
        c.hold_default_pass = 1 if self.default_pass else 0
        c.held_bytes_max = self.held_bytes_max
        c.held_frames_max = self.held_frames_max
        c.over_cap_pass = 1 if self.over_cap_pass else 0
        c.nqallow = len(self.quarantine_allow)
        for i, m in enumerate(self.quarantine_allow):
            m.fill(c.qallow[i])
        if len(stream_subs) > lib.VN_MAX_STREAM_SUBS:
            raise PolicyError("", f"more than {lib.VN_MAX_STREAM_SUBS} stream subscriptions on one NI")
        c.nstream_subs = len(stream_subs)
        for i, (m, contain) in enumerate(stream_subs):
            m.fill(c.stream_subs[i], contain)
            c.stream_sub_chan[i] = stream_sub_rings[i] if i < len(stream_sub_rings) else 0
        c.tcp_flows_max = self.tcp_flows_max
        c.tcp_flows_over_pass = 1 if self.tcp_flows_over_pass else 0
        c.tcp_bytes_max = self.tcp_bytes_max
        c.tcp_bytes_over_pass = 1 if self.tcp_bytes_over_pass else 0
        c.tcp_depth_max = self.tcp_depth_max
        c.tcp_depth_over_pass = 1 if self.tcp_depth_over_pass else 0
        c.tcp_idle_ms = int(self.tcp_idle_timeout * 1000)
        c.tcp_resend_max = self.tcp_resend_max
        c.unparsed_pass = 1 if self.unparsed_pass else 0
        c.tunnel_pass = 1 if self.tunnel_pass else 0
        c.ipv6_router = 1 if self.ipv6_router else 0
        c.router = 1 if self.router else 0
        c.dhcp_server = 1 if self.dhcp_server else 0
        c.guest_vlan_drop = 1 if self.guest_vlan_drop else 0
        c.tcp_midstream = MIDSTREAM[self.tcp_midstream]
        return c


def _want(d: dict, key: str, where: str, types, default=None, required=False):
    if key not in d:
        if required:
            raise PolicyError(f"{where}.{key}" if where else key, "missing")
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise PolicyError(f"{where}.{key}" if where else key, f"expected {types}, not a boolean")
    if not isinstance(v, types):
        raise PolicyError(f"{where}.{key}" if where else key, f"expected {getattr(types, '__name__', types)}, not {type(v).__name__}")
    return v


def _check_keys(d: dict, allowed: set, where: str) -> None:
    extra = set(d) - allowed
    if extra:
        k = sorted(extra)[0]
        raise PolicyError(f"{where}.{k}" if where else k, f"unknown key (known: {', '.join(sorted(allowed))})")


def _scanner_argv(where: str, program: str, args: list, base: str) -> list[str]:
    import sys
    from .resources import ResourceError, shipped_scanner
    try:
        shipped = shipped_scanner(program)      # "vhostni:NAME": a scanner vhostni ships
    except ResourceError as exc:
        raise PolicyError(f"{where}.program", str(exc)) from None
    if shipped is not None:
        path = str(shipped)
    else:
        path = program if os.path.isabs(program) else os.path.normpath(os.path.join(base, program))
    if not os.path.exists(path):
        raise PolicyError(f"{where}.program", f"{path} does not exist")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "__main__.py")):
            raise PolicyError(f"{where}.program", f"{path} is a directory without __main__.py")
        return [sys.executable, path] + args
    if path.endswith(".py"):
        return [sys.executable, path] + args
    if not os.access(path, os.X_OK):
        raise PolicyError(f"{where}.program", f"{path} is not executable")
    return [path] + args


def _injections(w: str, entries: list) -> tuple[list, list]:
    """A scanner's ``[[scanner.inject]]`` array: (frame injections, stream injections)."""
    frames: list[tuple[str, bytes]] = []
    streams: list[tuple[str, bytes]] = []
    for j, inj in enumerate(entries):
        iw = f"{w}.inject[{j}]"
        kinds = [k for k in INJECT_KEYS if isinstance(inj, dict) and k in inj]
        if not isinstance(inj, dict) or set(inj) - {"name", "comment", *INJECT_KEYS} or len(kinds) != 1:
            raise PolicyError(iw, "expected {name, frame (hex)}, {name, stream (text)} or "
                                  "{name, stream_hex}: exactly one of frame, stream, stream_hex")
        if kinds[0] == "frame":
            frame = _hex(f"{iw}.frame", inj["frame"], 65550)
            if len(frame) < 14:
                raise PolicyError(f"{iw}.frame", "shorter than an Ethernet header")
            frames.append((str(inj.get("name", f"inject{j}")), frame))
            continue
        # a scanner finds a stream injection by name (Stream.inject): it must have one, once
        name = inj.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise PolicyError(f"{iw}.name", "a stream injection needs a name: 1-64 of [A-Za-z0-9_.-]")
        if any(n == name for n, _ in streams):
            raise PolicyError(f"{iw}.name", f"{name!r}: another stream injection of this scanner "
                                            "has that name")
        if kinds[0] == "stream_hex":
            data = _hex(f"{iw}.stream_hex", inj["stream_hex"], STREAM_INJECT_MAX)
        else:
            text = inj["stream"]
            if not isinstance(text, str):
                raise PolicyError(f"{iw}.stream", "expected a string (stream_hex for bytes in hex)")
            data = text.encode("utf-8")
            if not 0 < len(data) <= STREAM_INJECT_MAX:
                raise PolicyError(f"{iw}.stream", f"{len(data)} bytes; 1..{STREAM_INJECT_MAX} allowed")
        streams.append((name, data))
    return frames, streams


def check_wire(spec: "ScannerSpec", ni: str = "n" * NI_NAME_MAX) -> None:
    """PolicyError unless the hello the kernel sends this scanner (its config and injection
    names, :func:`vhostni.scanner.wire.encode_hello`) fits the wire's limits for an NI
    named ``ni`` (default: the longest name an NI can have), so that a policy that
    validates can always be applied."""
    why = _hello_error(spec, ni)
    if why:
        raise PolicyError(f"scanner {spec.name!r}", why)


def _hello_error(spec: "ScannerSpec", ni: str = "n" * NI_NAME_MAX) -> Optional[str]:
    try:
        wire.encode_hello(spec.name, ni, spec.config, [n for n, _ in spec.injections],
                          [n for n, _ in spec.stream_injections],
                          spec.checkpoint_max_bytes, spec.checkpoint_max_bytes)
    except wire.WireError as exc:
        return f"its config and injection names must fit the scanner wire's hello message: {exc}"
    return None


def parse_policy(d: Any, base: str = ".", source: Optional[str] = None) -> Policy:
    if not isinstance(d, dict):
        raise PolicyError("", "a policy is a table")
    if wire.depth(d, DOC_MAX_DEPTH) > DOC_MAX_DEPTH:
        raise PolicyError("", f"nested deeper than {DOC_MAX_DEPTH} levels (a scanner's config "
                              f"at most {wire.MAX_DEPTH - 1})")
    _check_keys(d, {"ni", "prevent", "scanner", "quarantine", "signatures", "comment"}, "")
    p = Policy(source=source, doc=copy.deepcopy(d))
    ni = _want(d, "ni", "", dict, {})
    _check_keys(ni, {"mac", "addresses", "anti_spoof", "hold_timeout_ms", "default_decision",
                     "held_frames_max", "held_bytes_max", "over_cap", "on_alert", "comment",
                     "tcp_flows_max", "tcp_flows_over", "tcp_bytes_max", "tcp_bytes_over",
                     "tcp_depth_max", "tcp_depth_over", "tcp_idle_timeout_ms", "tcp_resend_max",
                     "unparsed", "tunnels", "ipv6_router", "router", "dhcp_server", "guest_vlan", "tcp_midstream",
                     "flows", "flows_max", "flows_over", "flow_events_max", "flow_tcp_idle_ms",
                     "flow_tcp_syn_ms", "flow_udp_idle_ms", "flow_other_idle_ms",
                     "flow_summary_ms"}, "ni")
    if "mac" in ni:
        m = _want(ni, "mac", "ni", str)
        if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", m):
            raise PolicyError("ni.mac", f"not a MAC address: {m!r}")
        p.mac = bytes.fromhex(m.replace(":", ""))
        if p.mac[0] & 1:
            raise PolicyError("ni.mac", "a multicast address cannot be a NIC's")
    addrs = _want(ni, "addresses", "ni", list, [])
    if len(addrs) > lib.VN_MAX_ADDRS:
        raise PolicyError("ni.addresses", f"at most {lib.VN_MAX_ADDRS}")
    for i, a in enumerate(addrs):
        try:
            p.addresses.append(ipaddress.ip_network(a, strict=False))
        except (ValueError, TypeError):
            raise PolicyError(f"ni.addresses[{i}]", f"not an address or prefix: {a!r}") from None
    p.anti_spoof = _want(ni, "anti_spoof", "ni", bool, True)
    up = _want(ni, "unparsed", "ni", str, "drop")
    if up not in ("drop", "pass"):
        raise PolicyError("ni.unparsed", "expected 'drop' (fail closed) or 'pass' (frames whose "
                                         "headers the NI cannot walk go on, checked as far as walked)")
    p.unparsed_pass = up == "pass"
    tu = _want(ni, "tunnels", "ni", str, "drop")
    if tu not in ("drop", "pass"):
        raise PolicyError("ni.tunnels", "expected 'drop' (IP tunnels are not walked into: fail closed) or "
                                        "'pass' (a VM that runs GRE or IP-in-IP tunnels)")
    p.tunnel_pass = tu == "pass"
    p.ipv6_router = _want(ni, "ipv6_router", "ni", bool, False)
    p.router = _want(ni, "router", "ni", bool, False)
    p.dhcp_server = _want(ni, "dhcp_server", "ni", bool, False)
    gv = _want(ni, "guest_vlan", "ni", str, "allow")
    if gv not in ("allow", "drop"):
        raise PolicyError("ni.guest_vlan", "expected 'allow' (checked inside the tags) or 'drop'")
    p.guest_vlan_drop = gv == "drop"
    t = _want(ni, "hold_timeout_ms", "ni", int, 1000)
    if not 1 <= t <= 600_000:
        raise PolicyError("ni.hold_timeout_ms", "expected 1..600000")
    p.hold_timeout = t / 1000
    dd = _want(ni, "default_decision", "ni", str, "cut")
    if dd not in ("cut", "pass"):
        raise PolicyError("ni.default_decision", "expected 'cut' (fail closed) or 'pass'")
    p.default_pass = dd == "pass"
    p.held_frames_max = _want(ni, "held_frames_max", "ni", int, p.held_frames_max)
    p.held_bytes_max = _want(ni, "held_bytes_max", "ni", int, p.held_bytes_max)
    if p.held_frames_max < 1 or p.held_bytes_max < 65536:
        raise PolicyError("ni", "held_frames_max >= 1 and held_bytes_max >= 65536")
    if p.held_frames_max > 0xFFFFFFFF:
        raise PolicyError("ni.held_frames_max", "at most 4294967295")
    if p.held_bytes_max > 0xFFFFFFFFFFFFFFFF:
        raise PolicyError("ni.held_bytes_max", "at most 2**64 - 1")
    oc = _want(ni, "over_cap", "ni", str, "drop")
    if oc not in ("drop", "pass"):
        raise PolicyError("ni.over_cap", "expected 'drop' (fail closed) or 'pass'")
    p.over_cap_pass = oc == "pass"
    p.on_alert = _want(ni, "on_alert", "ni", str, "none")
    if p.on_alert not in ON_ALERT:
        raise PolicyError("ni.on_alert", f"expected one of {', '.join(ON_ALERT)}")
    for key, lo, hi in (("tcp_flows_max", 1, 1 << 20), ("tcp_bytes_max", 1 << 17, (1 << 48)),
                        ("tcp_depth_max", 0, 1 << 40), ("tcp_resend_max", 1, 20)):
        v = _want(ni, key, "ni", int, getattr(p, key))
        if not lo <= v <= hi:
            raise PolicyError(f"ni.{key}", f"expected {lo}..{hi}")
        setattr(p, key, v)
    for key in ("tcp_flows_over", "tcp_bytes_over", "tcp_depth_over"):
        v = _want(ni, key, "ni", str, "drop")
        if v not in ("drop", "pass"):
            raise PolicyError(f"ni.{key}", "expected 'drop' (fail closed) or 'pass' (the connection "
                                           "goes on uninspected)")
        setattr(p, f"{key}_pass", v == "pass")
    ms = _want(ni, "tcp_midstream", "ni", str, "pass" if p.default_pass else "reset")
    if ms not in MIDSTREAM:
        raise PolicyError("ni.tcp_midstream", "expected 'reset' (forged RSTs to both ends), 'drop', "
                                              "'pass' (the connection goes on uninspected) or "
                                              "'adopt' (inspected from where the NI picked it up)")
    p.tcp_midstream = ms
    t = _want(ni, "tcp_idle_timeout_ms", "ni", int, int(p.tcp_idle_timeout * 1000))
    if not 1000 <= t <= 86_400_000:
        raise PolicyError("ni.tcp_idle_timeout_ms", "expected 1000..86400000")
    p.tcp_idle_timeout = t / 1000
    p.flows = _want(ni, "flows", "ni", bool, False)
    for key, lo, hi in (("flows_max", 1, 1 << 20), ("flow_events_max", 1, 16384),
                        ("flow_tcp_idle_ms", 1000, 86_400_000), ("flow_tcp_syn_ms", 100, 600_000),
                        ("flow_udp_idle_ms", 1000, 86_400_000),
                        ("flow_other_idle_ms", 1000, 86_400_000), ("flow_summary_ms", 0, 86_400_000)):
        v = _want(ni, key, "ni", int, getattr(p, key))
        if not lo <= v <= hi:
            raise PolicyError(f"ni.{key}", f"expected {lo}..{hi}")
        setattr(p, key, v)
    fo = _want(ni, "flows_over", "ni", str, "drop")
    if fo not in ("drop", "pass"):
        raise PolicyError("ni.flows_over", "expected 'drop' (fail closed: a new flow that finds the "
                                           "table full is dropped) or 'pass' (it goes on untracked)")
    p.flows_over_pass = fo == "pass"

    q = _want(d, "quarantine", "", dict, {})
    _check_keys(q, {"allow", "comment"}, "quarantine")
    qallow = _want(q, "allow", "quarantine", list, [])
    if len(qallow) > lib.VN_MAX_QALLOW:
        raise PolicyError("quarantine.allow", f"at most {lib.VN_MAX_QALLOW} rules")
    for i, r in enumerate(qallow):
        p.quarantine_allow.append(parse_match(f"quarantine.allow[{i}]", r, flow_ok=False))

    rules = _want(d, "prevent", "", list, [])
    if len(rules) > lib.VN_MAX_RULES:
        raise PolicyError("prevent", f"at most {lib.VN_MAX_RULES} rules")
    for i, r in enumerate(rules):
        p.prevent.append(parse_match(f"prevent[{i}]", r, flow_ok=False))

    names = set()
    for i, s in enumerate(_want(d, "scanner", "", list, [])):
        w = f"scanner[{i}]"
        if not isinstance(s, dict):
            raise PolicyError(w, "expected a table")
        _check_keys(s, {"name", "program", "args", "config", "allow", "inject", "memory_mb",
                        "cpu_seconds", "open_files", "max_timeouts", "messages_per_second",
                        "alerts_per_second", "checkpoint_max_bytes", "sockets", "resets", "resets_per_second",
                        "comment"}, w)
        name = _want(s, "name", w, str, required=True)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name) or name in names:
            raise PolicyError(f"{w}.name", f"{name!r}: 1-32 of [A-Za-z0-9_.-], unique")
        names.add(name)
        args = _want(s, "args", w, list, [])
        if not all(isinstance(a, str) for a in args):
            raise PolicyError(f"{w}.args", "expected a list of strings")
        argv = _scanner_argv(w, _want(s, "program", w, str, required=True), args, base)
        rights, stream_rights, flow_rights = [], [], []
        for j, a in enumerate(_want(s, "allow", w, list, [])):
            contain = a.get("contain", False) if isinstance(a, dict) else False
            if not isinstance(contain, bool):
                raise PolicyError(f"{w}.allow[{j}].contain", "expected true or false")
            if isinstance(a, dict) and "flows" in a:
                flow_rights.append(parse_flow_match(f"{w}.allow[{j}]", a))
            elif isinstance(a, dict) and "stream" in a:
                stream_rights.append(StreamRight(parse_stream_match(f"{w}.allow[{j}]", a), contain))
            else:
                rights.append(Right(parse_match(f"{w}.allow[{j}]", a), contain))
        injections, stream_injections = _injections(w, _want(s, "inject", w, list, []))
        spec = ScannerSpec(name=name, argv=argv, config=_want(s, "config", w, dict, {}),
                           rights=rights, injections=injections, stream_rights=stream_rights,
                           stream_injections=stream_injections, flow_rights=flow_rights)
        spec.resets = _want(s, "resets", w, bool, False)
        for key, lo, hi in (("memory_mb", 16, 65536), ("cpu_seconds", 1, 10**7), ("open_files", 8, 65536),
                            ("max_timeouts", 1, 1000), ("messages_per_second", 1, 10**7),
                            ("checkpoint_max_bytes", 0, wire.MAX_CHECKPOINT)):
            v = _want(s, key, w, int, getattr(spec, key))
            if not lo <= v <= hi:
                raise PolicyError(f"{w}.{key}", f"expected {lo}..{hi}")
            setattr(spec, key, v)
        aps = _want(s, "alerts_per_second", w, (int, float), spec.alerts_per_second)
        if not 0 < aps <= 10000:
            raise PolicyError(f"{w}.alerts_per_second", "expected 0..10000")
        spec.alerts_per_second = float(aps)
        rps = _want(s, "resets_per_second", w, (int, float), spec.resets_per_second)
        if not 1 <= rps <= 100000:
            raise PolicyError(f"{w}.resets_per_second", "expected 1..100000")
        spec.resets_per_second = float(rps)
        sockets = _want(s, "sockets", w, list, [])
        for j, sock in enumerate(sockets):
            if not (isinstance(sock, str) and os.path.isabs(sock) and len(sock) < 108
                    and os.path.normpath(sock) == sock and "\0" not in sock):
                raise PolicyError(f"{w}.sockets[{j}]", "expected an absolute, normalised path "
                                  "of a unix socket")
        spec.sockets = list(sockets)
        why = _hello_error(spec)
        if why:
            raise PolicyError(f"{w}.config", why)
        p.scanners.append(spec)
    if "signatures" in d:
        from .signatures.config import SignatureConfigError, parse_section
        try:
            p.signatures = parse_section(d["signatures"], base, p.addresses)
        except SignatureConfigError as exc:
            raise PolicyError(exc.where, str(exc)) from None
    return p


def load_policy(path: str) -> Policy:
    """Reads and validates a policy file (.toml or .json)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            d = json.loads(raw)
        else:
            d = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PolicyError("", f"{path}: cannot parse: {exc}") from None
    try:
        return parse_policy(d, base=os.path.dirname(os.path.abspath(path)), source=path)
    except PolicyError as exc:
        raise PolicyError(exc.where, f"{exc.args[0]}  (in {path})") from None
