"""The admin plane's QMP commands: a table of name -> (parameters, handler).

Adding a command (e.g. the quarantine commands, ``ni-quarantine`` / ``ni-release``)::

    from vhostni.admin.commands import QMPError, command, find_ni

    @command("ni-quarantine", {"name": "str", "*reason": "str"})
    def ni_quarantine(ctx, args):
        \"\"\"Drops all traffic of NI ``name`` but what its policy allows in quarantine.\"\"\"
        ni = find_ni(ctx, args["name"])          # DeviceNotFound if there is none
        ...                                      # ctx.daemon is the Daemon
        ctx.emit("NI_QUARANTINED", {"ni": ni.name, "reason": args.get("reason")})
        return {}                                # the "return" value (None means {})

Parameters are QAPI-like: ``"name": type``, a leading ``*`` marks an optional one; types
are ``str``, ``int``, ``bool``, ``object`` (a JSON object), ``array``, ``any``.  The
arguments are checked before the handler runs (missing, unexpected, wrong type: QEMU's
messages, GenericError), so a handler sees only the declared keys with the declared types.
A handler raises :class:`QMPError` (class and description) to answer with an error; any
other exception is logged and answered ``GenericError`` without disturbing the daemon.
The module that defines a command must be imported before the server starts (add it to
``vhostni/admin/__init__.py``).  Every command runs on the daemon's thread between turns of
the data plane: keep it short, and never block.

``ctx`` (an AdminServer) offers ``daemon``, ``state`` (a StateDir or None), ``emit(event,
data)`` (to every negotiated client) and ``alert_log`` (the AlertLog).
"""
from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .. import __version__
from ..policy import (DIR_FROM, DIR_TO, ETHERTYPES, PROTOS, TCP_FLAGS, Match, PolicyError,
                      parse_policy)
from .alerts import read_alerts, read_recent
from .state import NAME_RE, absolute_programs, socket_in_use

log = logging.getLogger("vhostni.admin")


class QMPError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class Command:
    name: str
    params: dict[str, tuple[str, bool]]      # name -> (type, required)
    handler: Callable[[Any, dict], Any]
    doc: str


COMMANDS: dict[str, Command] = {}

_TYPES = {"str": (str, "string"), "int": (int, "integer"), "bool": (bool, "boolean"),
          "object": (dict, "object"), "array": (list, "array"), "any": (object, "any")}


def command(name: str, params: Optional[dict[str, str]] = None):
    """Registers a handler ``fn(ctx, args) -> return value`` as QMP command ``name``."""
    spec = {}
    for key, typ in (params or {}).items():
        required = not key.startswith("*")
        key = key.lstrip("*")
        if typ not in _TYPES:
            raise ValueError(f"{name}: parameter {key}: unknown type {typ!r}")
        spec[key] = (typ, required)

    def deco(fn):
        if name in COMMANDS:
            raise ValueError(f"QMP command {name!r} defined twice")
        COMMANDS[name] = Command(name, spec, fn, (fn.__doc__ or "").strip())
        return fn
    return deco


def check_arguments(cmd: Command, args: dict) -> dict:
    """The arguments as the command declared them, or QMPError with QEMU's wording."""
    for key in args:
        if key not in cmd.params:
            raise QMPError(f"Parameter '{key}' is unexpected")
    for key, (typ, required) in cmd.params.items():
        if key not in args:
            if required:
                raise QMPError(f"Parameter '{key}' is missing")
            continue
        pytype, qtype = _TYPES[typ]
        v = args[key]
        if typ == "any":
            continue
        if not isinstance(v, pytype) or (typ == "int" and isinstance(v, bool)):
            raise QMPError(f"Invalid parameter type for '{key}', expected: {qtype}")
    return args


class Deferred:
    """What a command returns whose work must not run on the daemon's thread: ``work()``
    runs on a worker thread (it must touch no daemon state), then ``finish(result)`` on the
    daemon's thread, and its return value (or QMPError) is the answer.  The client's later
    commands wait for it."""

    def __init__(self, work: Callable[[], Any], finish: Callable[[Any], Any]):
        self.work = work
        self.finish = finish


def dispatch(ctx, name: str, args: dict) -> Any:
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise QMPError(f"The command {name} has not been found", "CommandNotFound")
    result = cmd.handler(ctx, check_arguments(cmd, args))
    return {} if result is None else result


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def find_ni(ctx, name: str):
    ni = ctx.daemon.nis.get(name)
    if ni is None:
        raise QMPError(f"NI '{name}' not found", "DeviceNotFound")
    return ni


