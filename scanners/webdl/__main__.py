"""The web-download scanner process: ``core`` wired to the vhostni scanner SDK.

Run by the NI kernel as ``python3 scanners/webdl``.  Everything is imported, and clamd's unix
socket connected, before the lockdown: after it, seccomp forbids opening files and creating or
connecting sockets.  If the clamd session is lost, the scanner alerts and exits so that the NI
kernel restarts it and the new process connects again.
"""
from __future__ import annotations

import os
import sys

if __package__:
    from .core import ConfigError, WebDownloadScanner
else:   # run as a directory (python3 scanners/webdl): make the package importable by its own name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from webdl.core import ConfigError, WebDownloadScanner   # type: ignore[no-redef]

from vhostni.scanner import (Scanner, ScannerError, StreamClosed, StreamData, StreamEnd,
                             StreamOpened, Refused)
from vhostni.scanner.streamacts import apply_actions, send_alert
from vhostni.scanner.clamd import Clamd, ClamdEngine, ClamdError
from vhostni.scanner.http1 import MISSING_DECODERS

TICK = 1.0


def log(msg: str) -> None:
    print(f"webdl: {msg}", file=sys.stderr, flush=True)


# alerts too large for the wire (hostile heads, a large object) go without these fields
SLIM = ("object_b64", "request_headers", "response_headers", "ambiguities")


def apply(sc: Scanner, core: WebDownloadScanner, stream, acts: list) -> None:
    apply_actions(sc, core, stream, acts, log, SLIM)


def alert(sc: Scanner, message: str, fields: dict) -> None:
    """Sends an alert; one too large for the wire goes without its SLIM fields."""
    send_alert(sc, message, fields, SLIM)


def run(sc: Scanner, core: WebDownloadScanner, engine) -> int:
    ports = core.cfg["ports"]
    for port in ports:
        try:
            sc.subscribe_stream(port=port, direction="both", contain=True)
        except Refused as exc:
            sc.alert(f"web-download scanner not started: stream subscription to port {port} refused: {exc}",
                     event="subscription_refused", port=port)
            return 3
    sc.ready()        # subscribed: the kernel stops resetting connections to these ports
    sc.alert("web-download scanner ready", event="ready", ports=ports,
             engine="clamd" if engine else "sha256 only", hashes=len(core.cfg["_table"]),
             uninspectable=core.cfg["uninspectable"], tolerate=core.cfg["tolerate"],
             replacement=core.replacement, undecodable=sorted(MISSING_DECODERS))
    for coding, why in sorted(MISSING_DECODERS.items()):
        sc.alert(f"web-download scanner: cannot decode Content-Encoding {coding} here ({why}): "
                 f"{coding} responses are uninspectable (uninspectable = {core.cfg['uninspectable']})",
                 event="decoder_missing", coding=coding, why=why)
        log(f"Content-Encoding {coding} cannot be decoded here: {why}")
    log(f"scanning HTTP on ports {ports} of {sc.ni} with {'clamd + ' if engine else ''}"
        f"{len(core.cfg['_table'])} known-bad digests; ambiguous responses: {core.cfg['uninspectable']}; "
        + (f"infected responses replaced by injection {core.replacement!r}" if core.replacement
           else "infected responses kill their connection"))
    for ev in sc.events(timeout=TICK):
        if isinstance(ev, StreamOpened):
            s = ev.stream
            apply(sc, core, s, core.open(s.id, s.port, s.client == "guest", s.tuple))
        elif isinstance(ev, StreamData):
            apply(sc, core, ev.stream, core.data(ev.stream.id, ev.direction, ev.offset, ev.data))
        elif isinstance(ev, StreamEnd):
            apply(sc, core, ev.stream, core.end(ev.stream.id, ev.direction, ev.offset))
        elif isinstance(ev, StreamClosed):
            core.close(ev.stream.id)
        if engine is not None:
            engine.keepalive(core.cfg["clamd_ping_interval"])
            if engine.lost:
                sc.alert(f"web-download scanner: clamd lost ({engine.lost}); restarting to reconnect",
                         event="engine_lost")
                return 4
    return 0


def main() -> int:
    try:
        sc = Scanner.connect(lockdown=False, streams_on_ring=True)     # config first, clamd, then the lockdown
    except ScannerError as exc:
        log(str(exc))
        return 1
    try:
        core = WebDownloadScanner(sc.config, stream_injections=sc.stream_injections)
    except ConfigError as exc:
        sc.alert(f"web-download scanner not started: bad configuration: {exc}", event="config_error")
        return 2
    engine = None
    if core.cfg["clamd_socket"]:
        try:
            clamd = Clamd.connect(core.cfg["clamd_socket"], min(5.0, core.cfg["clamd_timeout"]))
            clamd.timeout = core.cfg["clamd_timeout"]
            clamd.ping()
        except ClamdError as exc:
            sc.alert(f"web-download scanner not started: {exc}", event="engine_unreachable")
            log(str(exc))
            return 2
        engine = ClamdEngine(clamd)
        core.engine = engine
    from vhostni.scanner import seccomp
    seccomp.lockdown()
    try:
        return run(sc, core, engine)
    except ScannerError as exc:
        log(str(exc))
        return 0


if __name__ == "__main__":
    sys.exit(main())
