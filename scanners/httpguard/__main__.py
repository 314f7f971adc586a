"""The HTTP overflow stage as a scanner process: ``core`` wired to the vhostni scanner SDK.

Run by the NI kernel as ``python3 scanners/httpguard`` (or ``program = "vhostni:httpguard"``).
Everything is imported before ``Scanner.connect()`` locks the process down.
"""
from __future__ import annotations

import os
import sys

if __package__:
    from .core import ConfigError, HttpGuard
else:   # run as a directory (python3 scanners/httpguard): make the package importable by its own name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from httpguard.core import ConfigError, HttpGuard   # type: ignore[no-redef]

from vhostni.scanner import (Refused, Scanner, ScannerError, StreamClosed, StreamData, StreamEnd,
                             StreamOpened)
from vhostni.scanner.streamacts import apply_actions

TICK = 1.0


def log(msg: str) -> None:
    print(f"httpguard: {msg}", file=sys.stderr, flush=True)


# alerts too large for the wire (a hostile URI) go without these fields
SLIM = ("uri", "path", "detail")


def apply(sc: Scanner, core: HttpGuard, stream, acts: list) -> None:
    apply_actions(sc, core, stream, acts, log, SLIM)


def run(sc: Scanner, core: HttpGuard) -> int:
    ports = core.cfg["ports"]
    for port in ports:
        try:
            sc.subscribe_stream(port=port, direction="both", contain=True)
        except Refused as exc:
            sc.alert(f"http guard not started: stream subscription to port {port} refused: {exc}",
                     event="subscription_refused", port=port)
            return 3
    sc.ready()
    sc.alert("http guard ready", event="ready", ports=ports, inbound=core.cfg["inbound"],
             outbound=core.cfg["outbound"], signatures=[s.name for s in core.sigs][:200],
             block=core.cfg["block"], reply=core.reply)
    log(f"guarding HTTP on ports {ports} of {sc.ni} with {len(core.sigs)} field-length signatures "
        f"({'inbound' if core.cfg['inbound'] else ''}{' outbound' if core.cfg['outbound'] else ''}); "
        + (f"blocked requests answered with {core.reply!r}" if core.reply else "blocked requests kill"))
    streams: dict = {}
    last_tick = sc.clock()
    for ev in sc.events(timeout=TICK):
        now = sc.clock()
        if isinstance(ev, StreamOpened):
            s = ev.stream
            streams[s.id] = s
            apply(sc, core, s, core.open(s.id, s.port, s.client == "guest", s.tuple, now))
        elif isinstance(ev, StreamData):
            apply(sc, core, ev.stream, core.data(ev.stream.id, ev.direction, ev.offset, ev.data, now))
        elif isinstance(ev, StreamEnd):
            apply(sc, core, ev.stream, core.end(ev.stream.id, ev.direction, ev.offset, now))
        elif isinstance(ev, StreamClosed):
            core.close(ev.stream.id)
            streams.pop(ev.stream.id, None)
        if now - last_tick >= TICK / 2:          # not per event: tick() looks at every connection
            last_tick = now
            for sid, act in core.tick(now):
                if sid in streams:
                    apply(sc, core, streams[sid], [act])
    return 0


def main() -> int:
    try:
        sc = Scanner.connect(streams_on_ring=True)
    except ScannerError as exc:
        log(str(exc))
        return 1
    try:
        core = HttpGuard(sc.config, stream_injections=sc.stream_injections)
    except ConfigError as exc:
        sc.alert(f"http guard not started: bad configuration: {exc}", event="config_error")
        return 2
    try:
        return run(sc, core)
    except ScannerError as exc:
        log(str(exc))
        return 0


if __name__ == "__main__":
    sys.exit(main())
