"""Threshold Random Walk port-scan detection (Jung, Paxson, Berger, Balakrishnan, "Fast Portscan Detection
Using Sequential Hypothesis Testing", IEEE S&P 2004), sans-I/O: frames and a clock in, verdicts and alerts out.

A scanner's connection attempts mostly fail (it does not know which hosts and ports are there); a benign host's
mostly succeed.  Each *first-contact* attempt of a source (to a (host, port) pair it has not tried before) is an
observation Y: success (a SYN-ACK came back) or failure (a RST, an ICMP destination-unreachable, or no answer
within ``timeout`` seconds).  With theta0 = P(success | benign) and theta1 = P(success | scanner), the
likelihood ratio

    L = prod_i P(Y_i | scanner) / P(Y_i | benign)

walks up by (1 - theta1) / (1 - theta0) at a failure and down by theta1 / theta0 at a success.  L >= eta1 =
beta / alpha decides "scanner" (alpha: the false-positive probability we accept, beta: the detection
probability we want); L <= eta0 = (1 - beta) / (1 - alpha) decides "benign", and the walk starts afresh (the
host is watched on).  With the paper's theta0 = 0.8, theta1 = 0.2, alpha = 0.01, beta = 0.99 a source is
decided a scanner after 4 failures in a row (4^4 = 256 >= 99).

Two directions, one walk per source:

* **outbound**: the guest's attempts (SYNs from the guest; outcomes from what comes back to it).  A guest
  decided a scanner is alerted and *blocked*: for ``block_duration`` seconds its SYNs to (host, port) pairs that
  never answered it are cut, while connections to pairs that did answer go on;
* **inbound**: remote hosts' attempts on the guest (SYNs to the guest; outcomes from the guest's answers).  A
  remote decided a scanner is alerted and every SYN it sends the guest is cut for ``block_duration`` seconds.

    det = TrwDetector(config, clock=time.monotonic)
    v = det.handle_frame(direction, frame)    # v.action: "pass" / "cut" for held SYNs, None otherwise
    alerts = det.tick()                       # timeouts are failures: call it now and then

Memory is bounded: pending attempts (``max_pending``), walks (``max_sources``) and each walk's set of contacted
pairs (``max_contacts``) forget their oldest entries first.
"""
from __future__ import annotations

import collections
import ipaddress
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from .settings import overlay
from .packet import PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN, PacketError, parse_frame

__all__ = ["TrwDetector", "TRW_DEFAULTS", "TrwConfigError", "TrwVerdict"]

TRW_DEFAULTS: dict[str, Any] = {
    "theta0": 0.8,            # P(an attempt succeeds | benign source)
    "theta1": 0.2,            # P(an attempt succeeds | scanner)
    "alpha": 0.01,            # accepted false-positive probability
    "beta": 0.99,             # wanted detection probability
    "timeout": 3.0,           # an attempt with no answer after this many seconds failed
    # first-contact attempts of one source whose outcome is still open; more are cut until answers (or
    # timeouts) come back.  A scanner's probes fail only at `timeout`: without this bound every probe made
    # before the walk can decide gets out (30 at 10 a second); with it, this many.  0: no bound.
    "max_unanswered": 10,
    # ... plus one for each of the source's first contacts that succeeded in the last ten minutes, up to this
    # many: a browser whose page loads open many new hosts at once earns the room (a scanner never does)
    "unanswered_credit": 90,
    "block_duration": 600.0,  # a scanner stays blocked this long
    "outbound": True,         # watch the guest's attempts
    "inbound": True,          # watch remote hosts' attempts on the guest
    "max_pending": 65536,
    "max_sources": 4096,
    "max_contacts": 4096,     # (host, port) pairs remembered per source
}

_CREDIT_WINDOW = 600.0     # how long a success earns a source room for one more open first contact

_DIRECTIONS = {"from_guest": "from_guest", "to_guest": "to_guest", 1: "from_guest", 2: "to_guest"}


class TrwConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TrwAlert:
    message: str
    fields: dict


@dataclass(frozen=True)
class TrwVerdict:
    action: Optional[str]
    alerts: tuple = ()


