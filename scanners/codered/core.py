"""The Code-Red detector, sans-I/O: frames and a clock in, verdicts and alerts out.

From section 5.3 of the self-securing NI paper, widened to every way a worm reaches a new host.  A worm like
Code-Red (TCP), Slammer (UDP) or a ping sweep contacts random addresses; a host rarely contacts a new address
without first asking DNS for it, or being contacted by it.  So the detector

1. shadows the guest's DNS answers, over UDP and over TCP (``observe_dns_stream``: length-prefixed messages,
   which may span segments, reassembled with bounds): every A/AAAA address in a response (answer, authority
   and additional sections; CNAME chains noted) goes into a table with its TTL.  An entry is *kept* after its
   TTL expires, because programs reuse gethostbyname() results long after; expired entries are pruned only
   when the table is full, earliest expiry first, and only when nothing has expired is an unexpired entry
   evicted (again the one that expires first), so memory stays bounded whatever the network sends.
   *PTR laundering* is refused: a worm that reverse-resolves a random address and then forward-resolves the
   name it got back would otherwise make that address "resolved"; an A/AAAA answer for a name the guest
   learned from a PTR answer does not add the address the PTR was about (``stats.ptr_laundered``).  Nor
   does DNS the worm controls launder everything: one registered domain (by the public suffix list) vouches
   for at most ``zone_networks_max`` networks and ``zone_addresses_max`` addresses in ten minutes
   (``zone_spread``), a name that spells its address out (a wildcard zone: ``10-1-2-3.nip.io``) for only a few
   (``name_laundered``), and with ``resolvers`` set only those servers' answers count (``dns_not_resolver``);
2. learns *peers*: an address that contacted the guest first (a TCP SYN, a UDP datagram, an ICMP echo request
   to the guest) is known, and so is a DNS server that answered one of the guest's queries (bounded, oldest
   forgotten first, ``peer_capacity``);
3. decides every new destination from the guest: a TCP SYN (SYN set, ACK clear), a UDP datagram, an ICMP or
   ICMPv6 echo request.  A destination in the DNS table, a peer, or in the administrator's ``known_networks``
   is *known* and always passes at once; so do multicast groups and the broadcast address (DHCP, mDNS, SSDP:
   the link, not a host a worm picked).  Any other destination is *unknown*: it is one "random connection"
   in the paper's words;
4. counts *unique unknown destination addresses* in three sliding windows: the last second, minute and ten
   minutes (one address counts once per window however many packets, ports, protocols or retransmissions go
   to it).  More than ``max_per_second`` (default 2), ``max_per_minute`` (10) or ``max_per_10_minutes`` (20)
   is an attack (the last window catches slow scanners).  The packet that crosses the threshold is the first
   one cut;
5. in attack mode, for ``attack_duration`` seconds (default 60), throttles like Williamson's virus throttle:
   every unknown destination goes into a *delay queue* (bounded, ``queue_capacity``; its packets cut), and
   one destination leaves the queue per tick of a fixed clock, whatever the worm's pace afterwards (a tick
   with an empty queue is lost, so a slow worm cannot save up releases).  The tick is ``pass_interval``
   seconds (default 6, the paper's), or longer for a slower scanner: at most ``release_share`` (5 %) of the
   pace at which unknown destinations came when the attack was detected or re-evaluated (those of the last
   ten minutes over the time they span), and at least one every ``max_pass_interval`` seconds; so a scanner at one address
   every 10 s is released one address every 200 s, not one every 6 s.  A released destination then passes
   (TCP's retransmission of the SYN gets through; for UDP and ICMP the next datagram to it) for
   ``attack_duration`` seconds.  Known destinations always pass at once, never queued.  In *strict mode*
   (``unknown = "queue"``) every unknown destination goes into that queue from the first one, attack or
   not, released one per ``queue_interval`` (120 s) counted from when the queue stopped being empty, each
   release good for ``queue_grant`` seconds: a slow worm then gets nothing out before detection either, and an
   address nothing vouched for connects on a retry after its turn;
6. alerts when attack mode starts and at every re-evaluation (when ``attack_duration`` has passed) that finds
   the rate still above a threshold, with the count of unique unknown destinations over the last minute, the
   most recent protocol, destination and port; otherwise attack mode ends quietly (``stats`` records it);
7. alerts *protocol anomalies it cuts*: a fragment of a held packet without its transport header (a SYN
   hidden in IP fragments), at most one alert per ``anomaly_alert_interval`` seconds with a count.

Each protocol gets its containment action: a cut TCP SYN is retransmitted by the guest's stack (so a released
destination connects on the next retransmission), a cut UDP datagram or echo request is lost (Slammer sends
each probe once: released destinations only let later packets through).

DNS responses are accepted only if they answer a query the guest sent (same addresses and ports, transport,
transaction ID and question) within ``query_timeout`` seconds, unless ``match_queries`` is false: that keeps a
host on the network from whitelisting addresses by spraying unsolicited answers at the guest.  Fragmented UDP
responses are not shadowed: names resolved that way look unknown (see scanners/README.md).

    det = CodeRedDetector(config, clock=time.monotonic)
    v = det.handle_frame(direction, frame_bytes)     # direction: "from_guest" / "to_guest" (or 1 / 2)
    v.action                 # "pass" / "cut" for new destinations, None for frames that need no decision
    v.alert                  # an Alert or None
    det.observe_dns_stream(key, direction, data, flow)   # bytes of a TCP/53 connection, in order
    alert = det.tick()       # call now and then when no frames come: releases and re-evaluation are timed

All methods take an optional ``now`` (seconds, any monotonic origin); by default the injected clock is read.

What the detector knows can outlive its process (the scanner keeps it with the NI kernel: ``Scanner.checkpoint``),
so a restart in attack mode does not reopen the door to a worm, and a restart does not forget the guest's warm
DNS cache (the table and the peers are saved too)::

    doc = det.snapshot(max_bytes=65536, wall=time.time())   # a JSON-able dict that fits in max_bytes
    det.restore(doc, wall=time.time())                       # in a new process: attack mode, windows, table
    det.dirty, det.urgent        # something changed since the last snapshot; ... that a decision depends on

Times are saved relative to the snapshot and its wall-clock time, so they mean the same in a process with another
monotonic origin (a daemon restart, a reboot).  ``urgent`` is set when an unknown destination passed or attack
mode started, continued or ended: snapshot *before* sending that decision, and no unknown destination can get
out twice across a restart; other changes (cut packets in attack mode, DNS answers) can wait a second.
"""
from __future__ import annotations

import collections
import heapq
import ipaddress
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from . import dns
from .packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FragmentError, PacketError, parse_frame
from .settings import overlay

