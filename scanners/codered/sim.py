"""Worms, scans, SYN bombs and normal hosts simulated on a fake clock, fed to the detectors frame by frame: the
figures of scanners/README.md and ``make bench`` (and the goals tests/test_worm_figures.py holds them to).

Nothing here touches a network: frames are built with struct, the detectors' verdicts decide what "gets out",
and the far side (hosts that answer, or do not) is simulated too.  Each scenario yields a :class:`Result`:

* ``attempts_to_detection`` / ``seconds_to_detection``: how many of the worm's attempts (distinct
  destinations; for a SYN bomb, SYNs) it made before the detector's first alert, and when;
* ``escaped_first_minute``: the share of the attempts of the worm's first minute that got a packet out;
* ``escaped_minute_after_detection``: the same for the minute after the first alert;
* ``false_alarms``: alerts on a normal workload (goal: 0).

    python3 -m scanners.codered.sim          # the table, from the repository root
"""
from __future__ import annotations

import heapq
import ipaddress
import random
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

from .core import CodeRedDetector
from .synbomb import SynBombDetector
from .trw import TrwDetector

__all__ = ["Result", "run_all", "worm_styles", "normal_workloads", "laundering_with_trw", "trw_scenarios",
           "trw_page_load", "synbomb_scenarios"]

GUEST = "10.0.0.2"
RESOLVER = "10.0.0.1"
GMAC, RMAC = bytes.fromhex("525400000002"), bytes.fromhex("525400000001")
#: Linux's SYN retransmissions after the first (tcp_syn_retries 6: 1, 3, 7, 15, 31, 63 s)
SYN_RETRIES = (1.0, 3.0, 7.0, 15.0, 31.0, 63.0)


# ---- frames ---------------------------------------------------------------------------------------------------

def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + payload


def _eth(to_guest: bool, l3: bytes) -> bytes:
    return (GMAC + RMAC if to_guest else RMAC + GMAC) + b"\x08\x00" + l3


def tcp(src: str, dst: str, sport: int, dport: int, flags: int, seq: int = 0, ack: int = 0) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    return _eth(dst == GUEST, _ip(src, dst, 6, seg))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return _eth(dst == GUEST, _ip(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload))


def echo(src: str, dst: str) -> bytes:
    return _eth(dst == GUEST, _ip(src, dst, 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]) + b"\0" * 56))


def _name(n: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".") if p) + b"\0"


def dns_query(txid: int, name: str, qtype: int = 1) -> bytes:
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + _name(name) + struct.pack("!HH", qtype, 1)


def dns_answer(txid: int, name: str, qtype: int, rdata: bytes) -> bytes:
    rrtype = qtype
    return (struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + _name(name) + struct.pack("!HH", qtype, 1)
            + b"\xc0\x0c" + struct.pack("!HHIH", rrtype, 1, 300, len(rdata)) + rdata)


def dns_answers(txid: int, name: str, addrs: list) -> bytes:
    """A response to an A query for ``name`` with one A record per address (DNS round robin, a CDN's set)."""
    rrs = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ipaddress.IPv4Address(a).packed for a in addrs)
    return (struct.pack("!HHHHHH", txid, 0x8180, 1, len(addrs), 0, 0) + _name(name) + struct.pack("!HH", 1, 1)
            + rrs)


def random_host(rnd: random.Random) -> str:
    return str(ipaddress.IPv4Address(0xC6120000 | rnd.randrange(1, 0xFFFF)))     # 198.18.0.0/16


