"""Running vhostni as a system service: the daemon config file and systemd's readiness protocol.

``vhostni run --config FILE`` reads a TOML file that says what the command line says, so a unit
file does not carry NIs on its command line::

    [daemon]                      # any `vhostni run` option, dashes as underscores
    alert_log = "/var/log/vhostni/alerts.jsonl"
    admin = ["unix:/run/vhostni/admin.sock"]
    admin_allow_uid = ["libvirt-qemu"]
    state_dir = "/var/lib/vhostni"

    [[ni]]
    name = "vm1"
    socket = "/run/vhostni/vm1.sock"      # or client = "/run/vhostni/vm1.sock"
    policy = "policies/vm1.toml"          # optional; relative to this file
    qemu_qmp = "/run/vhostni/vm1.qmp"     # optional, with optional qemu_nic = "net0"

The file becomes command-line arguments, put before those actually given (so `--ni` and other
repeatable options add to it, and a flag given on the command line wins), and argparse
validates them once, as it does for the command line. A key that is not an option is an error
that names it. Relative paths in ``[[ni]]`` are relative to the file's directory.

``notify()`` speaks sd_notify(3): one datagram to ``$NOTIFY_SOCKET``, if systemd set it.
"""
from __future__ import annotations

import argparse
import os
import socket
import tomllib
from typing import Any

NI_KEYS = {"name", "socket", "client", "policy", "qemu_qmp", "qemu_nic"}


class ConfigError(ValueError):
    pass


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The ``vhostni run`` options by their config key (``--alert-log`` -> ``alert_log``)."""
    opts = {}
    for action in parser._actions:     # argparse has no public accessor for this
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] not in ("--help", "--config"):
            opts[longs[0][2:].replace("-", "_")] = action
    return opts


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{key}: expected a string or an integer, not {type(value).__name__}")
    return str(value)


def config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The ``vhostni run`` arguments the config file at ``path`` stands for."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(doc) - {"daemon", "ni"}
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected daemon, ni)")
    opts = _options(parser)
    argv: list[str] = []
    daemon = doc.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    for key, value in daemon.items():
        action = opts.get(key)
        if action is None or key in ("ni", "policy", "qemu_qmp"):
            hint = " (NIs go in [[ni]] tables)" if key in ("ni", "policy", "qemu_qmp") else ""
            raise ConfigError(f"{path}: daemon.{key}: not a `vhostni run` option{hint}")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") \
            else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: daemon.{key}: expected true or false")
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            values = value if isinstance(value, list) else [value]
            for v in values:
                argv += [flag, _scalar(f"daemon.{key}", v)]
        elif action.nargs == "?":
            if value is True:
                argv += [flag]
            elif value is not False:
                argv += [flag, _scalar(f"daemon.{key}", value)]
        else:
            argv += [flag, _scalar(f"daemon.{key}", value)]
    nis = doc.get("ni", [])
    if not isinstance(nis, list):
        raise ConfigError(f"{path}: ni must be an array of tables ([[ni]])")
    for i, ni in enumerate(nis):
        where = f"{path}: ni[{i}]"
        if not isinstance(ni, dict):
            raise ConfigError(f"{where}: must be a table")
        bad = set(ni) - NI_KEYS
        if bad:
            raise ConfigError(f"{where}.{sorted(bad)[0]}: unknown key (expected "
                              f"{', '.join(sorted(NI_KEYS))})")
        name = ni.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: required, a string")
        if ("socket" in ni) == ("client" in ni):
            raise ConfigError(f"{where}: exactly one of socket (vhostni listens) or client "
                              "(QEMU listens, server=on)")
        sock = _scalar(f"{where}.socket", ni.get("socket", ni.get("client")))
        sock = os.path.join(base, sock)
        argv += ["--ni", f"{name}={'client:' if 'client' in ni else ''}{sock}"]
        if "policy" in ni:
            argv += ["--policy", f"{name}={os.path.join(base, _scalar(where + '.policy', ni['policy']))}"]
        if "qemu_qmp" in ni:
            spec = os.path.join(base, _scalar(where + ".qemu_qmp", ni["qemu_qmp"]))
            if "qemu_nic" in ni:
                spec += f",nic={_scalar(where + '.qemu_nic', ni['qemu_nic'])}"
            argv += ["--qemu-qmp", f"{name}={spec}"]
        elif "qemu_nic" in ni:
            raise ConfigError(f"{where}.qemu_nic: only with qemu_qmp")
    return argv


def expand_config(argv: list[str], parser: argparse.ArgumentParser,
                  run_parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with every ``--config FILE`` of ``vhostni run`` replaced by what FILE says,
    placed first so the command line adds to it and overrides it."""
    if not argv or argv[0] != "run":
        return argv
    rest, files = [], []
    it = iter(argv[1:])
    for a in it:
        if a == "--config":
            f = next(it, None)
            if f is None:
                parser.error("--config needs a FILE")
            files.append(f)
        elif a.startswith("--config="):
            files.append(a.partition("=")[2])
        else:
            rest.append(a)
    out = ["run"]
    for f in files:
        out += config_argv(f, run_parser)
    return out + rest


def notify(state: str) -> bool:
    """Tells systemd ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``)
    when it started us with ``Type=notify``; does nothing otherwise. Never raises: readiness
    is a courtesy to the service manager, not a reason to stop forwarding."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False
