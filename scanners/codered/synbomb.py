"""SYN-bomb detection and repair (Siphon paper, section 2.3), sans-I/O: frames and a clock in, verdicts,
alerts and resets out.

A SYN bomb from the guest opens TCP handshakes it never completes: the victim answers each SYN with a SYN-ACK
and keeps the half-open connection, retransmitting the SYN-ACK while it waits for the final ACK.  The NI sees
both halves.  A connection is *half-open* once the victim's SYN-ACK for it comes a second time (the victim
retransmits only when the guest did not answer; a guest that refused it sends a RST, which the detector also
sees).  More than ``max_half_open`` half-open connections to one victim within ``window`` seconds, and at least
``min_half_open_share`` of the handshakes it answered in that time (up to a second ago: a SYN-ACK repeats after
about a second), is a SYN bomb (a busy client whose final ACKs
are sometimes lost leaves a few half-open connections among many completed ones; anti-spoofing keeps the guest
to its own addresses, so the victim is always answering the guest).  Then, for
``block_duration`` seconds (extended while it goes on):

* an alert names the victim and the count;
* the guest's SYNs to that victim are throttled: one passes every ``throttle_interval`` seconds, the rest are cut;
* the victim is *repaired*: for every half-open connection the guest left, a TCP RST|ACK goes to the victim from
  the guest's address with the sequence numbers the victim accepts (sequence = the guest's ISN + 1, which the
  victim's SYN-ACK acknowledges; acknowledgement = the victim's ISN + 1), so it frees the connection at once.
  Half-open connections found later (their SYN-ACK retransmitted) are reset as they are found.

    det = SynBombDetector(config, clock=time.monotonic)
    v = det.handle_frame(direction, frame)     # v.action ("pass"/"cut" for held SYNs), v.alerts, v.resets
    for r in v.resets: sc.reset(r.src, r.sport, r.dst, r.dport, r.seq, r.ack, r.mac)

Memory is bounded (``max_connections``, oldest forgotten first).
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from .settings import overlay
from .packet import PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN, PacketError, parse_frame

__all__ = ["SynBombDetector", "SYNBOMB_DEFAULTS", "SynBombConfigError", "Reset", "SynBombVerdict"]

SYNBOMB_DEFAULTS: dict[str, Any] = {
    "max_half_open": 8,          # more half-open connections to one victim than this within the window: a bomb
    "window": 10.0,
    "block_duration": 60.0,      # throttle and repair this long after the last half-open connection found
    "min_half_open_share": 0.5,  # ... and at least this share of the handshakes it answered in the window
    "throttle_interval": 5.0,    # in a bomb: one SYN to the victim passes every this many seconds
    "repair": True,              # reset the victim's half-open connections
    "max_connections": 65536,
}

_DIRECTIONS = {"from_guest": "from_guest", "to_guest": "to_guest", 1: "from_guest", 2: "to_guest"}


class SynBombConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SynBombAlert:
    message: str
    fields: dict


@dataclass(frozen=True)
class Reset:
    """A RST|ACK the guest's NI should send to repair the victim (see Scanner.reset)."""
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    mac: str


@dataclass(frozen=True)
class SynBombVerdict:
    action: Optional[str]
    alerts: tuple = ()
    resets: tuple = ()


