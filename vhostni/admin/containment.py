"""QMP commands that contain an NI: quarantine, release, and its link (see Daemon.quarantine
and Daemon.set_link).  Each answers with the NI's containment state; the daemon announces
every change as a ``NI_QUARANTINE`` or ``NI_LINK`` event.
"""
from __future__ import annotations

from .commands import command, find_ni


@command("ni-quarantine", {"name": "str", "*reason": "str"})
def ni_quarantine(ctx, args):
    """Drops every frame of NI ``name``, both ways, but what its policy's ``[quarantine]
    allow`` rules match (nothing if it has none), until ``ni-release``; policy changes keep
    it quarantined."""
    ni = find_ni(ctx, args["name"])
    return ctx.daemon.quarantine(ni.name, True, args.get("reason", "admin"))


@command("ni-release", {"name": "str"})
def ni_release(ctx, args):
    """Ends NI ``name``'s quarantine (its link state is separate: see ``ni-set-link``)."""
    ni = find_ni(ctx, args["name"])
    return ctx.daemon.quarantine(ni.name, False)


@command("ni-set-link", {"name": "str", "up": "bool", "*reason": "str"})
def ni_set_link(ctx, args):
    """Sets NI ``name``'s link.  Down: the NI drops every frame both ways and, if it is a
    QMP client of its QEMU (``--qemu-qmp``), QEMU's ``set_link`` takes the guest's carrier
    away; the QEMU part is asynchronous, ``qemu.link`` in the answer of ``query-ni-containment``
    shows when it is done."""
    ni = find_ni(ctx, args["name"])
    return ctx.daemon.set_link(ni.name, args["up"], args.get("reason", "admin"))


@command("query-ni-containment", {"*name": "str"})
def query_ni_containment(ctx, args):
    """Quarantine and link state of every NI (or of ``name``), the drops they caused, and
    what the NI knows of its QEMU (NIC, MAC, link it set)."""
    names = [find_ni(ctx, args["name"]).name] if "name" in args else sorted(ctx.daemon.nis)
    return [ctx.daemon.containment(n) for n in names]