def find_nk(ctx, name: str):
    """The NI kernel of NI ``name`` (None: the NI has no policy)."""
    ni = find_ni(ctx, name)
    return ctx.daemon.kernel.nis.get(ni.port.index)


def find_scanner(ctx, ni: str, name: str):
    nk = find_nk(ctx, ni)
    sp = nk.scanners.get(name) if nk is not None else None
    if sp is None:
        raise QMPError(f"NI '{ni}' has no scanner '{name}' in its policy", "DeviceNotFound")
    return sp


def match_to_dict(m: Match) -> dict:
    """A Match back in the policy schema's words."""
    d: dict[str, Any] = {}
    if m.dirs:
        d["direction"] = {DIR_FROM: "from_guest", DIR_TO: "to_guest"}.get(m.dirs, "both")
    if m.ethertype:
        d["ethertype"] = {v: k for k, v in ETHERTYPES.items()}.get(m.ethertype, m.ethertype)
    if m.proto >= 0:
        d["proto"] = {v: k for k, v in PROTOS.items()}.get(m.proto, m.proto)
    for key in ("src", "dst"):
        net = getattr(m, key)
        if net is not None:
            d[key] = str(net)
    for key in ("sport", "dport"):
        lo, hi = getattr(m, key)
        if (lo, hi) != (0, 0xFFFF):
            d[key] = lo if lo == hi else f"{lo}-{hi}"
    if m.flags_mask:
        d["tcp_flags"] = ",".join(("" if m.flags_value & bit else "!") + name
                                  for name, bit in TCP_FLAGS.items() if m.flags_mask & bit)
    if m.terms:
        d["terms"] = [{"offset": off, "value": val.hex(), "mask": mask.hex()} for off, val, mask in m.terms]
    if m.flow_new:
        d["flow"] = "new"
    return d


def _validate(doc: dict, source: str):
    base = os.getcwd()
    doc = absolute_programs(doc, base)
    try:
        return parse_policy(doc, base=base, source=source), doc
    except PolicyError as exc:
        raise QMPError(f"invalid policy: {exc}") from None


_NI_TOP = {"name", "socket", "connected", "features", "broken", "mtu"}


def ni_info(ctx, ni) -> dict:
    info = ni.info()
    d: dict[str, Any] = {}
    counters: dict[str, int] = {}
    for k, v in info.items():
        if k in _NI_TOP or not isinstance(v, int) or isinstance(v, bool):
            d[k] = v
        else:
            counters[k] = v
    d["features"] = ni.device.features
    d["state"] = "broken" if d.get("broken") else ("up" if ni.connected else "down")
    d["counters"] = counters
    nk = ctx.daemon.kernel.nis.get(ni.port.index)
    d["policy"] = nk.policy.source if nk else None
    d["scanners"] = sorted(nk.scanners) if nk else []
    d["held"] = len(nk.held) if nk else 0
    d["subscriptions"] = len(nk.subs) if nk else 0
    d["signatures"] = nk.signature_counts() if nk else None     # per-rule matches and drops
    d["added_at_run_time"] = ni.name in ctx.runtime_nis
    return d


# ---------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------

@command("query-version")
def query_version(ctx, args):
    """The daemon's version, in QEMU's VersionInfo shape."""
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"vhostni {__version__}"}


@command("query-commands")
def query_commands(ctx, args):
    """Every command this server knows."""
    return [{"name": n} for n in ["qmp_capabilities"] + sorted(COMMANDS)]


@command("query-nis", {"*name": "str"})
def query_nis(ctx, args):
    """NIs: state (up/down/broken), features, broken reason, counters, policy, scanners."""
    if "name" in args:
        return [ni_info(ctx, find_ni(ctx, args["name"]))]
    return [ni_info(ctx, ni) for ni in ctx.daemon.nis.values()]


@command("ni-add", {"name": "str", "socket": "str", "*policy": "object"})
def ni_add(ctx, args):
    """Adds an NI at run time: a vhost-user server socket (an absolute path QEMU connects to)
    or ``client:PATH`` (a QEMU listening at PATH, server=on), and optionally its policy
    (validated first: nothing is created if it does not validate)."""
    name, spec = args["name"], args["socket"]
    _check_new_ni(ctx, name, spec)
    if "policy" not in args:
        _add_ni(ctx, name, spec, None, None)
        return None

    def finish(validated):
        _check_new_ni(ctx, name, spec)     # taken meanwhile (the policy compiled for a while)?
        _add_ni(ctx, name, spec, *validated)
    # parsing and compiling (signature rules: seconds for 10,000) off the daemon's thread
    return Deferred(lambda: _validate(args["policy"], "qmp"), finish)