__all__ = ["CodeRedDetector", "Alert", "Verdict", "ConfigError", "DEFAULTS", "DnsTable"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

DEFAULTS: dict[str, Any] = {
    "max_per_second": 2,        # more unique unknown destinations than this in 1 s: attack
    "max_per_minute": 10,       # ... or more than this in 60 s
    "max_per_10_minutes": 20,   # ... or more than this in 600 s (slow scanners)
    "pass_interval": 6.0,       # attack mode: one queued unknown destination is released every this many s,
    "release_share": 0.05,      # ... or slower: at most this share of the scanner's observed pace,
    "max_pass_interval": 600.0,  # ... but at least one every this many seconds
    "queue_capacity": 256,      # unknown destinations waiting in attack mode (more are cut and forgotten)
    "attack_duration": 60.0,    # attack mode lasts this long, then the rate is re-evaluated
    "unknown": "pass",          # outside attack mode: "pass" unknown destinations (counted), or "queue"
                                # every one of them (strict: even a slow worm's first probes wait)
    "queue_interval": 120.0,    # strict mode: the delay queue's tick (one unknown destination released per tick)
    "queue_grant": 600.0,       # strict mode: a released destination passes for this long
    "table_capacity": 4096,     # DNS shadow table entries (the paper saw at most 293 per desktop)
    "peer_capacity": 4096,      # addresses that contacted the guest first, DNS servers that answered
    "max_ttl": 86400,           # longer TTLs are cut to this (expiry order only: entries outlive TTLs anyway)
    "match_queries": True,      # accept only responses to queries the guest sent
    "query_timeout": 30.0,      # how long a query waits for its response
    "max_pending_queries": 1024,
    "max_tracked": 65536,       # unknown destinations remembered for the windows (counts saturate here)
    "known_networks": [],       # CIDRs always treated as known (e.g. the local subnet's servers)
    "resolvers": [],            # the guest's DNS servers (CIDRs): if set, only their answers are shadowed and
                                # a query to any other server is a new destination like any other
    "zone_networks_max": 32,    # distinct networks (IPv4 /16, IPv6 /32) one domain's answers may vouch for in
                                # ten minutes; more are not added (DNS a worm controls launders no address)
    "zone_addresses_max": 256,  # ... and distinct addresses
    "zone_exempt": [],          # domains whose answers are not held to those limits (e.g. "amazonaws.com")
    "learn_inbound": True,      # a peer that contacted the guest first is known
    "dns_port": 53,
    "unparseable": "cut",       # verdict for a held frame that is not a parseable new destination
    "anomaly_alert_interval": 10.0,   # at most one protocol-anomaly alert per this many seconds
    # what the scanner process subscribes to (scanners/codered/__main__.py; the policy must allow it):
    "protocols": ["tcp", "udp", "icmp"],   # new destinations decided: TCP SYNs, UDP datagrams, echo requests
    "dns_over_tcp": True,       # shadow DNS answers over TCP/53 too (a read-only stream subscription)
    "hold_established": False,  # hold every UDP datagram / ICMP message, not only those that open a flow
}

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_SECOND = 1.0
_MINUTE = 60.0
_TEN_MINUTES = 600.0
_DIRECTIONS = {"from_guest": "from_guest", "to_guest": "to_guest", 1: "from_guest", 2: "to_guest"}
_PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp"}
#: TCP/53 connections followed at once, and the bytes buffered per direction (a length prefix and the
#: largest DNS message: RFC 1035 4.2.2)
MAX_DNS_STREAMS = 256
MAX_DNS_STREAM_BUFFER = 2 + dns.MAX_MESSAGE
#: servers the guest may query before they answered once (see _resolver_allowed)
MAX_NEW_RESOLVERS = 4
#: names learned from PTR answers, remembered against laundering
MAX_PTR_NAMES = 4096


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
    out = overlay(DEFAULTS, config, "Code-Red scanner", ConfigError)

    def number(key: str, lo: float, integer: bool = False) -> None:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ConfigError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
        if not math.isfinite(v) or v < lo:
            raise ConfigError(f"{key}: {v!r} is below {lo}")

    for key in ("max_per_second", "max_per_minute", "max_per_10_minutes"):
        number(key, 0, integer=True)
    for key in ("table_capacity", "max_pending_queries", "max_tracked", "queue_capacity", "peer_capacity"):
        number(key, 1, integer=True)
    number("max_ttl", 0, integer=True)
    number("dns_port", 1, integer=True)
    if out["dns_port"] > 65535:
        raise ConfigError("dns_port: must be at most 65535")
    number("release_share", 0.000001)
    if out["release_share"] > 1:
        raise ConfigError("release_share: at most 1")
    out["release_share"] = float(out["release_share"])
    for key in ("pass_interval", "max_pass_interval", "attack_duration", "query_timeout",
                "anomaly_alert_interval"):
        number(key, 0.001)
        out[key] = float(out[key])
    if out["max_pass_interval"] < out["pass_interval"]:
        raise ConfigError("max_pass_interval: must be at least pass_interval")
    if out["unknown"] not in ("pass", "queue"):
        raise ConfigError("unknown: expected 'pass' or 'queue'")
    for key in ("queue_interval", "queue_grant"):
        number(key, 1.0)
        out[key] = float(out[key])
    protos = out["protocols"]
    if (isinstance(protos, str) or not isinstance(protos, (list, tuple)) or "tcp" not in protos
            or any(p not in ("tcp", "udp", "icmp") for p in protos)):
        raise ConfigError("protocols: expected a list of tcp, udp, icmp (tcp included)")
    out["protocols"] = tuple(dict.fromkeys(protos))
    for key in ("match_queries", "learn_inbound", "dns_over_tcp", "hold_established"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"{key}: expected true or false")
    if out["unparseable"] not in ("pass", "cut"):
        raise ConfigError("unparseable: expected 'pass' or 'cut'")
    for key in ("known_networks", "resolvers"):
        nets = out[key]
        if isinstance(nets, str) or not isinstance(nets, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of CIDRs")
        try:
            out[key] = tuple(ipaddress.ip_network(str(n), strict=False) for n in nets)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    for key in ("zone_networks_max", "zone_addresses_max"):
        number(key, 1, integer=True)
    if out["unknown"] == "queue" and not out["resolvers"]:
        # otherwise a query to a "new resolver" (four in ten minutes pass uncounted) would be a way out
        raise ConfigError('unknown = "queue" needs resolvers: the guest\'s DNS servers (CIDRs), the only '
                          'servers a query may go to without waiting its turn')
    ex = out["zone_exempt"]
    if isinstance(ex, str) or not isinstance(ex, (list, tuple)) or not all(
            isinstance(d, str) and 0 < len(d.strip(".")) <= 253 for d in ex):
        raise ConfigError("zone_exempt: expected a list of domain names")
    out["zone_exempt"] = tuple(d.strip(".").lower() for d in ex)
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
    dns_tcp_messages: int = 0
    dns_tcp_overrun: int = 0
    addresses_added: int = 0
    ptr_laundered: int = 0
    name_laundered: int = 0         # addresses a name spelled out (a wildcard zone): not added
    zone_spread: int = 0            # addresses past their domain's budget: not added
    dns_not_resolver: int = 0       # answers from a server not in ``resolvers``: not shadowed
    dns_records_cut: int = 0        # messages with more than MAX_ADDRESS_RECORDS address records
    peers_learned: int = 0
    syn_known: int = 0              # new destinations (any protocol) that were known
    syn_unknown_passed: int = 0     # ... unknown and passed
    syn_unknown_cut: int = 0        # ... unknown and cut
    udp_unknown: int = 0
    multicast: int = 0              # to multicast groups or the broadcast address: not counted
    icmp_unknown: int = 0
    queued: int = 0
    strict_held: int = 0            # unknown destinations cut outside attack mode (``unknown = "queue"``)
    queue_full: int = 0
    released: int = 0
    anomalies: int = 0
    attacks: int = 0
    attack_continued: int = 0
    attack_ended: int = 0


class _LruSet:
    """Keys with a value, oldest forgotten first beyond ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.d: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()

    def add(self, key: Any, value: Any = True) -> bool:
        new = key not in self.d
        self.d[key] = value
        self.d.move_to_end(key)
        while len(self.d) > self.capacity:
            self.d.popitem(last=False)
        return new

    def __contains__(self, key: Any) -> bool:
        return key in self.d

    def get(self, key: Any, default: Any = None) -> Any:
        return self.d.get(key, default)

    def __len__(self) -> int:
        return len(self.d)


#: Mozilla's public suffix list as Debian ships it (package ``publicsuffix``, installed by ``make deps``; the
#: scanner sandbox binds it read-only); without it, an approximation (below)
PSL_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"
#: second-level labels under which country codes register names (co.uk, com.au): the approximation used when
#: the list is missing
_SLDS = frozenset(("co", "com", "net", "org", "gov", "edu", "ac"))
#: the domain every name under a top-level domain the list does not know is charged to (names a worm's own DNS
#: server makes up, internal zones such as .local or .internal): one budget for them all
UNLISTED = "(unlisted top-level domains)"
ZONE_CAPACITY = 256             # domains tracked at once; more share one overflow budget while all are active
OVERFLOW = "(overflow)"
MAX_ADDRESS_RECORDS = 512       # address records looked at per DNS message (a legitimate one has dozens)
#: names that spell their address out (``10-1-2-3.nip.io``, ``ip-10-0-1-15.ec2.internal``) vouch for a few
#: addresses per domain and ten minutes, not the domain's whole budget: cloud hosts' and clusters' own names
#: work, a wildcard service launders next to nothing
EMBEDDED_NETWORKS, EMBEDDED_ADDRESSES = 4, 32


class PublicSuffixes:
    """The public suffix list's rules: suffixes, wildcards (``*.ck``) and exceptions (``!www.ck``), names in
    ASCII (IDNA) form.  ``load()`` reads Debian's copy; None if it cannot."""

    def __init__(self, lines):
        self.rules, self.wild, self.exceptions, self.tlds = set(), set(), set(), set()
        for line in lines:
            line = line.strip()
            if not line or line.startswith("//"):
                continue
            rule = line.split()[0].lower()
            try:
                rule = ".".join(lb if lb in ("*", "!") or lb.isascii() else lb.encode("idna").decode("ascii")
                                for lb in rule.split("."))
            except UnicodeError:
                continue
            if rule.startswith("!"):
                self.exceptions.add(rule[1:])
            elif rule.startswith("*."):
                self.wild.add(rule[2:])
            else:
                self.rules.add(rule)
            self.tlds.add(rule.rsplit(".", 1)[-1].lstrip("!*"))

    @classmethod
    def load(cls, path: str = PSL_PATH) -> "Optional[PublicSuffixes]":
        try:
            with open(path, encoding="utf-8") as f:
                psl = cls(f)
        except (OSError, UnicodeError):
            return None
        return psl if psl.rules else None

    def registered(self, labels: list) -> str:
        """The registrable domain of a name's labels (lower case), or UNLISTED."""
        if labels[-1] not in self.tlds:
            return UNLISTED
        n = len(labels)
        for i in range(n):                      # the longest public suffix first
            cand = ".".join(labels[i:])
            if cand in self.exceptions:         # !www.ck: www.ck is registrable, ck the suffix
                suffix = i + 1
                break
            if cand in self.rules or (i + 1 < n and ".".join(labels[i + 1:]) in self.wild):
                suffix = i
                break
        else:
            suffix = n - 1
        return ".".join(labels[max(suffix - 1, 0):])


_PSL: "Optional[PublicSuffixes]" = None
_PSL_TRIED = False


def public_suffixes() -> "Optional[PublicSuffixes]":
    """The list, read once per process (a scanner reads it before it locks itself down)."""
    global _PSL, _PSL_TRIED
    if not _PSL_TRIED:
        _PSL, _PSL_TRIED = PublicSuffixes.load(), True
    return _PSL


def registered_domain(name: str, psl: "Optional[PublicSuffixes]" = None) -> str:
    """The domain a registrant controls: by the public suffix list (``www.example.co.uk`` ->
    ``example.co.uk``, names under a top-level domain it does not list -> UNLISTED), or without it the last two
    labels, three under a country code's common second level.  The root and empty names -> UNLISTED."""
    labels = [lb for lb in name.strip(".").lower().split(".") if lb]
    if not labels:
        return UNLISTED
    psl = psl if psl is not None else public_suffixes()
    if psl is not None:
        return psl.registered(labels)
    if len(labels) > 2 and len(labels[-1]) == 2 and labels[-2] in _SLDS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


_SPLIT = re.compile(r"[.\-]")


def embeds_address(names, addr: IPAddress) -> bool:
    """Whether one of ``names`` spells ``addr`` out, the ways wildcard DNS services read names: four decimal
    parts equal to its octets, with ``.`` or ``-`` between them in any mix (``10.1.2.3.nip.io``,
    ``app-10-1.2-3.nip.io``, ``ip-10-1-2-3.ec2.internal``; leading zeros allowed), eight hex digits
    (``0a010203.nip.io``); IPv6 written with ``-`` for ``:`` in any of its forms, as a whole label or after
    or before one word (``fd00--7.sslip.io``, ``www-2001-db8-0-0-1--1``), or as 32 hex digits."""
    if addr.version == 4:
        octets = [str(b) for b in addr.packed]
        hexform = addr.packed.hex()
        for nm in names:
            toks = _SPLIT.split(nm.lower())
            for i, tok in enumerate(toks):
                if tok == hexform:
                    return True
                if (i + 4 <= len(toks) and all(x.isascii() and x.isdigit() and len(x) <= 3 for x in toks[i:i + 4])
                        and [str(int(x)) for x in toks[i:i + 4]] == octets):
                    return True
        return False
    hexform = addr.packed.hex()
    # IPv6: a label, or a label without one leading and/or trailing word (``www-fd00--7``), read with
    # ``:`` for ``-``: at most four parses a label, whatever the label (a hostile answer's names must not
    # cost a span search each)
    for nm in set(names):
        for label in nm.lower().split("."):
            if hexform in _SPLIT.split(label) or label.replace("-", "") == hexform:
                return True
            if label.count("-") < 2:
                continue
            parts = label.split("-")
            for lo in (0, 1):
                for hi in (len(parts), len(parts) - 1):
                    if hi - lo < 3:
                        continue
                    try:
                        if ipaddress.IPv6Address(":".join(parts[lo:hi])) == addr:
                            return True
                    except ValueError:
                        pass
    return False


def _num(v: Any) -> float:
    """A finite JSON number (not a bool), for what a snapshot says; ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"not a number: {v!r}")
    return float(v)


def _network(addr: IPAddress) -> IPAddress:
    bits = 16 if addr.version == 4 else 32
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False).network_address


class _ZoneBudget:
    """Per domain, the distinct networks and addresses its answers vouched for in the last ten minutes; an
    answer past ``max_nets`` networks or ``max_addrs`` addresses vouches for nothing new.  A worm that
    controls a zone (its own, or a wildcard one) then launders a bounded number of targets, not all.  A domain
    is forgotten only when its window is empty: with ``capacity`` domains all active, new ones share one
    overflow budget (so looking up many other domains cannot buy a worm's domain a fresh budget)."""

    def __init__(self, max_nets: int, max_addrs: int, window: float = _TEN_MINUTES, capacity: int = ZONE_CAPACITY):
        self.max_nets, self.max_addrs, self.window, self.capacity = max_nets, max_addrs, window, capacity
        # domain -> (networks -> last time, addresses -> last time), both oldest first
        self.zones: "dict[str, tuple]" = {}

    def _prune(self, z: tuple, horizon: float) -> bool:
        """Drops what left the window; True if nothing is left."""
        for d in z:
            while d and next(iter(d.values())) <= horizon:
                d.popitem(last=False)
        return not z[0] and not z[1]

    def admit(self, zone: str, addr: IPAddress, t: float, max_nets: Optional[int] = None,
              max_addrs: Optional[int] = None) -> bool:
        horizon = t - self.window
        z = self.zones.get(zone)
        if z is None:
            if len(self.zones) >= self.capacity:
                for k in [k for k, v in self.zones.items() if k != OVERFLOW and self._prune(v, horizon)]:
                    del self.zones[k]
            if len(self.zones) >= self.capacity and zone != OVERFLOW:
                zone = OVERFLOW
                z = self.zones.get(zone)
            if z is None:
                z = self.zones[zone] = (collections.OrderedDict(), collections.OrderedDict())
        nets, addrs = z
        self._prune(z, horizon)
        net = _network(addr)
        mn = self.max_nets if max_nets is None else min(max_nets, self.max_nets)
        ma = self.max_addrs if max_addrs is None else min(max_addrs, self.max_addrs)
        if addr not in addrs and (len(addrs) >= ma or (net not in nets and len(nets) >= mn)):
            return False
        for d, k in ((nets, net), (addrs, addr)):
            d[k] = t
            d.move_to_end(k)
        return True

    # ---- across restarts: what each domain already used of its budget
    BUCKET = 60.0          # addresses are saved as counts per minute of age (a domain may hold 256)

    def snapshot(self, t: float) -> list:
        """[domain, [[network, age], ...], [addresses per minute of age, youngest first]] per domain that
        used some of its budget, the most used first (the ones a worm is spending).  An embedded-names budget
        is saved under ["e", domain].  Addresses are saved as counts: a restarted scanner counts them against
        the domain without knowing which they were."""
        horizon = t - self.window
        out = []
        for zone, z in self.zones.items():
            if self._prune(z, horizon):
                continue
            # ages rounded down: a restored network leaves the window no sooner than it would have
            nets = [[str(n), int(max(0.0, t - seen))] for n, seen in reversed(z[0].items())]
            hist = [0] * int(math.ceil(self.window / self.BUCKET))
            for seen in z[1].values():
                hist[min(len(hist) - 1, int(max(0.0, t - seen) // self.BUCKET))] += 1
            while hist and not hist[-1]:
                hist.pop()
            out.append([["e", zone[1]] if isinstance(zone, tuple) else zone, nets, hist])
        out.sort(key=lambda e: sum(e[2]), reverse=True)
        return out

    def parse(self, entries: Any, base: float) -> dict:
        """What :meth:`snapshot` saved, ``base`` being the snapshot's time on this clock, ready for
        :meth:`merge`.  Each saved address counts again as it was, no younger than its minute of age says (so
        none leaves the window sooner than it would have).  Raises ValueError on anything else."""
        zones: "dict" = {}
        if not isinstance(entries, list):
            raise ValueError("zones: not a list")
        for e in entries[:self.capacity + 1]:
            zone, nets, hist = e
            if isinstance(zone, list) and len(zone) == 2 and zone[0] == "e" and isinstance(zone[1], str):
                key: Any = ("embedded", zone[1][:255])
            elif isinstance(zone, str):
                key = zone[:255]
            else:
                raise ValueError(f"zones: not a domain: {zone!r}")
            if not isinstance(nets, list) or not isinstance(hist, list):
                raise ValueError("zones: not lists")
            n_d: "collections.OrderedDict" = collections.OrderedDict()
            for net, age in reversed(nets[:self.max_nets]):                  # oldest first
                if not isinstance(net, str):
                    raise ValueError(f"zones: not a network: {net!r}")
                n_d[_network(ipaddress.ip_address(net))] = base - max(0.0, _num(age))
            a_d: "collections.OrderedDict" = collections.OrderedDict()
            count = 0
            for i in reversed(range(min(len(hist), int(math.ceil(self.window / self.BUCKET))))):
                c = hist[i]
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    raise ValueError(f"zones: not a count: {c!r}")
                for _ in range(min(c, self.max_addrs - count)):
                    a_d[("restored", count)] = base - i * self.BUCKET   # a key no address equals
                    count += 1
            zones[key] = (n_d, a_d)
        return zones

    def merge(self, zones: dict, t: float) -> None:
        horizon = t - self.window
        for key, z in zones.items():
            if self._prune(z, horizon):
                continue
            if key in self.zones or (len(self.zones) >= self.capacity and key != OVERFLOW):
                continue      # what this process already learned stands; past capacity, dropped
            self.zones[key] = z


class _DnsStream:
    """One TCP/53 connection's bytes in one direction, cut into length-prefixed DNS messages."""

    def __init__(self):
        self.buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            return []
        if len(self.buf) + len(data) > MAX_DNS_STREAM_BUFFER + 65535:
            # more than one whole message could need: nothing legitimate sends that much unframed
            self.broken = True
            self.buf.clear()
            return []
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            n = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + n:
                break
            out.append(bytes(self.buf[2:2 + n]))
            del self.buf[:2 + n]
        return out


class CodeRedDetector:
    def __init__(self, config: Optional[Mapping[str, Any]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = load_config(config)
        self.clock = clock
        self.table = DnsTable(self.cfg["table_capacity"])
        self.peers = _LruSet(self.cfg["peer_capacity"])        # address -> "inbound" / "dns server"
        self.stats = _Stats()
        # unknown destination -> when a packet last went to it; ordered oldest first
        self._unknown: "collections.OrderedDict[IPAddress, float]" = collections.OrderedDict()
        # (flow, txid) -> (question, when sent); ordered oldest first.  flow is (transport, client addr,
        # client port, server addr)
        self._pending: "collections.OrderedDict[tuple, tuple[dns.Question, float]]" = collections.OrderedDict()
        # PTR answers: name -> the address it was the reverse of
        self._ptr_names = _LruSet(MAX_PTR_NAMES)
        self._zones = _ZoneBudget(self.cfg["zone_networks_max"], self.cfg["zone_addresses_max"])
        self.psl = public_suffixes()
        self._spread_alerted: "collections.OrderedDict[str, float]" = collections.OrderedDict()
        self._alert_out: Optional[Alert] = None     # an alert a DNS answer raised, for the next verdict
        self._new_resolvers: dict[IPAddress, float] = {}     # servers queried before they answered -> when
        self._dns_streams: "collections.OrderedDict[tuple, _DnsStream]" = collections.OrderedDict()
        self._last_now = -math.inf
        self.attack = False
        self.attack_since = 0.0
        self.attack_until = 0.0
        self.strict = self.cfg["unknown"] == "queue"
        # the attack-mode delay queue's shortest tick: in strict mode never faster than outside attack mode
        self._min_interval = max(self.cfg["pass_interval"], self.cfg["queue_interval"]) if self.strict \
            else self.cfg["pass_interval"]
        self.interval = self._min_interval            # the delay queue's current release interval
        self._next_release = 0.0
        self._queue: "collections.OrderedDict[IPAddress, float]" = collections.OrderedDict()
        self._granted: dict[IPAddress, float] = {}
        self.last_port: Optional[int] = None
        self.last_dst: Optional[IPAddress] = None
        self.last_proto: str = "tcp"
        self._anomaly_next = -math.inf
        self._anomaly_unreported = 0
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
        """Routes one frame: DNS queries and responses are observed, a new destination from the guest (TCP
        SYN, UDP datagram, ICMP echo request) is decided, what reaches the guest first teaches peers.
        Anything else yields the ``unparseable`` verdict (applied by the caller only if the frame is held),
        with an alert for a fragment without its transport header."""
        t = self._now(now)
        self.stats.frames += 1
        d = _DIRECTIONS.get(direction)
        try:
            if d is None:
                raise PacketError(f"bad direction {direction!r}")
            pkt = parse_frame(frame)
        except FragmentError as exc:
            self.stats.unparseable += 1
            action = self.cfg["unparseable"]
            alert = self._anomaly(t, exc, d) if action == "cut" and d == "from_guest" else None
            return Verdict(action, alert or self.tick(t), f"fragment: {exc}")
        except PacketError as exc:
            self.stats.unparseable += 1
            return Verdict(self.cfg["unparseable"], None, f"unparseable: {exc}")
        port = self.cfg["dns_port"]
        if d == "from_guest":
            if pkt.is_tcp_syn:
                action, alert = self.decide_new(pkt.dst, pkt.dport, t, proto="tcp")
                return Verdict(action, alert, "syn")
            if pkt.proto == PROTO_UDP:
                if (pkt.dport == port
                        and self.observe_dns_query(pkt.payload, t, flow=("udp", pkt.src, pkt.sport, pkt.dst))
                        and self._resolver_allowed(pkt.dst, t)):
                    return Verdict("pass", self.tick(t), "dns query")
                action, alert = self.decide_new(pkt.dst, pkt.dport, t, proto="udp")
                return Verdict(action, alert, "udp")
            if pkt.is_echo_request:
                action, alert = self.decide_new(pkt.dst, 0, t, proto="icmp")
                return Verdict(action, alert, "echo request")
            if pkt.proto in (PROTO_ICMP, PROTO_ICMPV6):
                return Verdict("pass", self.tick(t), "icmp")        # replies, errors, neighbour discovery
        else:
            if pkt.proto == PROTO_UDP and pkt.sport == port:
                self.observe_dns_response(pkt.payload, t, flow=("udp", pkt.dst, pkt.dport, pkt.src))
                return Verdict(None, self.take_alert() or self.tick(t), "dns response")
            if pkt.is_tcp_syn or pkt.proto == PROTO_UDP or pkt.is_echo_request:
                self.observe_inbound(pkt.src, t)
                return Verdict(None, self.tick(t), "inbound")
            return Verdict(None, self.tick(t), "to guest")
        self.stats.unparseable += 1
        return Verdict(self.cfg["unparseable"], self.tick(t), "not a new destination or DNS")

    def observe_inbound(self, src: Union[IPAddress, str], now: Optional[float] = None) -> None:
        """``src`` contacted the guest first (a SYN, a datagram, an echo request to it): a known peer."""
        self._now(now)
        if not self.cfg["learn_inbound"]:
            return
        addr = ipaddress.ip_address(src) if isinstance(src, str) else src
        if addr not in self.peers and not self.is_known(addr):
            self.stats.peers_learned += 1
            self.dirty = True
        self.peers.add(addr, "inbound")
        self._queue.pop(addr, None)

    def _anomaly(self, t: float, exc: FragmentError, d: Optional[str]) -> Optional[Alert]:
        self.stats.anomalies += 1
        self._anomaly_unreported += 1
        if t < self._anomaly_next:
            return None
        self._anomaly_next = t + self.cfg["anomaly_alert_interval"]
        n, self._anomaly_unreported = self._anomaly_unreported, 0
        proto = _PROTO_NAMES.get(exc.proto, str(exc.proto))
        return Alert(f"protocol anomaly cut: {exc} ({proto} {exc.src} -> {exc.dst}); "
                     f"{n} such frame{'s' if n != 1 else ''} since the last alert", {
                         "event": "anomaly", "anomaly": "fragment", "detail": str(exc), "proto": proto,
                         "src": str(exc.src), "dst": str(exc.dst), "count": n})

    # ---- DNS
    def observe_dns_query(self, payload: bytes, now: Optional[float] = None,
                          flow: Optional[tuple] = None) -> bool:
        """Remembers a query the guest sent.  ``flow`` is (transport, client address, client port, server
        address), or the older (client address, client port, server address) for UDP."""
        t = self._now(now)
        try:
            q = dns.parse_query(payload)
        except dns.DnsError:
            return False
        self.stats.dns_queries += 1
        key = (_flow(flow), q.id)
        self._expire_queries(t)
        self._pending.pop(key, None)
        self._pending[key] = (q.questions[0], t)
        while len(self._pending) > self.cfg["max_pending_queries"]:
            self._pending.popitem(last=False)
        return True

    def _resolver_allowed(self, server: IPAddress, t: float) -> bool:
        """A well-formed query to a server that has not answered yet passes uncounted, for at most
        ``MAX_NEW_RESOLVERS`` such servers in ten minutes (the guest's resolvers before their first answer);
        beyond that, a query to a new server is a new destination like any other (a scan over UDP/53)."""
        if self.is_known(server):
            return True
        if self.cfg["resolvers"]:
            return self._is_resolver(server)
        horizon = t - _TEN_MINUTES
        for a in [a for a, when in self._new_resolvers.items() if when <= horizon]:
            del self._new_resolvers[a]
        if server in self._new_resolvers or len(self._new_resolvers) < MAX_NEW_RESOLVERS:
            self._new_resolvers.setdefault(server, t)
            return True
        return False

    def _is_resolver(self, server: Optional[IPAddress]) -> bool:
        return server is not None and any(server in net for net in self.cfg["resolvers"]
                                          if net.version == server.version)

    def _exempt(self, names: tuple) -> bool:
        """Every name the answer went through (question, CNAMEs, owner) is under an exempt domain: one the
        operator trusts to resolve only to its own machines.  A CNAME out of it is charged as usual."""
        ex = self.cfg["zone_exempt"]
        return bool(ex) and all(any(n == d or n.endswith("." + d) for d in ex) for n in names)

    def _vouches(self, zone: str, names: tuple, addr: IPAddress, t: float) -> bool:
        """Whether an answer for ``names`` (the question first), charged to ``zone``, may make ``addr``
        known."""
        if self._exempt(names):
            return True
        if embeds_address(names, addr):
            # the name spells its address out: a small allowance of its own, per domain
            if not self._zones.admit(("embedded", zone), addr, t, EMBEDDED_NETWORKS, EMBEDDED_ADDRESSES):
                self.stats.name_laundered += 1
                self._spread_alert(zone, names[0], addr, t, embedded=True)
                return False
            return True
        if not self._zones.admit(zone, addr, t):
            self.stats.zone_spread += 1
            self._spread_alert(zone, names[0], addr, t, embedded=False)
            return False
        return True

    def _spread_alert(self, zone: str, asked: str, addr: IPAddress, t: float, embedded: bool) -> None:
        """The first refusal per domain and ten minutes is alerted: the operator learns which domain
        vouches for more addresses than a real one does (DNS laundering, or a domain for zone_exempt)."""
        key = ("embedded " if embedded else "") + zone
        last = self._spread_alerted.get(key)
        if last is not None and t - last < _TEN_MINUTES:
            return
        self._spread_alerted[key] = t
        self._spread_alerted.move_to_end(key)
        while len(self._spread_alerted) > ZONE_CAPACITY:
            self._spread_alerted.popitem(last=False)
        what = (f"names spelling out more than {EMBEDDED_ADDRESSES} addresses or {EMBEDDED_NETWORKS} networks"
                if embedded else f"more than {self.cfg['zone_addresses_max']} addresses or "
                                 f"{self.cfg['zone_networks_max']} networks")
        self._alert_out = Alert(
            f"DNS laundering suspected: {zone} answered {what} in ten minutes (latest: {asked} -> {addr}); "
            f"its further answers vouch for nothing new", {
                "event": "dns_spread", "domain": zone, "name": asked, "address": str(addr),
                "embedded": embedded, "zone_networks_max": self.cfg["zone_networks_max"],
                "zone_addresses_max": self.cfg["zone_addresses_max"]})

    def take_alert(self) -> Optional[Alert]:
        """An alert a DNS answer raised (``observe_dns_response``/``observe_dns_stream``), once."""
        a, self._alert_out = self._alert_out, None
        return a

    def _expire_queries(self, now: float) -> None:
        horizon = now - self.cfg["query_timeout"]
        while self._pending:
            key, (_, sent) = next(iter(self._pending.items()))
            if sent >= horizon:
                break
            del self._pending[key]

    def observe_dns_response(self, payload: bytes, now: Optional[float] = None,
                             flow: Optional[tuple] = None) -> int:
        """Adds the addresses of a DNS response to the table; returns how many it added.  ``flow`` as for
        the query, the guest's side first.  Without a flow, or with ``match_queries`` false, the response is
        taken as it is."""
        t = self._now(now)
        matching = self.cfg["match_queries"] and flow is not None
        key_flow = _flow(flow)
        if matching:
            # Look for the query before parsing: unsolicited responses cost no parsing (a worst-case 64 KB
            # response takes ~0.2 s to parse, so a flood of them could otherwise stall the decisions).
            self._expire_queries(t)
            if len(payload) < 2 or (key_flow, int.from_bytes(payload[:2], "big")) not in self._pending:
                self.stats.dns_unsolicited += 1
                return 0
        try:
            msg = dns.parse_response(payload)
        except dns.DnsError:
            self.stats.dns_rejected += 1
            return 0
        if matching:
            pending = self._pending.get((key_flow, msg.id))
            if pending is None or len(msg.questions) != 1 or msg.questions[0] != pending[0]:
                self.stats.dns_unsolicited += 1
                return 0
            del self._pending[(key_flow, msg.id)]
            server = key_flow[3]
            if self.cfg["resolvers"] and not self._is_resolver(server):
                self.stats.dns_not_resolver += 1
                return 0
            if server is not None and server not in self.peers:
                self.peers.add(server, "dns server")     # it answered the guest: the guest's resolver
                self.dirty = True
            self._new_resolvers.pop(server, None)
        elif self.cfg["resolvers"] and not self._is_resolver(key_flow[3]):
            self.stats.dns_not_resolver += 1          # (a server known only when the flow is)
            return 0
        self.stats.dns_responses += 1
        # PTR answers: remember which names stand for which reversed address
        for rr in msg.answers:
            if rr.rtype == dns.TYPE_PTR and rr.rclass == dns.CLASS_IN and isinstance(rr.data, str):
                rev = dns.reverse_address(rr.name)
                if rev is not None:
                    self._ptr_names.add(rr.data, rev)
        n = 0
        max_ttl = self.cfg["max_ttl"]
        qnames = tuple(q.name for q in msg.questions)
        # the domain the guest asked about answers for everything in the response (glue included); with no
        # question (or the root's), every record is charged to one domain, never to its own owner's
        zone = registered_domain(qnames[0], self.psl) if qnames else UNLISTED
        for k, rec in enumerate(msg.addresses()):
            if k >= MAX_ADDRESS_RECORDS:
                self.stats.dns_records_cut += 1     # the rest of a stuffed answer is not looked at
                break
            names = (rec.name,) + rec.aliases
            if any(self._ptr_names.get(nm) == rec.address for nm in names):
                self.stats.ptr_laundered += 1     # a name it got by reverse lookup of this very address
                continue
            if rec.address not in self.table and not self._vouches(zone, qnames + names, rec.address, t):
                continue
            name = rec.aliases[0] if rec.aliases else rec.name
            self.table.add(rec.address, t + min(rec.ttl, max_ttl), name, t)
            self._queue.pop(rec.address, None)
            self.dirty = True
            n += 1
        self.stats.addresses_added += n
        return n

    def observe_dns_stream(self, key: Any, direction: Union[str, int], data: bytes, flow: tuple,
                           now: Optional[float] = None) -> int:
        """Bytes of a DNS-over-TCP connection, in stream order (``key`` names the connection, ``flow`` is
        (guest address, guest port, server address)): every whole length-prefixed message is a query (from
        the guest) or a response (to it).  Returns the addresses added."""
        t = self._now(now)
        d = _DIRECTIONS.get(direction)
        if d is None:
            return 0
        sk = (key, d)
        st = self._dns_streams.get(sk)
        if st is None:
            st = self._dns_streams[sk] = _DnsStream()
            while len(self._dns_streams) > 2 * MAX_DNS_STREAMS:
                self._dns_streams.popitem(last=False)
        was_broken = st.broken
        msgs = st.feed(data)
        if st.broken and not was_broken:
            self.stats.dns_tcp_overrun += 1
        n = 0
        try:
            g, gp, r = flow
            tflow = ("tcp", ipaddress.ip_address(g), int(gp), ipaddress.ip_address(r))
        except (TypeError, ValueError):
            return 0
        for m in msgs:
            self.stats.dns_tcp_messages += 1
            if d == "from_guest":
                self.observe_dns_query(m, t, flow=tflow)
            else:
                n += self.observe_dns_response(m, t, flow=tflow)
        return n

    def close_dns_stream(self, key: Any) -> None:
        for d in ("from_guest", "to_guest"):
            self._dns_streams.pop((key, d), None)

    def is_known(self, addr: IPAddress) -> bool:
        if addr in self.table or addr in self.peers:
            return True
        return any(addr in net for net in self.cfg["known_networks"] if net.version == addr.version)

    # ---- new destinations
    def decide_syn(self, dst: Union[IPAddress, str], dport: int,
                   now: Optional[float] = None) -> tuple[str, Optional[Alert]]:
        """The verdict on an outbound TCP SYN to ``dst``:``dport``, and an alert if one is due."""
        return self.decide_new(dst, dport, now, proto="tcp")

    def decide_new(self, dst: Union[IPAddress, str], dport: int, now: Optional[float] = None,
                   proto: str = "tcp") -> tuple[str, Optional[Alert]]:
        """The verdict on a packet from the guest to a possibly new destination (``proto``: tcp for a SYN,
        udp, icmp for an echo request), and an alert if one is due."""
        t = self._now(now)
        addr = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        alert = self._reevaluate(t)
        self._release(t)
        if self.is_known(addr):
            self.stats.syn_known += 1
            return "pass", alert
        if addr.is_multicast or addr == _BROADCAST:
            # DHCP, mDNS, SSDP, neighbour discovery: a group or the link, not a host a worm picked
            self.stats.multicast += 1
            return "pass", alert
        self.last_port, self.last_dst, self.last_proto = int(dport), addr, proto
        if proto == "udp":
            self.stats.udp_unknown += 1
        elif proto == "icmp":
            self.stats.icmp_unknown += 1
        self._note_unknown(addr, t)
        self.dirty = True
        if not self.attack:
            self.urgent = True
            if self._rate_exceeded(t):
                self._enter_attack(t)
                alert = self._alert("attack_detected", t)
                self._enqueue(addr, t)
                self.stats.syn_unknown_cut += 1
                return "cut", alert
            if self.strict and not self._granted_at(addr, t):
                self._enqueue(addr, t)
                self.stats.syn_unknown_cut += 1
                self.stats.strict_held += 1
                return "cut", alert
            self.stats.syn_unknown_passed += 1
            return "pass", alert
        if addr in self._granted:
            self.stats.syn_unknown_passed += 1
            return "pass", alert
        self._enqueue(addr, t)
        self.stats.syn_unknown_cut += 1
        return "cut", alert

    def _granted_at(self, addr: IPAddress, t: float) -> bool:
        """Strict mode outside attack mode: ``addr`` left the delay queue less than ``queue_grant`` ago."""
        when = self._granted.get(addr)
        return when is not None and t - when < self.cfg["queue_grant"]

    def _enqueue(self, addr: IPAddress, t: float) -> None:
        if addr in self._queue:
            return
        if len(self._queue) >= self.cfg["queue_capacity"]:
            self.stats.queue_full += 1
            return
        if not self._queue and not self.attack:
            # strict mode: the first release comes a whole tick after the queue stopped being empty, so a
            # worm cannot time its probes to a tick nor save releases up while it waits
            self._next_release = max(self._next_release, t + self.cfg["queue_interval"])
        self._queue[addr] = t
        self.stats.queued += 1

    def _release(self, t: float) -> None:
        """The delay queue's clock: one destination leaves per tick; a tick with nothing queued is lost."""
        if not self.attack:
            if self.strict:
                self._release_strict(t)
            return
        while t >= self._next_release:
            if self._queue:
                addr, _ = self._queue.popitem(last=False)
                self._granted[addr] = self._next_release
                self.stats.released += 1
                self.urgent = self.dirty = True
            self._next_release += self.interval

    def _release_strict(self, t: float) -> None:
        while self._queue and t >= self._next_release:
            addr, _ = self._queue.popitem(last=False)
            self._granted.pop(addr, None)        # grants stay in release order, oldest first
            self._granted[addr] = self._next_release
            self.stats.released += 1
            self.urgent = self.dirty = True
            self._next_release += self.cfg["queue_interval"]
        # expired grants go (they must not be saved and brought back), and grants are bounded like the queue
        horizon = t - self.cfg["queue_grant"]
        while self._granted:
            a, when = next(iter(self._granted.items()))
            if when > horizon and len(self._granted) <= self.cfg["queue_capacity"]:
                break
            del self._granted[a]

    def queued(self) -> list[IPAddress]:
        """The destinations waiting in the delay queue, oldest first."""
        return list(self._queue)

    def tick(self, now: Optional[float] = None) -> Optional[Alert]:
        """Time-driven work: the delay queue's releases and the end-of-attack re-evaluation.  Call it when no
        frame came for a while."""
        t = self._now(now)
        alert = self._reevaluate(t)
        self._release(t)
        return alert

    def _note_unknown(self, addr: IPAddress, t: float) -> None:
        self._unknown[addr] = t
        self._unknown.move_to_end(addr)
        self._forget_unknown(t)
        while len(self._unknown) > self.cfg["max_tracked"]:
            self._unknown.popitem(last=False)

    def _forget_unknown(self, t: float) -> None:
        horizon = t - _TEN_MINUTES
        while self._unknown:
            addr, seen = next(iter(self._unknown.items()))
            if seen > horizon:
                break
            del self._unknown[addr]

    def unknown_count(self, window: float, now: Optional[float] = None) -> int:
        """Unique unknown destinations contacted in the last ``window`` seconds (at most ten minutes)."""
        t = self._now(now)
        self._forget_unknown(t)
        if window >= _TEN_MINUTES:
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
                or self.unknown_count(_MINUTE, t) > self.cfg["max_per_minute"]
                or self.unknown_count(_TEN_MINUTES, t) > self.cfg["max_per_10_minutes"])

    def _release_interval(self, t: float) -> float:
        """The delay queue's tick: ``pass_interval``, or long enough that at most ``release_share`` of the
        scanner's pace gets out (the pace: the unknown destinations of the last ten minutes over the time
        they span), capped at ``max_pass_interval``."""
        self._forget_unknown(t)
        n = len(self._unknown)
        if n < 2:
            return max(self.cfg["max_pass_interval"], self._min_interval)
        first = next(iter(self._unknown.values()))
        span = max(t - first, 1e-3)
        want = span / ((n - 1) * self.cfg["release_share"])
        return max(min(max(self.cfg["pass_interval"], want), self.cfg["max_pass_interval"]), self._min_interval)

    def _enter_attack(self, t: float) -> None:
        self.attack = True
        self.attack_since = t
        self.attack_until = t + self.cfg["attack_duration"]
        self.interval = self._release_interval(t)
        self._next_release = t + self.interval
        self._granted.clear()
        self._queue.clear()
        self.stats.attacks += 1

    def _reevaluate(self, t: float) -> Optional[Alert]:
        if not self.attack or t < self.attack_until:
            return None
        self._release(min(t, self.attack_until))     # the ticks due before the re-evaluation
        self.dirty = self.urgent = True
        horizon = t - self.cfg["attack_duration"]      # a release is good for one attack period
        self._granted = {a: when for a, when in self._granted.items() if when > horizon}
        if self._rate_exceeded(t):
            self.attack_until = t + self.cfg["attack_duration"]
            interval = self._release_interval(t)
            if interval > self.interval:      # a slower scanner now: the next tick moves out too
                self._next_release += interval - self.interval
            self.interval = interval
            self.stats.attack_continued += 1
            return self._alert("attack_continues", t)
        self.attack = False
        self._queue.clear()
        if self.strict:
            self._granted.clear()      # an attack-mode grant lasted one attack period; strict ones start anew
        self.stats.attack_ended += 1
        return None

    def _alert(self, event: str, t: float) -> Alert:
        count = self.unknown_count(_MINUTE, t)
        last_second = self.unknown_count(_SECOND, t)
        last_10 = self.unknown_count(_TEN_MINUTES, t)
        what = "detected" if event == "attack_detected" else "continues"
        port = self.last_port if self.last_port is not None else 0
        msg = (f"Code-Red-like scanning {what}: {count} unknown destinations in the last minute "
               f"({last_second} in the last second, {last_10} in ten minutes), last port {port} "
               f"({self.last_proto} to {self.last_dst}); releasing one unknown destination every "
               f"{self.interval:.3g} s for {self.cfg['attack_duration']:g} s")
        return Alert(msg, {
            "event": event,
            "count": count,
            "count_last_second": last_second,
            "count_last_10_minutes": last_10,
            "last_port": port,
            "last_proto": self.last_proto,
            "last_dst": str(self.last_dst) if self.last_dst is not None else "",
            "max_per_second": self.cfg["max_per_second"],
            "max_per_minute": self.cfg["max_per_minute"],
            "max_per_10_minutes": self.cfg["max_per_10_minutes"],
            "pass_interval": self.interval,
            "attack_duration": self.cfg["attack_duration"],
            "queued": len(self._queue),
            "count_saturated": last_10 >= self.cfg["max_tracked"],
        })

    # ---- state across restarts
    SNAPSHOT_VERSION = 2
    SNAPSHOT_UNKNOWN = 512      # most recent unknown destinations kept (more than any threshold needs)
    SNAPSHOT_GRANTED = 256
    SNAPSHOT_QUEUE = 256
    SNAPSHOT_DNS = 512          # DNS table entries kept, latest expiry first
    SNAPSHOT_PEERS = 512        # peers kept, most recent first
    SNAPSHOT_NAME = 64          # characters of a DNS name kept
    SNAPSHOT_ZONES = 32         # domain budgets kept, the most used first (~600 bytes each at most)

    def snapshot(self, max_bytes: int = 65536, wall: Optional[float] = None, now: Optional[float] = None) -> dict:
        """What the detector knows, as a JSON-able dict whose compact JSON fits in ``max_bytes`` (the DNS
        table, the peers and then the unknown destinations are shortened, most recent kept, until it does).
        Clears ``dirty`` and ``urgent``."""
        t = self._now(now)
        wall = time.time() if wall is None else float(wall)
        unknown = [[str(a), round(t - seen, 3)] for a, seen in reversed(self._unknown.items())]
        unknown = unknown[:self.SNAPSHOT_UNKNOWN]
        dns_entries = sorted(self.table.items(), key=lambda kv: kv[1].expires, reverse=True)
        table = [[str(a), round(e.expires - t, 3), e.name[:self.SNAPSHOT_NAME]]
                 for a, e in dns_entries[:self.SNAPSHOT_DNS]]
        peers = [[str(a), v] for a, v in list(reversed(self.peers.d.items()))[:self.SNAPSHOT_PEERS]]
        doc = {
            "v": self.SNAPSHOT_VERSION, "wall": wall,
            "attack": self.attack,
            "since": round(t - self.attack_since, 3) if self.attack else 0,
            "until": round(self.attack_until - t, 3) if self.attack else 0,
            "next_pass": round(self._next_release - t, 3) if self.attack or self.strict else 0,
            "interval": self.interval,
            # the most recent grants, each with its age: a restart must not make an old one new
            "granted": [[str(a), round(max(0.0, t - when), 3)]
                        for a, when in sorted(self._granted.items(), key=lambda kv: kv[1],
                                              reverse=True)[:self.SNAPSHOT_GRANTED]],
            "queue": [str(a) for a in list(self._queue)[:self.SNAPSHOT_QUEUE]],
            "last_port": self.last_port,
            "last_dst": str(self.last_dst) if self.last_dst is not None else None,
            "last_proto": self.last_proto,
            "unknown": unknown,
            "dns": table,
            "peers": peers,
            # what each domain's answers already vouched for: a restart must not renew a worm's budget
            "zones": self._zones.snapshot(t)[:self.SNAPSHOT_ZONES],
            "stats": dict(self.stats.__dict__),
        }
        floor = self.cfg["max_per_10_minutes"] + 1
        while len(json.dumps(doc, separators=(",", ":"))) > max_bytes:
            if doc["dns"]:
                doc["dns"] = doc["dns"][:len(doc["dns"]) // 2]
            elif doc["peers"]:
                doc["peers"] = doc["peers"][:len(doc["peers"]) // 2]
            elif doc["zones"]:
                doc["zones"] = doc["zones"][:len(doc["zones"]) // 2]    # the least used go first
            elif doc["queue"]:
                doc["queue"] = doc["queue"][:len(doc["queue"]) // 2]
            elif len(doc["unknown"]) > floor:
                doc["unknown"] = doc["unknown"][:max(floor, len(doc["unknown"]) // 2)]
            elif doc["granted"]:
                doc["granted"] = doc["granted"][:len(doc["granted"]) // 2]
            else:
                break    # the caller's limit is smaller than any useful state
        self.dirty = self.urgent = False
        return doc

    def restore(self, doc: Any, wall: Optional[float] = None, now: Optional[float] = None) -> bool:
        """Takes back what :meth:`snapshot` saved (in this or an earlier process, version 1 or 2), aged by
        the wall-clock time since.  False, and nothing changed, if ``doc`` is not such a snapshot."""
        t = self._now(now)
        wall = time.time() if wall is None else float(wall)
        num = _num
        try:
            if not isinstance(doc, dict) or doc.get("v") not in (1, self.SNAPSHOT_VERSION):
                return False
            elapsed = max(0.0, wall - num(doc["wall"]))       # a clock set back counts as no time
            base = t - elapsed                                 # the snapshot's "now", on our clock
            unknown = [(ipaddress.ip_address(a), base - max(0.0, num(age))) for a, age in doc["unknown"]]
            table = [(ipaddress.ip_address(a), base + num(left), str(name)) for a, left, name in doc["dns"]]
            # [address, age] (a string alone, from before ages were saved: age 0, as then)
            granted = [(ipaddress.ip_address(g), 0.0) if isinstance(g, str)
                       else (ipaddress.ip_address(g[0]), max(0.0, num(g[1]))) for g in doc["granted"]]
            queue = [ipaddress.ip_address(a) for a in doc.get("queue", [])]
            peers = [(ipaddress.ip_address(a), str(v)[:16]) for a, v in doc.get("peers", [])]
            attack = doc["attack"] is True
            since, until, next_pass = base - num(doc["since"]), base + num(doc["until"]), base + num(doc["next_pass"])
            interval = num(doc.get("interval", self.cfg["pass_interval"]))
            interval = max(min(max(interval, self.cfg["pass_interval"]), self.cfg["max_pass_interval"]),
                           self._min_interval)
            port = doc.get("last_port")
            port = int(port) if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535 else None
            dst = ipaddress.ip_address(doc["last_dst"]) if doc.get("last_dst") else None
            proto = doc.get("last_proto") if doc.get("last_proto") in ("tcp", "udp", "icmp") else "tcp"
            zones = self._zones.parse(doc.get("zones", []), base)
            stats = {k: v for k, v in (doc.get("stats") or {}).items()
                     if k in self.stats.__dict__ and isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        except (KeyError, TypeError, ValueError):
            return False
        horizon = t - _TEN_MINUTES
        for addr, seen in sorted(unknown, key=lambda x: x[1]):      # oldest first, as _note_unknown keeps them
            if seen > horizon and addr not in self._unknown:
                self._unknown[addr] = min(seen, t)
        while len(self._unknown) > self.cfg["max_tracked"]:
            self._unknown.popitem(last=False)
        for addr, expires, name in table[:self.cfg["table_capacity"]]:
            self.table.add(addr, expires, name, t)
        for addr, why in reversed(peers[:self.cfg["peer_capacity"]]):   # oldest first
            self.peers.add(addr, why)
        self._zones.merge(zones, t)
        self.attack = attack
        if attack or self.strict:
            # strict mode outside attack: the queue and its grants outlive the process too, and the next
            # release is never sooner than it would have been
            self._next_release = next_pass if attack else max(next_pass, t)
            # each grant keeps the age it had, aged by the time down; expired ones stay expired
            life = self.cfg["attack_duration"] if attack else self.cfg["queue_grant"]
            kept = sorted(((a, base - age) for a, age in granted if age + elapsed < life), key=lambda x: x[1])
            self._granted = dict(kept[-self.cfg["queue_capacity"]:])
            for a in queue[:self.cfg["queue_capacity"]]:
                self._queue[a] = t
        if attack:
            self.attack_since, self.attack_until = since, until
            self.interval = interval
        self.last_port, self.last_dst, self.last_proto = port, dst, proto
        for k, v in stats.items():
            setattr(self.stats, k, v)
        return True


def _flow(flow: Optional[tuple]) -> tuple:
    """A query's flow key as (transport, client addr, client port, server addr); the three-element form
    (client addr, client port, server addr) is UDP.  None (unknown) matches only None."""
    if flow is None:
        return (None, None, None, None)
    if len(flow) == 3:
        return ("udp",) + tuple(flow)
    return tuple(flow)