def load_synbomb_config(config: Optional[Mapping[str, Any]]) -> dict:
    out = overlay(SYNBOMB_DEFAULTS, config, "SYN-bomb", SynBombConfigError)
    for k in ("max_half_open", "max_connections"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "max_half_open" else 1):
            raise SynBombConfigError(f"{k}: expected a non-negative integer, got {v!r}")
    v = out["min_half_open_share"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise SynBombConfigError(f"min_half_open_share: expected 0..1, got {v!r}")
    for k in ("window", "block_duration", "throttle_interval"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SynBombConfigError(f"{k}: expected a positive number of seconds, got {v!r}")
        out[k] = float(v)
    if not isinstance(out["repair"], bool):
        raise SynBombConfigError("repair: expected true or false")
    return out


@dataclass
class _Conn:
    syn_time: float
    isn: int                       # the guest's initial sequence number
    victim_isn: Optional[int] = None
    synacks: int = 0
    half_open: bool = False
    reset: bool = False
    mac: str = ""                  # the Ethernet source of the victim's SYN-ACK: the next hop toward it


@dataclass
class _Victim:
    half_open: "collections.deque[float]"
    answered: "collections.deque[float]" = field(default_factory=collections.deque)
    bomb_until: float = -math.inf
    next_pass: float = -math.inf
    alerted: int = 0


@dataclass
class SynBombStats:
    syns: int = 0
    synacks: int = 0
    half_open: int = 0
    refused_by_guest: int = 0
    bombs: int = 0
    throttled: int = 0
    resets: int = 0
    unparseable: int = 0


def _mac(frame: bytes, at: int) -> str:
    return ":".join(f"{b:02x}" for b in bytes(frame[at:at + 6]))


class SynBombDetector:
    def __init__(self, config: Optional[Mapping[str, Any]] = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = load_synbomb_config(config)
        self.clock = clock
        # (guest, guest port, victim, victim port) -> connection; oldest first
        self.conns: "collections.OrderedDict[tuple, _Conn]" = collections.OrderedDict()
        self.victims: dict[Any, _Victim] = {}
        self.stats = SynBombStats()
        self._last = -math.inf

    def _now(self, now: Optional[float]) -> float:
        t = self.clock() if now is None else float(now)
        self._last = t = max(t, self._last)
        return t

    def in_bomb(self, victim, now: Optional[float] = None) -> bool:
        v = self.victims.get(victim)
        return v is not None and self._now(now) < v.bomb_until

    def handle_frame(self, direction: Union[str, int], frame: bytes, now: Optional[float] = None) -> SynBombVerdict:
        t = self._now(now)
        d = _DIRECTIONS.get(direction)
        try:
            if d is None:
                raise PacketError("bad direction")
            p = parse_frame(frame)
        except PacketError:
            self.stats.unparseable += 1
            return SynBombVerdict("cut")
        if p.proto != PROTO_TCP:
            return SynBombVerdict(None)
        flags = p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)
        if d == "from_guest" and flags == TCP_SYN:
            return SynBombVerdict(self.syn(p.src, p.sport, p.dst, p.dport, p.seq, t))
        if d == "from_guest" and flags & TCP_RST:
            c = self.conns.get((p.src, p.sport, p.dst, p.dport))
            if c is not None and not c.half_open:
                self.stats.refused_by_guest += 1
                del self.conns[(p.src, p.sport, p.dst, p.dport)]
            return SynBombVerdict(None)
        if d == "to_guest" and flags == TCP_SYN | TCP_ACK:
            alerts, resets = self.synack(p.dst, p.dport, p.src, p.sport, p.seq, p.ack, _mac(frame, 6), t)
            return SynBombVerdict(None, tuple(alerts), tuple(resets))
        return SynBombVerdict(None)

    def syn(self, guest, gport: int, victim, vport: int, seq: int, now: Optional[float] = None) -> str:
        t = self._now(now)
        self.stats.syns += 1
        v = self.victims.get(victim)
        if v is not None and t < v.bomb_until:
            if t < v.next_pass:
                self.stats.throttled += 1
                return "cut"
            v.next_pass = t + self.cfg["throttle_interval"]
        key = (guest, gport, victim, vport)
        c = self.conns.get(key)
        if c is None or c.isn != seq:        # a new connection (a retransmitted SYN keeps its ISN)
            self.conns[key] = _Conn(t, seq)
            self.conns.move_to_end(key)
            while len(self.conns) > self.cfg["max_connections"]:
                self.conns.popitem(last=False)
        return "pass"

    def synack(self, guest, gport: int, victim, vport: int, seq: int, ack: int, mac: str,
               now: Optional[float] = None) -> tuple[list, list]:
        t = self._now(now)
        c = self.conns.get((guest, gport, victim, vport))
        if c is None or ack != (c.isn + 1) & 0xFFFFFFFF:
            return [], []                   # not an answer to a SYN we saw
        self.stats.synacks += 1
        if c.victim_isn != seq:
            c.victim_isn, c.synacks = seq, 1
            c.mac = mac
            v = self._victim(victim)
            v.answered.append(t)
            self._trim(v.answered, t)
            return [], []
        c.synacks += 1
        if c.half_open:
            return [], self._repair(guest, gport, victim, vport, c, t)
        # the victim repeats its SYN-ACK: the guest never completed the handshake
        c.half_open = True
        self.stats.half_open += 1
        v = self._victim(victim)
        v.half_open.append(t)
        self._trim(v.half_open, t)
        self._trim(v.answered, t)
        alerts: list = []
        resets: list = []
        if t < v.bomb_until:
            v.bomb_until = max(v.bomb_until, t + self.cfg["block_duration"])
            resets = self._repair(guest, gport, victim, vport, c, t)
        elif (len(v.half_open) > self.cfg["max_half_open"]
              and len(v.half_open) >= self.cfg["min_half_open_share"] * max(1, self._answered_before(v, t - 1.0))):
            v.bomb_until = t + self.cfg["block_duration"]
            v.next_pass = t + self.cfg["throttle_interval"]
            self.stats.bombs += 1
            for key, other in list(self.conns.items()):
                if key[2] == victim and other.half_open:
                    resets += self._repair(*key, other, t)
            alerts.append(SynBombAlert(
                f"SYN bomb from the guest ({guest}) against {victim}: {len(v.half_open)} half-open connections "
                f"in {self.cfg['window']:g} s; throttling its SYNs to one every "
                f"{self.cfg['throttle_interval']:g} s"
                + (f" and resetting {len(resets)} half-open connections on the victim" if resets else ""),
                {"event": "syn_bomb", "victim": str(victim), "guest": str(guest),
                 "half_open": len(v.half_open), "resets": len(resets), "window": self.cfg["window"],
                 "block_duration": self.cfg["block_duration"]}))
        return alerts, resets

    def _victim(self, victim) -> _Victim:
        v = self.victims.get(victim)
        if v is None:
            v = self.victims[victim] = _Victim(collections.deque())
            if len(self.victims) > self.cfg["max_connections"]:
                self.victims.pop(next(iter(self.victims)))
        return v

    @staticmethod
    def _answered_before(v: _Victim, when: float) -> int:
        """Handshakes answered by ``when`` (in the window): those whose SYN-ACK could have been repeated by
        now (a victim repeats it after about a second), the base of the half-open share."""
        n = 0
        for x in v.answered:
            if x > when:
                break
            n += 1
        return n

    def _trim(self, q: "collections.deque[float]", t: float) -> None:
        horizon = t - self.cfg["window"]
        while q and q[0] <= horizon:
            q.popleft()
        while len(q) > self.cfg["max_connections"]:
            q.popleft()

    def _repair(self, guest, gport, victim, vport, c: _Conn, t: float) -> list:
        if not self.cfg["repair"] or c.victim_isn is None or not c.mac:
            return []
        c.reset = True
        self.stats.resets += 1
        return [Reset(str(guest), gport, str(victim), vport, (c.isn + 1) & 0xFFFFFFFF,
                      (c.victim_isn + 1) & 0xFFFFFFFF, c.mac)]

    def tick(self, now: Optional[float] = None) -> list:
        """Ends bomb mode for victims whose time is up (quietly), forgets old connections."""
        t = self._now(now)
        for victim in [v for v, s in self.victims.items() if s.bomb_until < t and
                       (not s.half_open or s.half_open[-1] <= t - self.cfg["window"])
                       and (not s.answered or s.answered[-1] <= t - self.cfg["window"])]:
            del self.victims[victim]
        horizon = t - max(self.cfg["window"], 120.0)
        while self.conns:
            key, c = next(iter(self.conns.items()))
            if c.syn_time > horizon:
                break
            del self.conns[key]
        return []
