"""The admin plane: a QMP server inside the vhostni daemon.

* :mod:`.protocol` — QMP's server side, sans-I/O (bytes in, events out);
* :mod:`.commands` — the command table (add commands there; its docstring says how);
* :mod:`.server` — unix and TCP+TLS listeners in the daemon's epoll, peer checks, events;
* :mod:`.state` — what the admin plane changed, kept across restarts (``--state-dir``);
* :mod:`.alerts` — reading the alert log for ``query-alerts``; the syslog sink.

``qemu.qmp``'s clients and ``qmp-shell`` talk to it unchanged.
"""
from .commands import COMMANDS, QMPError, command
from . import containment  # noqa: F401  (registers ni-quarantine, ni-release, ni-set-link)
from .protocol import QMPServerConnection
from .server import AdminServer, TLSFiles, parse_endpoint
from .state import StateDir

__all__ = ["AdminServer", "COMMANDS", "QMPError", "QMPServerConnection", "StateDir", "TLSFiles",
           "command", "parse_endpoint"]