def _check_new_ni(ctx, name: str, spec: str) -> None:
    client = spec.startswith("client:")
    path = spec[len("client:"):] if client else spec
    if not NAME_RE.match(name):
        raise QMPError(f"'name': NI names are 1-32 of [A-Za-z0-9_.-], not {name!r}")
    if name in ctx.daemon.nis:
        raise QMPError(f"NI '{name}' already exists")
    if not os.path.isabs(path):
        raise QMPError(f"'socket': an absolute path (or client:PATH), not {spec!r}")
    if any(ni.path == path for ni in ctx.daemon.nis.values()):
        raise QMPError(f"'socket': {path} is already an NI's socket")
    if not client and os.path.lexists(path) and (not stat.S_ISSOCK(os.lstat(path).st_mode)
                                                 or socket_in_use(path)):
        raise QMPError(f"'socket': {path} exists and is not a stale socket")


def _add_ni(ctx, name: str, spec: str, pol, doc) -> None:
    path = spec[len("client:"):] if spec.startswith("client:") else spec
    try:
        ctx.daemon.add_ni(name, spec)
    except (OSError, ValueError) as exc:
        raise QMPError(f"cannot listen on {path}: {exc}") from None
    ctx.runtime_nis[name] = spec
    try:
        ctx.save_nis()
        if pol is not None:
            _set_policy(ctx, name, pol, doc)
    except (OSError, QMPError) as exc:
        ctx.daemon.remove_ni(name)
        ctx.runtime_nis.pop(name, None)
        try:
            ctx.save_nis()
        except OSError as exc2:
            log.error("admin: NI %s: state directory not updated: %s", name, exc2)
        raise QMPError(f"NI '{name}' not added: {exc}") from None
    log.info("admin: NI %s added on %s", name, path)


@command("ni-remove", {"name": "str"})
def ni_remove(ctx, args):
    """Removes an NI: its scanners stop, its held frames are dropped, its guest loses its
    NIC, its socket and its stored policy go away."""
    name = args["name"]
    find_ni(ctx, name)
    ctx.daemon.remove_ni(name)
    log.info("admin: NI %s removed", name)
    try:
        if ctx.runtime_nis.pop(name, None) is not None:
            ctx.save_nis()
        if ctx.state:
            ctx.state.remove_policy(name)
    except OSError as exc:
        log.error("admin: NI %s: state directory not updated: %s", name, exc)
        raise QMPError(f"NI '{name}' removed, but the state directory could not be updated "
                       f"({exc}): it comes back after a restart") from None


def _set_policy(ctx, name: str, pol, doc: dict) -> None:
    path = None
    old_doc = None
    if ctx.state:
        nk = find_nk(ctx, name)
        old_doc = nk.policy.doc if nk is not None and nk.policy.source == ctx.state.policy_path(name) else None
        path = ctx.state.save_policy(name, doc)
        pol.source = path
    try:
        ctx.daemon.set_policy(name, pol, path)
    except Exception as exc:
        # the policy in effect is still the old one: so is the stored one
        if ctx.state:
            try:
                if old_doc is not None:
                    ctx.state.save_policy(name, old_doc)
                else:
                    ctx.state.remove_policy(name)
            except OSError:
                log.exception("admin: NI %s: stored policy not restored", name)
        if not isinstance(exc, PolicyError):
            log.exception("admin: NI %s: policy not applied", name)
        raise QMPError(f"policy not applied, the old one stays: {exc}") from None


@command("ni-set-policy", {"name": "str", "policy": "object"})
def ni_set_policy(ctx, args):
    """Replaces NI ``name``'s policy with ``policy`` (the policy file's schema, as a JSON
    object), validated first: an invalid one changes nothing and the error names the key.
    Rules change at once; scanners that stay keep running.  With --state-dir it is stored
    and survives a restart."""
    name = args["name"]
    find_ni(ctx, name)

    def finish(validated):
        pol, doc = validated
        find_ni(ctx, name)             # it may have gone while the policy compiled
        try:
            _set_policy(ctx, name, pol, doc)
        except OSError as exc:
            raise QMPError(f"policy not stored, nothing changed: {exc}") from None
        log.info("admin: NI %s has a new policy", name)
    # parsing and compiling (signature rules: seconds for 10,000) off the daemon's thread
    return Deferred(lambda: _validate(args["policy"], "qmp"), finish)


@command("ni-get-policy", {"name": "str"})
def ni_get_policy(ctx, args):
    """NI ``name``'s policy in effect, as the document it was set from, and its source
    (a file, or "qmp"); both null if the NI has none."""
    nk = find_nk(ctx, args["name"])
    if nk is None:
        return {"source": None, "policy": None}
    return {"source": nk.policy.source, "policy": nk.policy.doc}