def load_trw_config(config: Optional[Mapping[str, Any]]) -> dict:
    out = overlay(TRW_DEFAULTS, config, "TRW", TrwConfigError)
    for k in ("theta0", "theta1", "alpha", "beta"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise TrwConfigError(f"{k}: expected a probability strictly between 0 and 1, got {v!r}")
        out[k] = float(v)
    if not out["theta1"] < out["theta0"]:
        raise TrwConfigError("theta1 must be below theta0 (scanners succeed less often than benign hosts)")
    if not out["alpha"] < out["beta"]:
        raise TrwConfigError("alpha must be below beta")
    for k in ("timeout", "block_duration"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise TrwConfigError(f"{k}: expected a positive number of seconds, got {v!r}")
        out[k] = float(v)
    for k in ("max_pending", "max_sources", "max_contacts"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrwConfigError(f"{k}: expected a positive integer, got {v!r}")
    for k in ("max_unanswered", "unanswered_credit"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TrwConfigError(f"{k}: expected an integer >= 0, got {v!r}")
    for k in ("outbound", "inbound"):
        if not isinstance(out[k], bool):
            raise TrwConfigError(f"{k}: expected true or false")
    return out


@dataclass
class _Walk:
    ratio: float = 1.0
    failures: int = 0
    successes: int = 0
    attempts: int = 0            # first-contact attempts decided
    blocked_until: float = -math.inf
    open: int = 0                # first-contact attempts not yet answered nor timed out
    credit: "collections.deque" = field(default_factory=collections.deque)   # when recent first contacts succeeded
    contacts: "collections.OrderedDict[tuple, bool]" = field(default_factory=collections.OrderedDict)
    answered: set = field(default_factory=set)   # (host, port) pairs that answered (outbound: may go on)


@dataclass
class TrwStats:
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    timeouts: int = 0
    scanners_outbound: int = 0
    scanners_inbound: int = 0
    benign_decisions: int = 0
    cut_outbound: int = 0
    cut_inbound: int = 0
    cut_unanswered: int = 0      # first contacts cut while max_unanswered were still open
    unparseable: int = 0


class TrwDetector:
    def __init__(self, config: Optional[Mapping[str, Any]] = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = load_trw_config(config)
        self.clock = clock
        c = self.cfg
        self.eta1 = c["beta"] / c["alpha"]
        self.eta0 = (1 - c["beta"]) / (1 - c["alpha"])
        self.up = (1 - c["theta1"]) / (1 - c["theta0"])      # a failure
        self.down = c["theta1"] / c["theta0"]                # a success
        self.walks: "collections.OrderedDict[tuple, _Walk]" = collections.OrderedDict()   # _wkey(dir, source)
        # (dir, source, sport, host, port) -> when the attempt was made; oldest first
        self.pending: "collections.OrderedDict[tuple, float]" = collections.OrderedDict()
        self.stats = TrwStats()
        self._last = -math.inf

    def _now(self, now: Optional[float]) -> float:
        t = self.clock() if now is None else float(now)
        self._last = t = max(t, self._last)
        return t

    @staticmethod
    def _wkey(direction: str, source: Any) -> tuple:
        """Whose walk an attempt steps.  Outbound: the guest's, whichever of its addresses it used (a worm
        rotating through its IPv6 privacy addresses is one source).  Inbound: a remote IPv4 address, or a
        remote IPv6 /64 (one site's: the unit an address rotating scanner owns)."""
        if direction == "outbound":
            return ("outbound", "guest")
        if isinstance(source, ipaddress.IPv6Address):
            return ("inbound", ipaddress.IPv6Network((int(source) >> 64 << 64, 64)))
        return ("inbound", source)

    def walk(self, direction: str, source: Any) -> _Walk:
        key = self._wkey(direction, source)
        w = self.walks.get(key)
        if w is None:
            w = self.walks[key] = _Walk()
            if len(self.walks) > self.cfg["max_sources"]:
                # the oldest remote goes; the guest's own walk (a block, its open attempts) is never forgotten
                # for room: remote hosts cannot buy a blocked guest a fresh walk
                old = next(k for k in self.walks if k[0] == "inbound")
                del self.walks[old]
        else:
            self.walks.move_to_end(key)
        return w

    def is_blocked(self, direction: str, source: Any, now: Optional[float] = None) -> bool:
        w = self.walks.get(self._wkey(direction, source))
        return w is not None and self._now(now) < w.blocked_until

    # ---- frames
    def handle_frame(self, direction: Union[str, int], frame: bytes, now: Optional[float] = None) -> TrwVerdict:
        t = self._now(now)
        d = _DIRECTIONS.get(direction)
        alerts = list(self._expire(t))
        try:
            if d is None:
                raise PacketError("bad direction")
            p = parse_frame(frame)
        except PacketError:
            self.stats.unparseable += 1
            return TrwVerdict("cut", tuple(alerts))
        out = "outbound" if d == "from_guest" else "inbound"     # whose attempt a SYN is
        back = "inbound" if d == "from_guest" else "outbound"    # whose attempt an answer answers
        if p.proto == PROTO_TCP:
            flags = p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)
            if flags == TCP_SYN:
                # outbound: the guest (p.src) tries p.dst:p.dport; inbound: p.src tries the guest's p.dport
                action, a = self.attempt(out, p.src, p.sport, p.dst, p.dport, t)
                alerts += a
                return TrwVerdict(action, tuple(alerts))
            if flags == TCP_SYN | TCP_ACK:
                alerts += self.outcome(back, p.dst, p.dport, p.src, p.sport, True, t)
            elif flags & TCP_RST:
                alerts += self.outcome(back, p.dst, p.dport, p.src, p.sport, False, t)
            return TrwVerdict(None, tuple(alerts))
        if p.is_unreachable:
            host, proto, sport, dport = p.inner
            if proto == PROTO_TCP:
                # the quoted SYN went from p.dst (the ICMP's receiver) to host
                alerts += self.outcome(back, p.dst, sport, host, dport, False, t)
        return TrwVerdict(None, tuple(alerts))

    def attempt(self, direction: str, source, sport: int, host, port: int,
                now: Optional[float] = None) -> tuple[str, list]:
        """A connection attempt of ``source`` (the guest for outbound) to ``host``:``port``."""
        t = self._now(now)
        if direction == "outbound" and not self.cfg["outbound"] or direction == "inbound" and not self.cfg["inbound"]:
            return "pass", []
        w = self.walk(direction, source)
        target = (host, port) if direction == "outbound" else port
        if t < w.blocked_until:
            if direction == "inbound" or target not in w.answered:
                if direction == "inbound":
                    self.stats.cut_inbound += 1
                else:
                    self.stats.cut_outbound += 1
                return "cut", []
        if target in w.contacts:
            w.contacts.move_to_end(target)
            return "pass", []
        cap = self.cfg["max_unanswered"]
        if cap:
            while w.credit and w.credit[0] <= t - _CREDIT_WINDOW:
                w.credit.popleft()
            cap += len(w.credit)
        if cap and w.open >= cap:
            # the walk cannot decide on what is out yet: no more first contacts until it can (the source's
            # TCP retransmits the SYN; a benign one's answers come back within a round trip)
            self.stats.cut_unanswered += 1
            return "cut", []
        w.contacts[target] = True
        while len(w.contacts) > self.cfg["max_contacts"]:
            w.contacts.popitem(last=False)
        key = (direction, source, sport, host, port)
        if key not in self.pending:
            w.open += 1
        self.pending[key] = t
        while len(self.pending) > self.cfg["max_pending"]:
            self._close(self.pending.popitem(last=False)[0])
        self.stats.attempts += 1
        return "pass", []

    def _close(self, key: tuple) -> None:
        """An attempt's outcome came (or it was forgotten): one fewer open for its source."""
        w = self.walks.get(self._wkey(key[0], key[1]))
        if w is not None and w.open > 0:
            w.open -= 1

    def outcome(self, direction: str, source, sport: int, host, port: int, success: bool,
                now: Optional[float] = None) -> list:
        t = self._now(now)
        key = (direction, source, sport, host, port)
        started = self.pending.pop(key, None)
        if started is None:
            return []
        self._close(key)
        return self._observe(direction, source, (host, port) if direction == "outbound" else port, success, t)

    def _observe(self, direction: str, source, target, success: bool, t: float) -> list:
        w = self.walk(direction, source)
        w.attempts += 1
        if success:
            self.stats.successes += 1
            w.successes += 1
            if self.cfg["unanswered_credit"]:
                w.credit.append(t)
                if len(w.credit) > self.cfg["unanswered_credit"]:
                    w.credit.popleft()
            w.ratio *= self.down
            w.answered.add(target)
            if len(w.answered) > self.cfg["max_contacts"]:
                w.answered.pop()
        else:
            self.stats.failures += 1
            w.failures += 1
            w.ratio *= self.up
        if t < w.blocked_until:
            return []
        if w.ratio >= self.eta1:
            w.blocked_until = t + self.cfg["block_duration"]
            w.ratio = 1.0
            if direction == "outbound":
                self.stats.scanners_outbound += 1
                what = (f"port scan from the guest ({source}): {w.failures} failed and {w.successes} "
                        f"successful first-contact attempts; blocking its attempts to hosts that did not "
                        f"answer for {self.cfg['block_duration']:g} s")
            else:
                self.stats.scanners_inbound += 1
                what = (f"port scan of the guest from {source}: {w.failures} failed and {w.successes} "
                        f"successful first-contact attempts; blocking it for {self.cfg['block_duration']:g} s")
            alert = TrwAlert(what, {"event": "scan_detected", "direction": direction, "source": str(source),
                                    "failures": w.failures, "successes": w.successes, "attempts": w.attempts,
                                    "eta1": round(self.eta1, 3), "block_duration": self.cfg["block_duration"]})
            w.failures = w.successes = 0
            return [alert]
        if w.ratio <= self.eta0:
            self.stats.benign_decisions += 1
            w.ratio = 1.0
            w.failures = w.successes = 0
        return []

    def _expire(self, t: float):
        horizon = t - self.cfg["timeout"]
        while self.pending:
            key, started = next(iter(self.pending.items()))
            if started > horizon:
                break
            del self.pending[key]
            self._close(key)
            direction, source, _, host, port = key
            self.stats.timeouts += 1
            yield from self._observe(direction, source, (host, port) if direction == "outbound" else port,
                                     False, t)

    def tick(self, now: Optional[float] = None) -> list:
        """Attempts unanswered for ``timeout`` seconds count as failures; returns the alerts that causes."""
        return list(self._expire(self._now(now)))
