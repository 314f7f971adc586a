"""The e-mail virus scanner process: ``core`` wired to the vhostni scanner SDK.

Run by the NI kernel as ``python3 scanners/email``.  Everything is imported, and clamd's unix
socket connected, before ``Scanner.connect()``: after it, seccomp forbids opening files and
creating or connecting sockets.  If the clamd connection is lost, the scanner alerts and exits
so that the NI kernel restarts it and the new process connects again.
"""
from __future__ import annotations

import os
import sys

if __package__:
    from .core import ConfigError, EmailScanner, EngineError
else:   # run as a directory (python3 scanners/email): "email" is a standard library package,
    # so load this one under another name
    import importlib.util
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location("vhostni_email_scanner", os.path.join(_here, "__init__.py"),
                                                   submodule_search_locations=[_here])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _mod
    _spec.loader.exec_module(_mod)
    from vhostni_email_scanner.core import ConfigError, EmailScanner, EngineError  # type: ignore  # noqa: E402,E501

from vhostni.scanner import (Refused, Scanner, ScannerError, StreamClosed, StreamData,
                             StreamOpened)
from vhostni.scanner.streamacts import apply_actions
from vhostni.scanner.clamd import Clamd, ClamdEngine, ClamdError

TICK = 1.0


def log(msg: str) -> None:
    print(f"email: {msg}", file=sys.stderr, flush=True)


def apply(sc: Scanner, core: EmailScanner, stream, acts: list) -> None:
    apply_actions(sc, core, stream, acts, log)


def run(sc: Scanner, core: EmailScanner, engine) -> int:
    ports = list(core.cfg["smtp_ports"]) + list(core.cfg["pop3_ports"])
    for port in ports:
        try:
            sc.subscribe_stream(port=port, direction="both", contain=True)
        except Refused as exc:
            sc.alert(f"e-mail scanner not started: stream subscription to port {port} refused: {exc}",
                     event="subscription_refused", port=port)
            return 3
    # the policy's stream injections are names here (the bytes stay with the kernel): without
    # the configured one, infected attachments cannot be replaced and kill their connection
    replacement = core.cfg["replacement_injection"]
    if replacement not in core.stream_injections:
        replacement = None
    sc.ready()        # subscribed: the kernel stops resetting connections to these ports
    sc.alert("e-mail scanner ready", event="ready", ports=ports,
             engine="clamd" if engine else "sha256 only", hashes=len(core.cfg["_table"]),
             replacement=replacement)
    log(f"scanning ports {ports} on {sc.ni} with {'clamd + ' if engine else ''}"
        f"{len(core.cfg['_table'])} known-bad digests; infected attachments "
        + (f"replaced by injection {replacement!r}" if replacement else "kill their connection"))
    for ev in sc.events(timeout=TICK):
        if isinstance(ev, StreamOpened):
            s = ev.stream
            apply(sc, core, s, core.open(s.id, s.port, s.client == "guest", s.tuple))
        elif isinstance(ev, StreamData):
            apply(sc, core, ev.stream, core.data(ev.stream.id, ev.direction, ev.offset, ev.data))
        elif isinstance(ev, StreamClosed):
            core.close(ev.stream.id)
        if engine is not None:
            engine.keepalive(core.cfg["clamd_ping_interval"])
            if engine.lost:
                sc.alert(f"e-mail scanner: clamd lost ({engine.lost}); restarting to reconnect",
                         event="engine_lost")
                return 4
    return 0


def main() -> int:
    # start-up: configuration and clamd come before the lockdown, so read the config from the
    # kernel's hello first without locking down, connect, then lock down
    try:
        sc = Scanner.connect(lockdown=False, streams_on_ring=True)
    except ScannerError as exc:
        log(str(exc))
        return 1
    try:
        core = EmailScanner(sc.config, stream_injections=sc.stream_injections)
    except ConfigError as exc:
        sc.alert(f"e-mail scanner not started: bad configuration: {exc}", event="config_error")
        return 2
    engine = None
    if core.cfg["clamd_socket"]:
        try:
            clamd = Clamd.connect(core.cfg["clamd_socket"], min(5.0, core.cfg["clamd_timeout"]))
            clamd.timeout = core.cfg["clamd_timeout"]
            clamd.ping()
        except ClamdError as exc:
            sc.alert(f"e-mail scanner not started: {exc}", event="engine_unreachable")
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