@command("ni-validate-policy", {"policy": "object"})
def ni_validate_policy(ctx, args):
    """Checks a policy without applying it: returns a summary, or an error naming the key."""
    def finish(validated):
        pol, _ = validated
        return {"scanners": [s.name for s in pol.scanners], "prevent": len(pol.prevent)}
    # compiling it (signature rules: seconds for 10,000) off the daemon's thread, like applying it
    return Deferred(lambda: _validate(args["policy"], "qmp"), finish)


def _scanner_info(nk, sp) -> dict:
    info = sp.info()
    info["ni"] = nk.name
    info["rights"] = [dict(match_to_dict(r.match), contain=r.contain) for r in sp.spec.rights]
    info["injections"] = [n for n, _ in sp.spec.injections]
    info["stream_injections"] = [n for n, _ in sp.spec.stream_injections]
    info["uptime"] = round(time.monotonic() - sp.started_at, 3) if sp.running else None
    info["healthy"] = sp.running and sp.locked and sp.consecutive_timeouts == 0
    return info


@command("query-scanners", {"*ni": "str"})
def query_scanners(ctx, args):
    """Scanners of every NI (or of ``ni``): state, rights, health and counters."""
    out = []
    if "ni" in args:
        nk = find_nk(ctx, args["ni"])
        nks = [nk] if nk else []
    else:
        nks = list(ctx.daemon.kernel.nis.values())
    for nk in nks:
        for sp in nk.scanners.values():
            out.append(_scanner_info(nk, sp))
    return out


@command("scanner-start", {"ni": "str", "name": "str"})
def scanner_start(ctx, args):
    """Starts a scanner of the NI's policy that is stopped (or waiting to restart)."""
    sp = find_scanner(ctx, args["ni"], args["name"])
    if sp.running:
        raise QMPError(f"scanner '{sp.name}' of NI '{args['ni']}' is already running")
    sp.start()
    if not sp.running:
        raise QMPError(f"scanner '{sp.name}' did not start: {sp.last_error}")
    return {"pid": sp.pid}


@command("scanner-stop", {"ni": "str", "name": "str"})
def scanner_stop(ctx, args):
    """Stops a scanner until scanner-start; what it owed gets the policy's default."""
    sp = find_scanner(ctx, args["ni"], args["name"])
    if sp.state == "stopped":
        raise QMPError(f"scanner '{sp.name}' of NI '{args['ni']}' is not running")
    sp.stop()


@command("query-alerts", {"*ni": "str", "*scanner": "str", "*since-seq": "int", "*limit": "int"})
def query_alerts(ctx, args):
    """Alerts after ``since-seq`` (default 0: all the log holds), oldest first, at most
    ``limit`` (default 100, at most 1000), filtered by ``ni`` and ``scanner``.  Read from the
    alert log (across rotations), so nothing is missed across reconnects: continue with
    since-seq = next-seq while ``more``.  ``last-seq`` is the newest alert's number."""
    since = args.get("since-seq", 0)
    limit = args.get("limit", 100)
    if not 1 <= limit <= 1000:
        raise QMPError("'limit': 1..1000")
    alog = ctx.alert_log
    if alog.path:
        res = read_alerts(alog.files(), since, args.get("ni"), args.get("scanner"), limit)
    else:
        res = read_recent(alog.recent, since, args.get("ni"), args.get("scanner"), limit)
    res["last-seq"] = alog.seq
    return res


@command("query-admin")
def query_admin(ctx, args):
    """The admin plane: ``listening`` endpoints, authenticated ``clients`` (peer,
    principal, counters), ``pending`` connections (TLS handshake not done), and how many
    peers were refused (``refused_uid``, ``session_refused``), evicted while pending
    (``pending_evicted``) or dropped at the handshake deadline (``handshake_timeouts``)."""
    return ctx.info()


@command("query-alert-log")
def query_alert_log(ctx, args):
    """The alert log's health: ``path``, ``seq`` (the newest alert's number), ``error``
    (why it cannot be written now, or null), ``pending`` (alerts held in memory, not yet
    durable), ``lost`` (alerts never written since the daemon started), ``write_errors``
    and ``failing_for`` (seconds, or null).  ALERT_LOG_FAILED and ALERT_LOG_RECOVERED events
    say when it changes."""
    return ctx.alert_log.info()


@command("quit")
def quit_(ctx, args):
    """Stops the daemon (as SIGTERM does): guests lose their NICs until it is back."""
    ctx.daemon.request_stop()
