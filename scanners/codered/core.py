"""The Code-Red detector, sans-I/O: frames and a clock in, verdicts and alerts out.

From section 5.3 of the self-securing NI paper.  A worm like Code-Red connects to random addresses; a host
rarely connects to a new address without first asking DNS for it.  So the detector

1. shadows the guest's DNS answers: every A/AAAA address in a response (answer, authority and additional
   sections; CNAME chains noted) goes into a table with its TTL.  An entry is *kept* after its TTL expires,
   because programs reuse gethostbyname() results long after; expired entries are pruned only when the table
   is full, earliest expiry first, and only when nothing has expired is an unexpired entry evicted (again the
   one that expires first), so memory stays bounded whatever the network sends;
2. checks the destination of every outbound TCP SYN (SYN set, ACK clear) against that table.  A destination in
   the table (or in the administrator's ``known_networks``) is *known* and always passes at once.  Any other
   destination is *unknown*: it is one "random connection" in the paper's words;
3. counts *unique unknown destination addresses* in two sliding windows: the last second and the last minute
   (one address counts once per window however many SYNs, ports or retransmissions go to it; ports do not
   make destinations distinct, so this watches address-space scans, not port scans of one host).  More than
   ``max_per_second`` (default 2) in the last second or more than ``max_per_minute`` (default 10) in the last
   minute is an attack.  The SYN that crosses the threshold is the first one cut;
4. in attack mode, for ``attack_duration`` seconds (default 60): one SYN to an unknown destination passes every
   ``pass_interval`` seconds (default 6; the first one ``pass_interval`` after the attack was detected), the
   others are cut (TCP retransmits them, so slow legitimate connections still get through eventually).  A
   destination let through once in attack mode keeps passing until the next re-evaluation, so its
   retransmissions and reconnections do not use up the next slot.  Known destinations always pass;
5. alerts when attack mode starts and at every re-evaluation (when ``attack_duration`` has passed) that finds
   the rate still above a threshold, with the count of unique unknown destinations over the last minute and
   the most recent destination port; otherwise attack mode ends quietly (``stats`` records it).

DNS responses are accepted only if they answer a query the guest sent (same addresses and ports, transaction
ID and question) within ``query_timeout`` seconds, unless ``match_queries`` is false: that keeps a host on the
network from whitelisting addresses by spraying unsolicited answers at the guest.  DNS over TCP is not
shadowed (nor are fragmented UDP responses): names resolved that way look unknown (see scanners/README.md).

    det = CodeRedDetector(config, clock=time.monotonic)
    v = det.handle_frame(direction, frame_bytes)     # direction: "from_guest" / "to_guest" (or 1 / 2)
    v.action                 # "pass" / "cut" for SYNs, None for frames that need no decision (DNS)
    v.alert                  # an Alert or None
    alert = det.tick()       # call now and then when no frames come: re-evaluation is time-driven

All methods take an optional ``now`` (seconds, any monotonic origin); by default the injected clock is read.

What the detector knows can outlive its process (the scanner keeps it with the NI kernel: ``Scanner.checkpoint``),
so a restart in attack mode does not reopen the door to a worm::

    doc = det.snapshot(max_bytes=65536, wall=time.time())   # a JSON-able dict that fits in max_bytes
    det.restore(doc, wall=time.time())                       # in a new process: attack mode, windows, table
    det.dirty, det.urgent        # something changed since the last snapshot; ... that a decision depends on

Times are saved relative to the snapshot and its wall-clock time, so they mean the same in a process with another
monotonic origin (a daemon restart, a reboot).  ``urgent`` is set when an unknown destination passed or attack
mode started, continued or ended: snapshot *before* sending that decision, and no unknown destination can get
out twice across a restart; other changes (cut SYNs in attack mode, DNS answers) can wait a second.
"""
from __future__ import annotations

import collections
import heapq
import ipaddress
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from . import dns
from .packet import PROTO_UDP, PacketError, parse_frame

