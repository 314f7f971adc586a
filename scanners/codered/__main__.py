"""The Code-Red scanner process: the detector in ``core`` wired to the vhostni scanner SDK.

Run by the NI kernel as ``python3 scanners/codered`` (or ``python3 -m scanners.codered`` from the repository
root).  It subscribes to what reaches a new destination from the guest, held (contain): TCP SYNs, and the UDP
datagrams and ICMP/ICMPv6 messages that open a flow in the NI's flow table (``"flow": "new"``: a flow's first
datagram or echo, and the next ones only while none has been let out, so a cut probe's retries are held too;
echo requests are decided, other ICMP passed at once), so an established UDP flow (DNS, QUIC, games, VoIP)
no longer waits for the scanner per datagram; read only: the guest's DNS queries (every one: a resolver may
send several over one flow) and what reaches the guest: DNS responses, and TCP SYNs, UDP datagrams and ICMP
that open a flow (peers that contact it first), and the reassembled streams of TCP/53 (DNS over TCP).
``protocols`` and ``dns_over_tcp`` in the config narrow that.  A datagram of a flow already let out is not
decided again, even in attack mode: as with TCP, where only SYNs are held, what the worm sent to a destination
before the attack was detected has gone.  It decides each held frame and sends the detector's alerts.  Settings come from the
``config`` table of this scanner in the NI's policy (see scanners/README.md).

Everything is imported before ``Scanner.connect()``: after it the seccomp lockdown forbids opening files.

The detector's state (attack mode, the recent unknown destinations, the DNS table) is kept with the NI kernel
(``Scanner.checkpoint``) and restored at start, so killing the scanner (or restarting the daemon with
``--state-dir``) lets no more unknown destinations out than if it had kept running: a change a later decision
depends on is checkpointed before the decision that caused it is sent, other changes at most every
``CHECKPOINT_EVERY`` seconds.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

if __package__:
    from .core import CodeRedDetector, ConfigError, public_suffixes
    from .synbomb import SynBombConfigError, SynBombDetector
    from .trw import TrwConfigError, TrwDetector
else:   # run as a directory (python3 scanners/codered): make the package importable by its own name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from codered.core import CodeRedDetector, ConfigError, public_suffixes   # type: ignore[no-redef]
    from codered.synbomb import SynBombConfigError, SynBombDetector   # type: ignore[no-redef]
    from codered.trw import TrwConfigError, TrwDetector   # type: ignore[no-redef]

from vhostni.scanner import Frame, Refused, Scanner, ScannerError, StreamClosed, StreamData

#: How long the frame loop waits before doing timed work (the end-of-attack re-evaluation).
TICK = 0.5
#: How often changes no decision depends on yet (DNS answers, SYNs cut in attack mode) are checkpointed.
CHECKPOINT_EVERY = 1.0


def subscriptions(dns_port: int, protocols=("tcp", "udp", "icmp"), learn_inbound: bool = True,
                  hold_established: bool = False) -> list[tuple[dict, bool, Optional[dict]]]:
    """(match, contain, fallback) for the frame subscriptions: section 5.3's three, widened to UDP and ICMP.
    ``fallback`` is section 5.3's narrower read-only subscription, taken when a policy written for it does
    not grant the wider one (the scanner then runs narrowed and says so); None: required as it is, or (for
    what only widens) skipped when refused.  UDP and ICMP are held or read only where they open a flow
    (``"flow": "new"``; a right without that key grants it too, vhostni.policy), every one with
    ``hold_established`` (the scanner before flow = "new")."""
    if hold_established:
        return [({k: v for k, v in m.items() if k != "flow"}, c, f)
                for m, c, f in subscriptions(dns_port, protocols, learn_inbound)]
    dns_out = {"direction": "from_guest", "proto": "udp", "dport": dns_port}
    dns_in = {"direction": "to_guest", "proto": "udp", "sport": dns_port}
    subs: list = [({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, True, None)]
    if "udp" in protocols:
        # the datagrams that may reach a new destination, held; every DNS query, read (a query that does not
        # open its flow is not held, and its response is matched against it)
        subs += [({"direction": "from_guest", "proto": "udp", "flow": "new"}, True, dns_out),
                 (dns_out, False, OPTIONAL)]
    else:
        subs.append((dns_out, False, None))
    subs.append((dns_in, False, None))
    if learn_inbound:
        subs.append(({"direction": "to_guest", "proto": "udp", "flow": "new"}, False, OPTIONAL))
    if "icmp" in protocols:
        subs += [({"direction": "from_guest", "proto": "icmp", "flow": "new"}, True, OPTIONAL),
                 ({"direction": "from_guest", "proto": "icmpv6", "flow": "new"}, True, OPTIONAL)]
    if learn_inbound:
        subs += [({"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, False, OPTIONAL)]
        if "icmp" in protocols:
            subs += [({"direction": "to_guest", "proto": "icmp", "flow": "new"}, False, OPTIONAL),
                     ({"direction": "to_guest", "proto": "icmpv6", "flow": "new"}, False, OPTIONAL)]
    return subs


#: a subscription's fallback: nothing (the scanner runs without it when the policy does not grant it)
OPTIONAL: dict = {}


def json_safe(m: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in m.items())


def log(msg: str) -> None:
    print(f"codered: {msg}", file=sys.stderr, flush=True)


def run(sc: Scanner) -> int:
    try:
        # the NI's clock: the system's, or a capture's when replayed on it (its own rates)
        det = CodeRedDetector(sc.config, clock=sc.clock)
    except ConfigError as exc:
        sc.alert(f"Code-Red scanner not started: bad configuration: {exc}", event="config_error")
        log(f"bad configuration: {exc}")
        return 2
    saved = sc.restore()
    if saved is not None:
        if det.restore(saved, wall=sc.time()):
            log(f"restored: {'attack mode' if det.attack else 'no attack'}, "
                f"{det.unknown_count(60)} unknown destinations in the last minute, {len(det.table)} known")
        else:
            log("ignoring a saved state this version cannot read")
    last_checkpoint = sc.clock()

    def checkpoint(force: bool) -> None:
        nonlocal last_checkpoint
        now = sc.clock()
        due = det.urgent or (det.dirty and (force or now - last_checkpoint >= CHECKPOINT_EVERY))
        if sc.checkpoint_max <= 0 or not due:
            return
        try:
            sc.checkpoint(det.snapshot(max_bytes=sc.checkpoint_max, wall=sc.time()))
        except ValueError as exc:      # a limit too small for even the attack state
            log(f"state not saved: {exc}")
            det.dirty = det.urgent = False
        last_checkpoint = now

    cfg = det.cfg
    narrowed = []
    granted: list = []     # (match, contain) subscribed: a fallback taken is not asked for twice
    match: dict = {}
    try:
        for match, contain, fallback in subscriptions(cfg["dns_port"], cfg["protocols"], cfg["learn_inbound"],
                                                       cfg["hold_established"]):
            if (match, contain) in granted:
                continue
            try:
                sc.subscribe(match, contain=contain)
                granted.append((match, contain))
            except Refused:
                if fallback is None:
                    raise
                narrowed.append(match)
                if fallback is not OPTIONAL:
                    match = fallback
                    sc.subscribe(fallback, contain=False)
                    granted.append((fallback, False))
        if cfg["dns_over_tcp"]:
            match = {"stream": True, "port": cfg["dns_port"], "direction": "both"}
            try:
                sc.subscribe_stream(port=cfg["dns_port"], direction="both", contain=False)
            except Refused:
                narrowed.append(match)
    except Refused as exc:
        sc.alert(f"Code-Red scanner not started: subscription {match} refused: {exc}",
                 event="subscription_refused")
        log(f"subscription {match} refused: {exc}")
        return 3
    if narrowed:
        # a policy written for section 5.3's scanner: it still decides TCP SYNs over UDP DNS, but what the
        # policy does not grant goes unwatched; the administrator should know
        sc.alert(f"worm scanner running narrowed: the policy does not grant {len(narrowed)} of its "
                 f"subscriptions (see examples/codered.toml)", event="narrowed",
                 refused=[json_safe(m) for m in narrowed])
        log(f"narrowed: not granted {narrowed}")
    log(f"scanning on {sc.ni} as {sc.name}: more than {det.cfg['max_per_second']}/s or "
        f"{det.cfg['max_per_minute']}/min or {det.cfg['max_per_10_minutes']}/10 min unknown destinations "
        f"({'/'.join(cfg['protocols'])}) is an attack"
        + (f"; strict: every unknown destination waits, one released per {cfg['queue_interval']:g} s"
           if det.strict else ""))
    for ev in sc.events(timeout=TICK):
        alert = None
        if ev is None:
            alert = det.tick()
            checkpoint(force=True)
        elif isinstance(ev, Frame):
            verdict = det.handle_frame(ev.direction, ev.data)
            alert = verdict.alert
            checkpoint(force=False)       # before the decision: the kernel keeps it first
            if ev.held:
                # frames that need no decision (DNS responses, inbound) carry no objection (action None)
                if verdict.action in (None, "pass"):
                    sc.pass_(ev)
                else:
                    sc.cut(ev)
        elif isinstance(ev, StreamData):
            st = ev.stream
            # DNS over TCP with the guest as the client; a stream picked up mid-way has no message framing
            if st.client == "guest" and not st.midstream:
                det.observe_dns_stream(st.id, ev.direction, ev.data, (st.guest[0], st.guest[1], st.remote[0]))
                alert = det.take_alert() or alert
                checkpoint(force=False)
            if ev.held:
                sc.pass_(ev)
        elif isinstance(ev, StreamClosed):
            det.close_dns_stream(ev.stream.id)
        if alert is not None:
            sc.alert(alert.message, **alert.fields)
    return 0


#: the detectors this program runs, by the config's ``detector`` key (default: the DNS-shadow worm scanner)
DETECTORS = ("dns-shadow", "trw", "synbomb")

#: (match, contain) for the TRW port-scan detector: attempts both ways (held, so a scanner can be blocked),
#: and the answers that decide them (read)
TRW_SUBSCRIPTIONS = [
    ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, True),
    ({"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, True),
    ({"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn,ack"}, False),
    ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,ack"}, False),
    ({"direction": "to_guest", "proto": "tcp", "tcp_flags": "rst"}, False),
    ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "rst"}, False),
    ({"direction": "to_guest", "proto": "icmp"}, False),
    ({"direction": "from_guest", "proto": "icmp"}, False),
]

#: (match, contain) for the SYN-bomb detector: the guest's SYNs (held, to throttle them), the victims'
#: SYN-ACKs and the guest's RSTs (read)
SYNBOMB_SUBSCRIPTIONS = [
    ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, True),
    ({"direction": "to_guest", "proto": "tcp", "tcp_flags": "syn,ack"}, False),
    ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "rst"}, False),
]


def run_flows(sc: Scanner, kind: str, config: dict) -> int:
    """The TRW port-scan detector or the SYN-bomb detector (scanners/codered/trw.py, synbomb.py)."""
    try:
        # on the NI's clock (a capture's under replay --clock capture)
        det = (TrwDetector(config, clock=sc.clock) if kind == "trw"
               else SynBombDetector(config, clock=sc.clock))
    except (TrwConfigError, SynBombConfigError) as exc:
        sc.alert(f"{kind} scanner not started: bad configuration: {exc}", event="config_error")
        log(f"bad configuration: {exc}")
        return 2
    subs = TRW_SUBSCRIPTIONS if kind == "trw" else SYNBOMB_SUBSCRIPTIONS
    if kind == "trw":
        subs = [(m, c) for m, c in subs
                if det.cfg["outbound"] or m["direction"] != ("from_guest" if c else "to_guest")]
        subs = [(m, c) for m, c in subs
                if det.cfg["inbound"] or m["direction"] != ("to_guest" if c else "from_guest")]
    for match, contain in subs:
        try:
            sc.subscribe(match, contain=contain)
        except Refused as exc:
            sc.alert(f"{kind} scanner not started: subscription {match} refused: {exc}",
                     event="subscription_refused")
            log(f"subscription {match} refused: {exc}")
            return 3
    log(f"{kind} on {sc.ni} as {sc.name}")
    for frame in sc.frames(timeout=TICK):
        if frame is None:
            alerts, resets = det.tick(), ()
        else:
            v = det.handle_frame(frame.direction, frame.data)
            alerts, resets = v.alerts, getattr(v, "resets", ())
            if frame.held:
                if v.action in (None, "pass"):
                    sc.pass_(frame)
                else:
                    sc.cut(frame)
        for r in resets:
            try:
                sc.reset(r.src, r.sport, r.dst, r.dport, r.seq, r.ack, r.mac)
            except Refused as exc:
                log(f"reset refused: {exc}")
        for a in alerts:
            sc.alert(a.message, **a.fields)
    return 0


def main() -> int:
    if public_suffixes() is None:      # read now: after connect() no file can be opened
        log("no public suffix list (Debian's publicsuffix package): domains are approximated")
    try:
        sc = Scanner.connect(streams_on_ring=True)
    except ScannerError as exc:
        log(str(exc))
        return 1
    config = dict(sc.config)
    kind = config.pop("detector", "dns-shadow")
    if kind not in DETECTORS:
        sc.alert(f"scanner not started: detector {kind!r} is not one of {', '.join(DETECTORS)}",
                 event="config_error")
        return 2
    try:
        if kind != "dns-shadow":
            return run_flows(sc, kind, config)
        sc.config = config
        return run(sc)
    except ScannerError as exc:   # the NI kernel went away: nothing left to protect
        log(str(exc))
        return 0


if __name__ == "__main__":
    sys.exit(main())