# ---- results --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    detector: str
    scenario: str
    attempts: int = 0                  # attempts in the simulated time
    attempts_to_detection: Optional[int] = None
    seconds_to_detection: Optional[float] = None
    escaped_first_minute: Optional[float] = None
    escaped_minute_after_detection: Optional[float] = None
    false_alarms: int = 0
    normal: bool = False               # a normal workload: only false_alarms means anything
    note: str = ""

    def row(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class _Attempt:
    t: float
    out: bool = False


@dataclass
class _Run:
    """Bookkeeping for one worm: its attempts, which got a packet out, when the first alert came."""
    attempts: list = field(default_factory=list)
    detected_at: Optional[float] = None
    detected_after: Optional[int] = None
    alerts: int = 0

    def alert(self, t: float) -> None:
        self.alerts += 1
        if self.detected_at is None:
            self.detected_at, self.detected_after = t, len(self.attempts)

    def result(self, detector: str, scenario: str, start: float) -> Result:
        def share(lo: float, hi: float) -> Optional[float]:
            xs = [a for a in self.attempts if lo <= a.t < hi]
            return sum(a.out for a in xs) / len(xs) if xs else None
        r = Result(detector, scenario, len(self.attempts), self.detected_after,
                   None if self.detected_at is None else self.detected_at - start,
                   share(start, start + 60))
        if self.detected_at is not None:
            r.escaped_minute_after_detection = share(self.detected_at, self.detected_at + 60)
        return r


class _Events:
    """A time-ordered queue of callbacks: the simulated world."""

    def __init__(self, start: float):
        self.t = start
        self.q: list = []
        self.n = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.n += 1
        heapq.heappush(self.q, (t, self.n, fn))

    def run(self, until: float, tick: Callable[[float], None], tick_every: float = 0.5) -> None:
        next_tick = self.t + tick_every
        while self.q and self.q[0][0] <= until:
            t, _, fn = heapq.heappop(self.q)
            while next_tick <= t:
                self.t = next_tick
                tick(next_tick)
                next_tick += tick_every
            self.t = t
            fn()
        while next_tick <= until:
            self.t = next_tick
            tick(next_tick)
            next_tick += tick_every


# ---- the worm scanner (DNS shadow) ----------------------------------------------------------------------------

def _codered_world(config: Optional[dict] = None):
    clock = [0.0]
    det = CodeRedDetector(dict(config or {}), clock=lambda: clock[0])
    return det, clock


def worm_style(style: str, rate: float, seconds: float = 180.0, seed: int = 1,
               config: Optional[dict] = None, trw: bool = False) -> Result:
    """A worm of ``style`` (tcp, udp, icmp, ptr) making ``rate`` attempts a second for ``seconds``.  With
    ``trw`` outbound TRW runs beside the worm scanner on the same frames, as two scanners holding the same
    SYNs do on an NI: a frame gets out only if both pass it."""
    rnd = random.Random(seed)
    det, clock = _codered_world(config)
    walk = TrwDetector({"inbound": False}, clock=lambda: clock[0]) if trw else None
    start = 1000.0
    ev = _Events(start)
    run = _Run()
    txid = [1]

    def feed(direction: str, frame: bytes) -> Optional[str]:
        clock[0] = ev.t
        v = det.handle_frame(direction, frame)
        if v.alert is not None:
            run.alert(ev.t)
        if walk is not None:
            tv = walk.handle_frame(direction, frame)
            for _ in tv.alerts:
                run.alert(ev.t)
            if tv.action == "cut":
                return "cut"
        return v.action

    def tick(t: float) -> None:
        clock[0] = t
        if det.tick() is not None:
            run.alert(t)
        if walk is not None:
            for _ in walk.tick():
                run.alert(t)

    def resolve_ptr(dst: str) -> None:
        """The laundering of section 5.3: PTR for dst, then A for the name it gave."""
        rev = ipaddress.IPv4Address(dst).reverse_pointer
        name = "h-" + dst.replace(".", "-") + ".isp.example"
        for qtype, qname, rdata in ((12, rev, _name(name)), (1, name, ipaddress.IPv4Address(dst).packed)):
            txid[0] += 1
            feed("from_guest", udp(GUEST, RESOLVER, 5353, 53, dns_query(txid[0], qname, qtype)))
            feed("to_guest", udp(RESOLVER, GUEST, 53, 5353, dns_answer(txid[0], qname, qtype, rdata)))

    def resolve_own(dst: str, name: str) -> None:
        """DNS the worm controls: a name (its own zone's, or a wildcard one's) answered with its target."""
        txid[0] += 1
        feed("from_guest", udp(GUEST, RESOLVER, 5353, 53, dns_query(txid[0], name)))
        feed("to_guest", udp(RESOLVER, GUEST, 53, 5353,
                             dns_answer(txid[0], name, 1, ipaddress.IPv4Address(dst).packed)))

    def attempt() -> None:
        # Code-Red's random targets: anywhere (here, anywhere in 1.0.0.0-223.255.255.255); the other styles
        # sweep one /16 (the prefix the guest tests route)
        dst = (str(ipaddress.IPv4Address(rnd.randrange(1 << 24, 224 << 24))) if style == "zone"
               else random_host(rnd))
        a = _Attempt(ev.t)
        run.attempts.append(a)
        if style in ("zone", "zone16"):
            resolve_own(dst, f"h{len(run.attempts)}.worm-zone.example")
        elif style == "wildcard":
            resolve_own(dst, dst.replace(".", "-") + ".nip.io")
        if style == "udp":
            a.out = feed("from_guest", udp(GUEST, dst, 40000, 1434, b"\x04" + b"A" * 375)) == "pass"
        elif style == "icmp":
            a.out = feed("from_guest", echo(GUEST, dst)) == "pass"
        else:
            if style == "ptr":
                resolve_ptr(dst)
            sport = 20000 + len(run.attempts) % 40000
            frame = tcp(GUEST, dst, sport, 80, 0x02, seq=7)

            def send_syn(a=a, frame=frame) -> None:
                if feed("from_guest", frame) == "pass":
                    a.out = True
            send_syn()
            for dt in SYN_RETRIES:          # the socket retransmits; nothing ever answers (an empty prefix)
                ev.at(ev.t + dt, send_syn)

    n = int(seconds * rate)
    for i in range(n):
        ev.at(start + i / rate, attempt)
    ev.run(start + seconds + 64, tick)
    label = {"tcp": "TCP SYNs", "udp": "UDP (Slammer)", "icmp": "ICMP echo sweep", "ptr": "PTR-laundered",
             "zone": "own DNS zone, random targets", "zone16": "own DNS zone, one /16",
             "wildcard": "laundered by a wildcard zone"}[style]
    return run.result(_label(config) + (" + TRW" if trw else ""), f"{label}, {rate:g}/s", start)


#: the worm scanner's strict mode: every unknown destination waits in the delay queue, attack or not
STRICT = {"unknown": "queue", "resolvers": [f"{RESOLVER}/32"]}


def _label(config: Optional[dict]) -> str:
    return "worm (strict)" if (config or {}).get("unknown") == "queue" else "worm (DNS shadow)"


def worm_styles(config: Optional[dict] = None) -> list[Result]:
    out = [worm_style("tcp", 10, config=config), worm_style("udp", 100, config=config),
           worm_style("icmp", 10, config=config), worm_style("ptr", 5, config=config),
           worm_style("wildcard", 10, config=config), worm_style("zone", 10, config=config),
           worm_style("zone16", 10, config=config)]
    slow = worm_style("tcp", 0.1, seconds=1200, config=config)
    slow.scenario = "slow TCP, one per 10 s"
    out.append(slow)
    return out


def laundering_with_trw(config: Optional[dict] = None) -> list[Result]:
    """The styles DNS the worm controls launders, with outbound TRW beside the worm scanner: the laundered
    probes go to hosts that do not answer, which is what TRW decides on (and bounds meanwhile)."""
    out = [worm_style(style, 10, config=config, trw=True) for style in ("wildcard", "zone", "zone16")]
    slow = worm_style("zone", 0.1, seconds=1200, config=config, trw=True)
    slow.scenario = "own DNS zone, random targets, one per 10 s"
    return out + [slow]


def direct_peer(config: Optional[dict] = None, retry: float = 130.0, seconds: float = 600.0) -> Optional[float]:
    """An application connecting to an address nothing resolved nor announced (a peer learned in-band, a
    hard-coded server), its socket retransmitting the SYN, the application retrying ``retry`` seconds after
    each attempt began: seconds until a SYN got out (None: never within ``seconds``)."""
    det, clock = _codered_world(config)
    start = 1000.0
    ev = _Events(start)
    out: list = []

    def tick(t: float) -> None:
        clock[0] = t
        det.tick()

    def send() -> None:
        clock[0] = ev.t
        if not out and det.handle_frame("from_guest", tcp(GUEST, "198.51.100.7", 41000, 6881, 0x02)).action == "pass":
            out.append(ev.t - start)

    def connect() -> None:
        send()
        for dt in SYN_RETRIES:
            ev.at(ev.t + dt, send)
        if ev.t + retry < start + seconds:
            ev.at(ev.t + retry, connect)

    ev.at(start, connect)
    ev.run(start + seconds, tick)
    return out[0] if out else None


# ---- normal workloads ------------------------------------------------------------------------------------------

def _browse(det, clock, rnd: random.Random, seconds: float, over_tcp: bool = False, sites: int = 300) -> int:
    """A user: every 1-6 s a name (from ``sites``, some popular) is resolved and 1-6 connections opened to it;
    NTP to a resolved server now and then; pings to a resolved host.  Returns the alerts raised."""
    t, alerts, txid = 0.0, 0, 0
    addrs = {i: f"93.184.{i // 250}.{i % 250 + 1}" for i in range(sites)}
    cached: dict = {}

    def feed(d, f):
        nonlocal alerts
        clock[0] = t
        v = det.handle_frame(d, f)
        alerts += v.alert is not None
        return v.action

    while t < seconds:
        t += rnd.uniform(1, 6)
        site = min(int(rnd.paretovariate(1.2)) - 1, sites - 1)
        name, addr = f"site{site}.example", addrs[site]
        if site not in cached or t - cached[site] > 300:            # the stub resolver's cache expired
            txid += 1
            q, a = dns_query(txid, name), dns_answer(txid, name, 1, ipaddress.IPv4Address(addr).packed)
            if over_tcp:
                clock[0] = t
                det.observe_dns_stream(txid, "from_guest", struct.pack("!H", len(q)) + q, (GUEST, 30000 + txid % 9999, RESOLVER))
                raw = struct.pack("!H", len(a)) + a
                for k in range(0, len(raw), 7):                         # in small segments
                    det.observe_dns_stream(txid, "to_guest", raw[k:k + 7], (GUEST, 30000 + txid % 9999, RESOLVER))
                det.close_dns_stream(txid)
            else:
                feed("from_guest", udp(GUEST, RESOLVER, 30000 + txid % 9999, 53, q))
                feed("to_guest", udp(RESOLVER, GUEST, 53, 30000 + txid % 9999, a))
            cached[site] = t
        for k in range(rnd.randint(1, 6)):
            if feed("from_guest", tcp(GUEST, addr, 40000 + k, 443, 0x02)) != "pass":
                alerts += 1000          # a resolved destination must never be delayed
        if rnd.random() < 0.05:
            feed("from_guest", udp(GUEST, addrs[0], 123, 123, b"\x23" + b"\0" * 47))
            feed("from_guest", echo(GUEST, addr))
        clock[0] = t
        alerts += det.tick() is not None
    return alerts


def _cloud_names(det, clock, rnd: random.Random) -> int:
    """Names of big domains, the way DNS answers them: NTP's pool at boot (4 names, 4 servers each, anywhere);
    a page of 30 names of one site, each answered with 4 of its CDN's addresses; a backup job resolving one
    storage bucket every 5 s for ten minutes (TTL 5 s, one address of a large pool each time).  Each name's
    addresses are then contacted.  Returns alerts (+1000 per destination delayed)."""
    t, alerts, txid = 0.0, 0, 0

    def lookup(name: str, addrs: list, connect) -> None:
        nonlocal alerts, txid
        txid += 1
        clock[0] = t
        det.handle_frame("from_guest", udp(GUEST, RESOLVER, 30000 + txid % 9999, 53, dns_query(txid, name)))
        det.handle_frame("to_guest", udp(RESOLVER, GUEST, 53, 30000 + txid % 9999, dns_answers(txid, name, addrs)))
        for a in addrs:
            v = det.handle_frame("from_guest", connect(a))
            alerts += (v.alert is not None) + (v.action != "pass") * 1000

    for i in range(4):
        lookup(f"{i}.debian.pool.ntp.org", [str(ipaddress.IPv4Address(rnd.randrange(1 << 24, 224 << 24)))
                                            for _ in range(4)], lambda a: udp(GUEST, a, 123, 123, b"\x23" + b"\0" * 47))
    edge = [f"23.{rnd.randrange(32, 64)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}" for _ in range(60)]
    for i in range(30):
        t += 0.05
        lookup(f"img{i}.news.example", rnd.sample(edge, 4), lambda a: tcp(GUEST, a, 41000, 443, 0x02))
    while t < 600:
        t += 5
        lookup("backups.s3.storage.example", [f"52.{rnd.choice((216, 217))}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"],
               lambda a: tcp(GUEST, a, 42000, 443, 0x02))
        clock[0] = t
        alerts += det.tick() is not None
    return alerts


def normal_workloads(config: Optional[dict] = None) -> list[Result]:
    """The normal hosts; a resolved destination or a peer delayed counts as 1000 false alarms."""
    out = []
    label = _label(config)
    rnd = random.Random(5)
    det, clock = _codered_world(config)
    out.append(Result(label, "browsing, 1 h", normal=True, false_alarms=_browse(det, clock, rnd, 3600)))
    det, clock = _codered_world(config)
    out.append(Result(label, "browsing, DNS over TCP, 1 h", normal=True,
                      false_alarms=_browse(det, clock, rnd, 3600, over_tcp=True)))
    # a server: 2,000 clients connect to it (and ping it) first; it answers and, now and then, connects back
    det, clock = _codered_world(config)
    alerts = 0
    for i in range(20000):
        clock[0] = i * 0.05
        c = str(ipaddress.IPv4Address(0x0B000000 + rnd.randrange(2000)))
        det.handle_frame("to_guest", tcp(c, GUEST, 50000, 80, 0x02))
        if i % 50 == 0:
            det.handle_frame("to_guest", udp(c, GUEST, 5000, 161, b"x"))
            alerts += det.handle_frame("from_guest", udp(GUEST, c, 161, 5000, b"y")).alert is not None
        if i % 10 == 0:
            v = det.handle_frame("from_guest", tcp(GUEST, c, 41000, 113, 0x02))      # ident back to a client
            alerts += (v.alert is not None) + (v.action != "pass") * 1000
        alerts += det.tick() is not None
    out.append(Result(label, "server under inbound load", normal=True, false_alarms=alerts))
    det, clock = _codered_world(config)
    out.append(Result(label, "NTP pool, a CDN page, a storage bucket", normal=True,
                      false_alarms=_cloud_names(det, clock, rnd)))
    # a warm DNS cache across a scanner restart: names resolved before it, connected to after
    det, clock = _codered_world(config)
    _browse(det, clock, rnd, 600)
    doc = det.snapshot(wall=5000.0)
    det2, clock2 = _codered_world(config)
    det2.restore(doc, wall=5001.0)
    alerts = 0
    for i, (addr, _) in enumerate(list(det.table.items())[:40]):
        clock2[0] = i * 0.1
        v = det2.handle_frame("from_guest", tcp(GUEST, str(addr), 40000 + i, 443, 0x02))
        alerts += (v.alert is not None) + (v.action != "pass") * 1000
    out.append(Result(label, "warm cache across a scanner restart", normal=True,
                      false_alarms=alerts))
    return out


# ---- TRW ------------------------------------------------------------------------------------------------------

def trw_scan(rate: float = 10.0, answer: str = "timeout", seconds: float = 120.0, inbound: bool = False,
             seed: int = 2) -> Result:
    """A port scanner: outbound (the guest probes random hosts: nothing there, or a RST) or inbound (a remote
    probes the guest's ports; the guest answers closed ports with RSTs)."""
    rnd = random.Random(seed)
    clock = [0.0]
    det = TrwDetector({}, clock=lambda: clock[0])
    start = 1000.0
    ev = _Events(start)
    run = _Run()
    remote = "203.0.113.66"

    def attempt() -> None:
        clock[0] = ev.t
        a = _Attempt(ev.t)
        run.attempts.append(a)
        i = len(run.attempts)
        if inbound:
            port = 1 + i
            v = det.handle_frame("to_guest", tcp(remote, GUEST, 6000 + i, port, 0x02))
            a.out = v.action == "pass"
            alerts = list(v.alerts)
            if a.out and port not in (22, 80):
                alerts += det.handle_frame("from_guest", tcp(GUEST, remote, port, 6000 + i, 0x14)).alerts
        else:
            dst = random_host(rnd)
            v = det.handle_frame("from_guest", tcp(GUEST, dst, 20000 + i, 445, 0x02))
            a.out = v.action == "pass"
            alerts = list(v.alerts)
            if a.out and answer == "rst":
                alerts += det.handle_frame("to_guest", tcp(dst, GUEST, 445, 20000 + i, 0x14)).alerts
        for _ in alerts:
            run.alert(ev.t)

    def tick(t: float) -> None:
        clock[0] = t
        for _ in det.tick():
            run.alert(t)

    for i in range(int(seconds * rate)):
        ev.at(start + i / rate, attempt)
    ev.run(start + seconds + 5, tick, tick_every=0.25)
    what = "inbound port scan" if inbound else f"outbound scan ({'RSTs' if answer == 'rst' else 'no answers'})"
    return run.result("port scan (TRW)", f"{what}, {rate:g}/s", start)


def trw_scenarios() -> list[Result]:
    out = [trw_scan(10, "timeout"), trw_scan(10, "rst"), trw_scan(0.1, "timeout", seconds=600), trw_scan(10, inbound=True)]
    out[2].scenario = "outbound scan (no answers), one per 10 s"
    # normal: browsing (5 % of first contacts fail) and a server's clients
    rnd = random.Random(3)
    clock = [0.0]
    det = TrwDetector({}, clock=lambda: clock[0])
    alerts = 0
    for i in range(5000):
        clock[0] = i * 0.7
        dst = str(ipaddress.IPv4Address(0x5DB80000 + rnd.randrange(3000)))
        sport = 20000 + i % 30000
        alerts += len(det.handle_frame("from_guest", tcp(GUEST, dst, sport, 443, 0x02)).alerts)
        r = rnd.random()
        if r < 0.95:
            alerts += len(det.handle_frame("to_guest", tcp(dst, GUEST, 443, sport, 0x12)).alerts)
        elif r < 0.975:
            alerts += len(det.handle_frame("to_guest", tcp(dst, GUEST, 443, sport, 0x14)).alerts)
        alerts += len(det.tick())
    out.append(Result("port scan (TRW)", "browsing, 5 % of first contacts failing", normal=True,
                      false_alarms=alerts))
    alerts = 0
    for i in range(20000):
        clock[0] = 10000 + i * 0.05
        c = str(ipaddress.IPv4Address(0x0B000000 + rnd.randrange(2000)))
        alerts += len(det.handle_frame("to_guest", tcp(c, GUEST, 30000 + i % 30000, 80, 0x02)).alerts)
        alerts += len(det.handle_frame("from_guest", tcp(GUEST, c, 80, 30000 + i % 30000, 0x12)).alerts)
        alerts += len(det.tick())
    out.append(Result("port scan (TRW)", "server under inbound load", normal=True, false_alarms=alerts))
    out.append(trw_page_load())
    return out


def trw_page_load(hosts: int = 24, rtt: float = 0.05, loads: int = 20, config: Optional[dict] = None) -> Result:
    """A browser's page load opening connections to ``hosts`` new hosts at once, each answering in ``rtt``
    seconds, ``loads`` times a minute apart: the cost of ``max_unanswered`` to a benign host (first contacts
    past it are cut; the browser's TCP retransmits them 1 s later).  The note says how many connections were
    delayed and by how much at most."""
    rnd = random.Random(4)
    clock = [0.0]
    det = TrwDetector(dict(config or {}), clock=lambda: clock[0])
    start = 1000.0
    ev = _Events(start)
    alerts, delayed, worst = [0], [0], [0.0]

    def connect(dst: str, sport: int, began: float, retries: tuple) -> None:
        clock[0] = ev.t
        v = det.handle_frame("from_guest", tcp(GUEST, dst, sport, 443, 0x02))
        alerts[0] += len(v.alerts)
        if v.action == "cut":
            if retries:
                ev.at(began + retries[0], lambda: connect(dst, sport, began, retries[1:]))
            return
        if ev.t > began:
            delayed[0] += 1
            worst[0] = max(worst[0], ev.t - began)

        def answer() -> None:
            clock[0] = ev.t
            alerts[0] += len(det.handle_frame("to_guest", tcp(dst, GUEST, 443, sport, 0x12)).alerts)
        ev.at(ev.t + rtt, answer)

    n = 0
    for load in range(loads):
        t0 = start + 60 * load
        for _ in range(hosts):
            n += 1
            dst = str(ipaddress.IPv4Address(0x5DB80000 + rnd.randrange(1 << 16)))
            ev.at(t0, lambda dst=dst, sport=30000 + n, t0=t0: connect(dst, sport, t0, SYN_RETRIES))

    def tick(t: float) -> None:
        clock[0] = t
        alerts[0] += len(det.tick())
    ev.run(start + 60 * loads + 70, tick, tick_every=0.25)
    return Result("port scan (TRW)", f"page loads, {hosts} new hosts at once", normal=True, false_alarms=alerts[0],
                  note=f"{delayed[0]} of {n} connections delayed, by {worst[0]:.1f} s at most")


# ---- SYN bomb -------------------------------------------------------------------------------------------------

def synbomb_run(rate: float = 100.0, seconds: float = 60.0, complete: bool = False, ack_loss: float = 0.0,
                seed: int = 4) -> Result:
    """The guest sends ``rate`` SYNs a second to one victim (which answers each and retransmits its SYN-ACK
    after 1 s and 3 s unless the handshake completed).  ``complete``: a normal client whose handshakes
    complete (but ``ack_loss`` of its final ACKs are lost)."""
    rnd = random.Random(seed)
    clock = [0.0]
    det = SynBombDetector({}, clock=lambda: clock[0])
    start = 1000.0
    ev = _Events(start)
    run = _Run()
    victim = "192.0.2.20"
    resets = [0]

    def syn() -> None:
        clock[0] = ev.t
        i = len(run.attempts)
        a = _Attempt(ev.t)
        run.attempts.append(a)
        sport, isn, visn = 1024 + i % 60000, rnd.getrandbits(32), rnd.getrandbits(32)
        if det.handle_frame("from_guest", tcp(GUEST, victim, sport, 80, 0x02, seq=isn)).action != "pass":
            return
        a.out = True
        half_open = not complete or rnd.random() < ack_loss
        synack = tcp(victim, GUEST, 80, sport, 0x12, seq=visn, ack=isn + 1)

        def answer(synack=synack) -> None:
            clock[0] = ev.t
            v = det.handle_frame("to_guest", synack)
            resets[0] += len(v.resets)
            for _ in v.alerts:
                run.alert(ev.t)
        ev.at(ev.t + 0.001, answer)
        if half_open:
            ev.at(ev.t + 1.001, answer)
            ev.at(ev.t + 3.001, answer)

    for i in range(int(seconds * rate)):
        ev.at(start + i / rate, syn)
    ev.run(start + seconds + 5, lambda t: det.tick(t))
    r = run.result("SYN bomb", ("client, %d%% lost ACKs" % round(ack_loss * 100)) if complete
                   else f"SYN bomb, {rate:g} SYN/s", start)
    if complete:
        r.false_alarms, r.normal = run.alerts, True
    else:
        r.note = f"{resets[0]} resets sent to the victim"
    return r


def synbomb_scenarios() -> list[Result]:
    return [synbomb_run(100), synbomb_run(10), synbomb_run(50, complete=True, ack_loss=0.01)]


def run_all() -> list[Result]:
    return (worm_styles() + normal_workloads() + worm_styles(STRICT) + normal_workloads(STRICT)
            + laundering_with_trw() + laundering_with_trw(STRICT) + trw_scenarios() + synbomb_scenarios())


def table(results: list[Result]) -> str:
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"
    lines = [f"{'detector':<18} {'scenario':<42} {'to detect':>14} {'out 1st min':>11} {'out min after':>13} "
             f"{'false alarms':>12}"]
    for r in results:
        det = "-" if r.attempts_to_detection is None else f"{r.attempts_to_detection} / {r.seconds_to_detection:.1f} s"
        if r.normal:
            lines.append(f"{r.detector:<18} {r.scenario:<42} {'-':>14} {'-':>11} {'-':>13} {r.false_alarms:>12}"
                         + (f"  ({r.note})" if r.note else ""))
            continue
        lines.append(f"{r.detector:<18} {r.scenario:<42} {det:>14} {pct(r.escaped_first_minute):>11} "
                     f"{pct(r.escaped_minute_after_detection):>13} {'-':>12}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run_all()))
