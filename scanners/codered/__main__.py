"""The Code-Red scanner process: the detector in ``core`` wired to the vhostni scanner SDK.

Run by the NI kernel as ``python3 scanners/codered`` (or ``python3 -m scanners.codered`` from the repository
root).  It subscribes to the guest's DNS queries (read), the network's DNS responses (read) and the guest's
TCP SYNs (contain), then decides each held SYN and sends the detector's alerts.  Settings come from the
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

if __package__:
    from .core import CodeRedDetector, ConfigError
else:   # run as a directory (python3 scanners/codered): make the package importable by its own name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from codered.core import CodeRedDetector, ConfigError   # type: ignore[no-redef]

from vhostni.scanner import Refused, Scanner, ScannerError

#: How long the frame loop waits before doing timed work (the end-of-attack re-evaluation).
TICK = 0.5
#: How often changes no decision depends on yet (DNS answers, SYNs cut in attack mode) are checkpointed.
CHECKPOINT_EVERY = 1.0


def subscriptions(dns_port: int) -> list[tuple[dict, bool]]:
    """(match, contain) for the three subscriptions of section 5.3."""
    return [
        ({"direction": "from_guest", "proto": "udp", "dport": dns_port}, False),
        ({"direction": "to_guest", "proto": "udp", "sport": dns_port}, False),
        ({"direction": "from_guest", "proto": "tcp", "tcp_flags": "syn,!ack"}, True),
    ]


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

    for match, contain in subscriptions(det.cfg["dns_port"]):
        try:
            sc.subscribe(match, contain=contain)
        except Refused as exc:
            sc.alert(f"Code-Red scanner not started: subscription {match} refused: {exc}",
                     event="subscription_refused")
            log(f"subscription {match} refused: {exc}")
            return 3
    log(f"scanning on {sc.ni} as {sc.name}: more than {det.cfg['max_per_second']}/s or "
        f"{det.cfg['max_per_minute']}/min unknown destinations is an attack")
    for frame in sc.frames(timeout=TICK):
        if frame is None:
            alert = det.tick()
            checkpoint(force=True)
        else:
            verdict = det.handle_frame(frame.direction, frame.data)
            alert = verdict.alert
            checkpoint(force=False)       # before the decision: the kernel keeps it first
            if frame.held:
                # Only SYNs are held (contain=True); DNS frames carry no objection (action None).
                if verdict.action in (None, "pass"):
                    sc.pass_(frame)
                else:
                    sc.cut(frame)
        if alert is not None:
            sc.alert(alert.message, **alert.fields)
    return 0


def main() -> int:
    try:
        sc = Scanner.connect()
    except ScannerError as exc:
        log(str(exc))
        return 1
    try:
        return run(sc)
    except ScannerError as exc:   # the NI kernel went away: nothing left to protect
        log(str(exc))
        return 0


if __name__ == "__main__":
    sys.exit(main())