__all__ = ["CodeRedDetector", "Alert", "Verdict", "ConfigError", "DEFAULTS", "DnsTable"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

DEFAULTS: dict[str, Any] = {
    "max_per_second": 2,        # more unique unknown destinations than this in 1 s: attack
    "max_per_minute": 10,       # ... or more than this in 60 s
    "pass_interval": 6.0,       # attack mode: one unknown SYN passes every this many seconds
    "attack_duration": 60.0,    # attack mode lasts this long, then the rate is re-evaluated
    "table_capacity": 4096,     # DNS shadow table entries (the paper saw at most 293 per desktop)
    "max_ttl": 86400,           # longer TTLs are cut to this (expiry order only: entries outlive TTLs anyway)
    "match_queries": True,      # accept only responses to queries the guest sent
    "query_timeout": 30.0,      # how long a query waits for its response
    "max_pending_queries": 1024,
    "max_tracked": 65536,       # unknown destinations remembered for the windows (counts saturate here)
    "known_networks": [],       # CIDRs always treated as known (e.g. the local subnet's servers)
    "dns_port": 53,
    "unparseable": "cut",       # verdict for a held frame that is not a parseable TCP SYN
}

_SECOND = 1.0
_MINUTE = 60.0
_DIRECTIONS = {"from_guest": "from_guest", "to_guest": "to_guest", 1: "from_guest", 2: "to_guest"}


class ConfigError(ValueError):
    """A configuration key that is unknown or has a bad value."""


@dataclass(frozen=True)
class Alert:
    message: str
    fields: dict

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Verdict:
    action: Optional[str]       # "pass", "cut", or None when no decision is owed
    alert: Optional[Alert] = None
    reason: str = ""


def load_config(config: Optional[Mapping[str, Any]]) -> dict:
    """DEFAULTS overlaid with ``config``, type-checked; unknown keys are errors (a typo must not silently
    leave a default in force)."""
    out = dict(DEFAULTS)
    for key, value in (config or {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown Code-Red scanner setting {key!r} (known: {', '.join(sorted(DEFAULTS))})")
        out[key] = value

    def number(key: str, lo: float, integer: bool = False) -> None:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ConfigError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
        if not math.isfinite(v) or v < lo:
            raise ConfigError(f"{key}: {v!r} is below {lo}")

    for key in ("max_per_second", "max_per_minute"):
        number(key, 0, integer=True)
    for key in ("table_capacity", "max_pending_queries", "max_tracked"):
        number(key, 1, integer=True)
    number("max_ttl", 0, integer=True)
    number("dns_port", 1, integer=True)
    if out["dns_port"] > 65535:
        raise ConfigError("dns_port: must be at most 65535")
    for key in ("pass_interval", "attack_duration", "query_timeout"):
        number(key, 0.001)
    out["pass_interval"] = float(out["pass_interval"])
    out["attack_duration"] = float(out["attack_duration"])
    out["query_timeout"] = float(out["query_timeout"])
    if not isinstance(out["match_queries"], bool):
        raise ConfigError("match_queries: expected true or false")
    if out["unparseable"] not in ("pass", "cut"):
        raise ConfigError("unparseable: expected 'pass' or 'cut'")
    nets = out["known_networks"]
    if isinstance(nets, str) or not isinstance(nets, (list, tuple)):
        raise ConfigError("known_networks: expected a list of CIDRs")
    try:
        out["known_networks"] = tuple(ipaddress.ip_network(str(n), strict=False) for n in nets)
    except ValueError as exc:
        raise ConfigError(f"known_networks: {exc}") from None
    return out


@dataclass
class _Entry:
    expires: float
    name: str
    seq: int


class DnsTable:
    """Addresses the guest has been told by DNS, with expiry times and names, bounded in size.

    Entries stay after they expire; space is made only when an insert finds the table full, by evicting the
    entry that expires (or expired) first.  A heap with lazy deletion keeps that O(log n).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: dict[IPAddress, _Entry] = {}
        self._heap: list[tuple[float, int, IPAddress]] = []
        self._seq = 0
        self.evicted_expired = 0
        self.evicted_live = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, addr: IPAddress) -> bool:
        return addr in self._entries

    def get(self, addr: IPAddress) -> Optional[_Entry]:
        return self._entries.get(addr)

    def add(self, addr: IPAddress, expires: float, name: str, now: float) -> None:
        """Records ``addr`` until at least ``expires``; a known address keeps the later of its two expiries."""
        e = self._entries.get(addr)
        if e is not None:
            if expires <= e.expires:
                return
            e.expires = expires
            e.name = name
        else:
            if len(self._entries) >= self.capacity:
                self._evict(now)
            e = self._entries[addr] = _Entry(expires, name, 0)
        self._seq += 1
        e.seq = self._seq
        heapq.heappush(self._heap, (e.expires, e.seq, addr))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(v.expires, v.seq, a) for a, v in self._entries.items()]
            heapq.heapify(self._heap)

    def _evict(self, now: float) -> None:
        while self._heap:
            expires, seq, addr = heapq.heappop(self._heap)
            e = self._entries.get(addr)
            if e is not None and e.seq == seq:
                del self._entries[addr]
                if expires <= now:
                    self.evicted_expired += 1
                else:
                    self.evicted_live += 1
                return

    def items(self):
        return self._entries.items()


@dataclass
class _Stats:
    frames: int = 0
    unparseable: int = 0
    dns_queries: int = 0
    dns_responses: int = 0
    dns_unsolicited: int = 0
    dns_rejected: int = 0
    addresses_added: int = 0
    syn_known: int = 0
    syn_unknown_passed: int = 0
    syn_unknown_cut: int = 0
    attacks: int = 0
    attack_continued: int = 0
    attack_ended: int = 0


class CodeRedDetector:
    def __init__(self, config: Optional[Mapping[str, Any]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = load_config(config)
        self.clock = clock
        self.table = DnsTable(self.cfg["table_capacity"])
        self.stats = _Stats()
        # unknown destination -> when a SYN last went to it; ordered oldest first
        self._unknown: "collections.OrderedDict[IPAddress, float]" = collections.OrderedDict()
        # (client addr, client port, server addr, txid) -> (question, when sent); ordered oldest first
        self._pending: "collections.OrderedDict[tuple, tuple[dns.Question, float]]" = collections.OrderedDict()
        self._last_now = -math.inf
        self.attack = False
        self.attack_since = 0.0
        self.attack_until = 0.0
        self._next_pass = 0.0
        self._granted: set[IPAddress] = set()
        self.last_port: Optional[int] = None
        self.last_dst: Optional[IPAddress] = None
        self.dirty = False        # changed since the last snapshot
        self.urgent = False       # ... in a way a later decision depends on (see the module doc)

    # ---- time
    def _now(self, now: Optional[float]) -> float:
        t = self.clock() if now is None else float(now)
        if t < self._last_now:   # never let time run backwards inside the windows
            t = self._last_now
        self._last_now = t
        return t

    # ---- frames
    def handle_frame(self, direction: Union[str, int], frame: bytes, now: Optional[float] = None) -> Verdict:
        """Routes one frame: outbound DNS queries and inbound DNS responses are observed (no decision), an
        outbound TCP SYN is decided.  Anything else yields the ``unparseable`` verdict (applied by the caller
        only if the frame is held)."""
        t = self._now(now)
        self.stats.frames += 1
        d = _DIRECTIONS.get(direction)
        try:
            if d is None:
                raise PacketError(f"bad direction {direction!r}")
            pkt = parse_frame(frame)
        except PacketError as exc:
            self.stats.unparseable += 1
            return Verdict(self.cfg["unparseable"], None, f"unparseable: {exc}")
        port = self.cfg["dns_port"]
        if d == "from_guest" and pkt.is_tcp_syn:
            action, alert = self.decide_syn(pkt.dst, pkt.dport, t)
            return Verdict(action, alert, "syn")
        if pkt.proto == PROTO_UDP and d == "from_guest" and pkt.dport == port:
            self.observe_dns_query(pkt.payload, t, flow=(pkt.src, pkt.sport, pkt.dst))
            return Verdict(None, self.tick(t), "dns query")
        if pkt.proto == PROTO_UDP and d == "to_guest" and pkt.sport == port:
            self.observe_dns_response(pkt.payload, t, flow=(pkt.dst, pkt.dport, pkt.src))
            return Verdict(None, self.tick(t), "dns response")
        self.stats.unparseable += 1
        return Verdict(self.cfg["unparseable"], self.tick(t), "not a SYN or DNS")

    # ---- DNS
    def observe_dns_query(self, payload: bytes, now: Optional[float] = None,
                          flow: Optional[tuple] = None) -> bool:
        """Remembers a query the guest sent.  ``flow`` is (client address, client port, server address)."""
        t = self._now(now)
        try:
            q = dns.parse_query(payload)
        except dns.DnsError:
            return False
        self.stats.dns_queries += 1
        key = (flow, q.id) if flow is not None else (None, q.id)
        self._expire_queries(t)
        self._pending.pop(key, None)
        self._pending[key] = (q.questions[0], t)
        while len(self._pending) > self.cfg["max_pending_queries"]:
            self._pending.popitem(last=False)
        return True

    def _expire_queries(self, now: float) -> None:
        horizon = now - self.cfg["query_timeout"]
        while self._pending:
            key, (_, sent) = next(iter(self._pending.items()))
            if sent >= horizon:
                break
            del self._pending[key]

    def observe_dns_response(self, payload: bytes, now: Optional[float] = None,
                             flow: Optional[tuple] = None) -> int:
        """Adds the addresses of a DNS response (UDP payload) to the table; returns how many it carried.
        ``flow`` is (client address, client port, server address): the guest's side first, as for the query.
        Without a flow, or with ``match_queries`` false, the response is taken as it is."""
        t = self._now(now)
        matching = self.cfg["match_queries"] and flow is not None
        if matching:
            # Look for the query before parsing: unsolicited responses cost no parsing (a worst-case 64 KB
            # response takes ~0.2 s to parse, so a flood of them could otherwise stall the SYN decisions).
            self._expire_queries(t)
            if len(payload) < 2 or (flow, int.from_bytes(payload[:2], "big")) not in self._pending:
                self.stats.dns_unsolicited += 1
                return 0
        try:
            msg = dns.parse_response(payload)
        except dns.DnsError:
            self.stats.dns_rejected += 1
            return 0
        if matching:
            pending = self._pending.get((flow, msg.id))
            if pending is None or len(msg.questions) != 1 or msg.questions[0] != pending[0]:
                self.stats.dns_unsolicited += 1
                return 0
            del self._pending[(flow, msg.id)]
        self.stats.dns_responses += 1
        n = 0
        max_ttl = self.cfg["max_ttl"]
        for rec in msg.addresses():
            name = rec.aliases[0] if rec.aliases else rec.name
            self.table.add(rec.address, t + min(rec.ttl, max_ttl), name, t)
            self.dirty = True
            n += 1
        self.stats.addresses_added += n
        return n

    def is_known(self, addr: IPAddress) -> bool:
        if addr in self.table:
            return True
        return any(addr in net for net in self.cfg["known_networks"] if net.version == addr.version)

    # ---- SYNs
    def decide_syn(self, dst: Union[IPAddress, str], dport: int,
                   now: Optional[float] = None) -> tuple[str, Optional[Alert]]:
        """The verdict on an outbound TCP SYN to ``dst``:``dport``, and an alert if one is due."""
        t = self._now(now)
        addr = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        alert = self._reevaluate(t)
        if self.is_known(addr):
            self.stats.syn_known += 1
            return "pass", alert
        self.last_port, self.last_dst = int(dport), addr
        self._note_unknown(addr, t)
        self.dirty = True
        if not self.attack:
            self.urgent = True
            if self._rate_exceeded(t):
                self._enter_attack(t)
                alert = self._alert("attack_detected", t)
                self.stats.syn_unknown_cut += 1
                return "cut", alert
            self.stats.syn_unknown_passed += 1
            return "pass", alert
        if addr in self._granted:
            self.stats.syn_unknown_passed += 1
            return "pass", alert
        if t >= self._next_pass:
            self._granted.add(addr)
            self._next_pass = t + self.cfg["pass_interval"]
            self.urgent = True
            self.stats.syn_unknown_passed += 1
            return "pass", alert
        self.stats.syn_unknown_cut += 1
        return "cut", alert

    def tick(self, now: Optional[float] = None) -> Optional[Alert]:
        """Time-driven work: the end-of-attack re-evaluation.  Call it when no frame came for a while."""
        return self._reevaluate(self._now(now))

    def _note_unknown(self, addr: IPAddress, t: float) -> None:
        self._unknown[addr] = t
        self._unknown.move_to_end(addr)
        self._forget_unknown(t)
        while len(self._unknown) > self.cfg["max_tracked"]:
            self._unknown.popitem(last=False)

    def _forget_unknown(self, t: float) -> None:
        horizon = t - _MINUTE
        while self._unknown:
            addr, seen = next(iter(self._unknown.items()))
            if seen > horizon:
                break
            del self._unknown[addr]

    def unknown_count(self, window: float, now: Optional[float] = None) -> int:
        """Unique unknown destinations contacted in the last ``window`` seconds (at most a minute)."""
        t = self._now(now)
        self._forget_unknown(t)
        if window >= _MINUTE:
            return len(self._unknown)
        horizon = t - window
        n = 0
        for seen in reversed(self._unknown.values()):
            if seen <= horizon:
                break
            n += 1
        return n

    def _rate_exceeded(self, t: float) -> bool:
        return (self.unknown_count(_SECOND, t) > self.cfg["max_per_second"]
                or self.unknown_count(_MINUTE, t) > self.cfg["max_per_minute"])

    def _enter_attack(self, t: float) -> None:
        self.attack = True
        self.attack_since = t
        self.attack_until = t + self.cfg["attack_duration"]
        self._next_pass = t + self.cfg["pass_interval"]
        self._granted.clear()
        self.stats.attacks += 1

    def _reevaluate(self, t: float) -> Optional[Alert]:
        if not self.attack or t < self.attack_until:
            return None
        self.dirty = self.urgent = True
        self._granted.clear()
        if self._rate_exceeded(t):
            self.attack_until = t + self.cfg["attack_duration"]
            self.stats.attack_continued += 1
            return self._alert("attack_continues", t)
        self.attack = False
        self.stats.attack_ended += 1
        return None

    def _alert(self, event: str, t: float) -> Alert:
        count = self.unknown_count(_MINUTE, t)
        last_second = self.unknown_count(_SECOND, t)
        what = "detected" if event == "attack_detected" else "continues"
        port = self.last_port if self.last_port is not None else 0
        msg = (f"Code-Red-like scanning {what}: {count} unknown destinations in the last minute "
               f"({last_second} in the last second), last port {port}; "
               f"letting one unknown SYN through every {self.cfg['pass_interval']:g} s "
               f"for {self.cfg['attack_duration']:g} s")
        return Alert(msg, {
            "event": event,
            "count": count,
            "count_last_second": last_second,
            "last_port": port,
            "last_dst": str(self.last_dst) if self.last_dst is not None else "",
            "max_per_second": self.cfg["max_per_second"],
            "max_per_minute": self.cfg["max_per_minute"],
            "pass_interval": self.cfg["pass_interval"],
            "attack_duration": self.cfg["attack_duration"],
            "count_saturated": count >= self.cfg["max_tracked"],
        })

    # ---- state across restarts
    SNAPSHOT_VERSION = 1
    SNAPSHOT_UNKNOWN = 512      # most recent unknown destinations kept (more than any threshold needs)
    SNAPSHOT_GRANTED = 256
    SNAPSHOT_DNS = 512          # DNS table entries kept, latest expiry first
    SNAPSHOT_NAME = 64          # characters of a DNS name kept

    def snapshot(self, max_bytes: int = 65536, wall: Optional[float] = None, now: Optional[float] = None) -> dict:
        """What the detector knows, as a JSON-able dict whose compact JSON fits in ``max_bytes`` (the DNS
        table and then the unknown destinations are shortened, most recent kept, until it does).  Clears
        ``dirty`` and ``urgent``."""
        t = self._now(now)
        wall = time.time() if wall is None else float(wall)
        unknown = [[str(a), round(t - seen, 3)] for a, seen in reversed(self._unknown.items())]
        unknown = unknown[:self.SNAPSHOT_UNKNOWN]
        dns_entries = sorted(self.table.items(), key=lambda kv: kv[1].expires, reverse=True)
        table = [[str(a), round(e.expires - t, 3), e.name[:self.SNAPSHOT_NAME]]
                 for a, e in dns_entries[:self.SNAPSHOT_DNS]]
        doc = {
            "v": self.SNAPSHOT_VERSION, "wall": wall,
            "attack": self.attack,
            "since": round(t - self.attack_since, 3) if self.attack else 0,
            "until": round(self.attack_until - t, 3) if self.attack else 0,
            "next_pass": round(self._next_pass - t, 3) if self.attack else 0,
            "granted": [str(a) for a in list(self._granted)[:self.SNAPSHOT_GRANTED]],
            "last_port": self.last_port,
            "last_dst": str(self.last_dst) if self.last_dst is not None else None,
            "unknown": unknown,
            "dns": table,
            "stats": dict(self.stats.__dict__),
        }
        while len(json.dumps(doc, separators=(",", ":"))) > max_bytes:
            if doc["dns"]:
                doc["dns"] = doc["dns"][:len(doc["dns"]) // 2]
            elif len(doc["unknown"]) > self.cfg["max_per_minute"] + 1:
                doc["unknown"] = doc["unknown"][:max(self.cfg["max_per_minute"] + 1, len(doc["unknown"]) // 2)]
            elif doc["granted"]:
                doc["granted"] = doc["granted"][:len(doc["granted"]) // 2]
            else:
                break    # the caller's limit is smaller than any useful state
        self.dirty = self.urgent = False
        return doc

    def restore(self, doc: Any, wall: Optional[float] = None, now: Optional[float] = None) -> bool:
        """Takes back what :meth:`snapshot` saved (in this or an earlier process), aged by the wall-clock time
        since.  False, and nothing changed, if ``doc`` is not a snapshot of this version."""
        t = self._now(now)
        wall = time.time() if wall is None else float(wall)

        def num(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"not a number: {v!r}")
            return float(v)

        try:
            if not isinstance(doc, dict) or doc.get("v") != self.SNAPSHOT_VERSION:
                return False
            elapsed = max(0.0, wall - num(doc["wall"]))       # a clock set back counts as no time
            base = t - elapsed                                 # the snapshot's "now", on our clock
            unknown = [(ipaddress.ip_address(a), base - max(0.0, num(age))) for a, age in doc["unknown"]]
            table = [(ipaddress.ip_address(a), base + num(left), str(name)) for a, left, name in doc["dns"]]
            granted = {ipaddress.ip_address(a) for a in doc["granted"]}
            attack = doc["attack"] is True
            since, until, next_pass = base - num(doc["since"]), base + num(doc["until"]), base + num(doc["next_pass"])
            port = doc.get("last_port")
            port = int(port) if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535 else None
            dst = ipaddress.ip_address(doc["last_dst"]) if doc.get("last_dst") else None
            stats = {k: v for k, v in (doc.get("stats") or {}).items()
                     if k in self.stats.__dict__ and isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        except (KeyError, TypeError, ValueError):
            return False
        horizon = t - _MINUTE
        for addr, seen in sorted(unknown, key=lambda x: x[1]):      # oldest first, as _note_unknown keeps them
            if seen > horizon and addr not in self._unknown:
                self._unknown[addr] = min(seen, t)
        while len(self._unknown) > self.cfg["max_tracked"]:
            self._unknown.popitem(last=False)
        for addr, expires, name in table[:self.cfg["table_capacity"]]:
            self.table.add(addr, expires, name, t)
        self.attack = attack
        if attack:
            self.attack_since, self.attack_until, self._next_pass = since, until, next_pass
            self._granted = granted
        self.last_port, self.last_dst = port, dst
        for k, v in stats.items():
            setattr(self.stats, k, v)
        return True
