"""Applies a stream scanner core's decisions to its streams: one copy for every stream scanner.

A sans-I/O scanner core (scanners/email, webdl, httpguard) answers each stream event with a list
of actions, tuples whose first item is the kind:

- ``("alert", message, fields)``: sent with ``Scanner.alert``;
- ``("cut", ...)``/``("inject", ...)``: asked of the NI kernel; if it refuses (or the stream has
  closed), ``edit_refused(stream_id, act, why)`` of the core says what to do instead, and the rest
  of the list, which assumes the edit worked, is dropped;
- ``("pass", hold, upto)``, ``("pass_all", hold)``, ``("more", hold)``: for a hold the stream still
  has, skipped once the stream closed;
- ``("kill",)``: unless the stream closed already.

Unknown kinds are ignored.  Lives in the SDK because a scanner imports only the SDK and its own
directory inside its sandbox.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from . import Refused


def send_alert(sc, message: str, fields: dict, slim: Optional[Iterable[str]] = None) -> None:
    """Sends an alert; with ``slim``, one too large for the wire (hostile heads, a large object)
    goes without those (largest) fields and with ``alert_truncated`` rather than not at all."""
    if slim is None:
        sc.alert(message, **fields)
        return
    try:
        sc.alert(message, **fields)
    except ValueError:
        drop = set(slim)
        sc.alert(message, **{k: v for k, v in fields.items() if k not in drop}, alert_truncated=True)


def apply_actions(sc, core, stream, acts: list, log: Callable[[str], None],
                  slim: Optional[Iterable[str]] = None) -> None:
    """Applies ``acts`` (from ``core``) to ``stream``; see the module doc."""
    for act in acts:
        kind = act[0]
        if kind in ("inject", "cut"):
            if not _edit(sc, core, stream, act, log, slim):
                return
        elif kind == "alert":
            send_alert(sc, act[1], act[2], slim)
        elif stream.closed:
            continue
        elif kind == "pass" and act[1] in stream.holds:
            stream.pass_(act[1], act[2])
        elif kind == "pass_all" and act[1] in stream.holds:
            stream.pass_all(act[1])
        elif kind == "more" and act[1] in stream.holds:
            stream.more(act[1])
        elif kind == "kill":
            stream.kill()


def _edit(sc, core, stream, act: tuple, log, slim) -> bool:
    """Asks the NI kernel for a cut or inject; if it refuses, the core's replacement actions
    (typically kill and alert) are applied and False returned."""
    try:
        if stream.closed:
            raise Refused(f"the stream closed ({stream.reason})")
        if act[0] == "cut":
            stream.cut(act[1], act[2], act[3])
        else:
            stream.inject(act[1], act[2], act[3])
        return True
    except Refused as exc:
        log(f"stream {stream.id}: {act[0]} refused: {exc}")
        apply_actions(sc, core, stream, core.edit_refused(stream.id, act, str(exc)), log, slim)
        return False
