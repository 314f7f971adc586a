"""Command line: ``vhostni run --ni NAME=SOCKET [--ni ...] [--uplink tap:IFNAME]``,
``vhostni replay --guest-mac MAC [--policy FILE] IN.pcap --out OUT.pcap --alerts OUT.jsonl``, and
``vhostni images build [--out DIR] [--add SRC[:DEST]] [--hook SCRIPT]`` (guest images for tests)."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

NAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,32}\Z")   # \Z: "$" would let a final newline through


def _ni_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SOCKET")
    if not NAME_RE.match(name):
        raise argparse.ArgumentTypeError(f"{name!r}: NI names are 1-32 of [A-Za-z0-9_.-]")
    return name, path


def _policy_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path or not NAME_RE.match(name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FILE")
    return name, path


def _qmp_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path or not NAME_RE.match(name):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=QMP_SOCKET[,nic=ID]")
    return name, path


def _uid_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    import pwd
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r}: no such user") from None


def _gid_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    import grp
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r}: no such group") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostni", description="Self-securing network interfaces for VMs")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve NIs in the foreground")
    p.run_parser = run
    run.add_argument("--config", action="append", default=[], metavar="FILE",
                     help="a daemon config file (TOML) saying what these options say; the "
                          "command line adds to it (see vhostni/service.py)")
    run.add_argument("--ni", action="append", type=_ni_arg, default=[], metavar="NAME=SOCKET",
                     help="an NI: a vhost-user server socket QEMU connects to, or client:SOCKET "
                          "to connect to a QEMU listening there (server=on); repeatable")
    run.add_argument("--socket-group", type=_gid_arg, metavar="GROUP",
                     help="NI sockets vhostni listens on belong to GROUP, mode 0660 (e.g. "
                          "libvirt-qemu, so libvirt's QEMU may connect)")
    run.add_argument("--qemu-qmp", action="append", type=_qmp_arg, default=[],
                     metavar="NAME=QMP_SOCKET[,nic=ID]",
                     help="NI NAME's QEMU QMP socket: learn the NIC's MAC, set its link "
                          "(repeatable; nic=ID when the NIC cannot be told by its socket)")
    run.add_argument("--uplink", action="append", default=[], metavar="tap:IFNAME",
                     help="a host TAP device joined to the NIs' switch (repeatable)")
    run.add_argument("--poll", action="store_true",
                     help="busy-poll the rings (one core at 100%%) instead of waiting for kicks")
    run.add_argument("--offloads", choices=("on", "off"), default="on",
                     help="offer checksum and TSO offloads to guests (default on)")
    run.add_argument("--stats-file", metavar="PATH",
                     help="keep PATH updated with the NIs' counters as JSON")
    run.add_argument("--policy", action="append", type=_policy_arg, default=[], metavar="NAME=FILE",
                     help="the policy (TOML or JSON) of NI NAME; SIGHUP re-reads it")
    run.add_argument("--alert-log", metavar="PATH", default="vhostni-alerts.jsonl",
                     help="append-only JSON-lines alert log (default %(default)s)")
    run.add_argument("--alert-log-max-bytes", type=int, default=0, metavar="N",
                     help="rotate the alert log when it would grow past N bytes (default: never)")
    run.add_argument("--alert-log-keep", type=int, default=5, metavar="N",
                     help="rotated alert logs to keep (default %(default)s)")
    run.add_argument("--syslog", nargs="?", const="/dev/log", metavar="SOCKET",
                     help="also send every alert to syslog (default socket /dev/log)")
    adm = run.add_argument_group("admin plane (QMP)")
    adm.add_argument("--admin", action="append", default=[], metavar="unix:PATH|tcp:HOST:PORT",
                     help="serve QMP there (repeatable); TCP requires --tls-cert/--tls-key/--tls-ca")
    adm.add_argument("--admin-allow-uid", action="append", type=_uid_arg, default=[], metavar="UID",
                     help="a user (uid or name) allowed on unix admin sockets besides root and the "
                          "daemon's own uid (repeatable)")
    adm.add_argument("--tls-cert", metavar="FILE", help="the daemon's TLS certificate (PEM)")
    adm.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    adm.add_argument("--tls-ca", metavar="FILE",
                     help="CA certificates admin clients' certificates must chain to (PEM)")
    adm.add_argument("--state-dir", metavar="DIR",
                     help="keep NIs added and policies set over QMP in DIR; restored at start")
    run.add_argument("--metrics", metavar="tcp:HOST:PORT",
                     help="serve Prometheus metrics over HTTP there (plain HTTP, read-only: bind "
                          "it to loopback or a management network)")
    run.add_argument("-v", "--verbose", action="store_true")
    from .replay import add_arguments as add_replay_arguments
    add_replay_arguments(sub.add_parser(
        "replay", help="run an NI's policy and scanners over a capture file (offline)"))
    images = sub.add_parser("images", help="the guest images vhostni.testing boots (kernel + initramfs)")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    from .images import add_arguments as add_images_arguments
    add_images_arguments(images_sub.add_parser(
        "build", help="build the guest kernel and initramfs from Debian packages (cached, reproducible)",
        description="Build the test guest's kernel and busybox initramfs from Debian packages, with "
                    "vhostni's guest programs (worm, dnsd, minimail) and your own --add files and --hook "
                    "scripts.  Nothing is installed on the host; an up-to-date build does nothing."))
    from .signatures.config import add_arguments as add_rules_arguments
    add_rules_arguments(sub.add_parser(
        "rules", help="Suricata-syntax signature rules: `rules check FILE...` lists what cannot be enforced"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from .service import ConfigError, expand_config
    try:
        argv = expand_config(list(sys.argv[1:] if argv is None else argv), parser,
                             parser.run_parser)
    except ConfigError as exc:
        print(f"vhostni run: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s vhostni %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "run":
        if not args.ni and not args.uplink and not args.admin and not args.state_dir:
            print("vhostni run: give at least one --ni NAME=SOCKET", file=sys.stderr)
            return 2
        tls_given = [args.tls_cert, args.tls_key, args.tls_ca]
        if any(tls_given) and not all(tls_given):
            print("vhostni run: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
            return 2
        from .daemon import Daemon
        from .policy import PolicyError
        admin = None
        nis, policies, runtime = args.ni, dict(args.policy), []
        try:
            state = None
            if args.state_dir:
                from .admin import StateDir
                state = StateDir(args.state_dir)
                nis, policies, runtime = state.merge(nis, policies)
            d = Daemon(nis, args.uplink, poll=args.poll, offloads=args.offloads == "on",
                       stats_file=args.stats_file, policies=policies, alert_log=args.alert_log,
                       socket_group=args.socket_group, state_dir=args.state_dir)
        except (OSError, ValueError) as exc:
            print(f"vhostni run: {exc}", file=sys.stderr)
            return 1
        try:
            from .qemu import parse_qmp_spec
            for name, spec in args.qemu_qmp:
                if name not in d.nis:
                    raise ValueError(f"--qemu-qmp for unknown NI {name!r}")
                d.attach_qemu(name, *parse_qmp_spec(spec))
        except ValueError as exc:
            print(f"vhostni run: {exc}", file=sys.stderr)
            d.close()
            return 1
        d.kernel.alerts.max_bytes = max(0, args.alert_log_max_bytes)
        d.kernel.alerts.keep = max(0, args.alert_log_keep)
        sink = metrics = None
        try:
            if args.metrics:
                from .metrics import MetricsServer
                metrics = MetricsServer(d, args.metrics)
            if args.syslog:
                from .admin.alerts import SyslogSink
                sink = SyslogSink(args.syslog)
                d.kernel.alerts.listeners.append(sink)
                d.housekeepers.append(sink.flush)
            if args.admin or state:
                from .admin import AdminServer, TLSFiles
                tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
                admin = AdminServer(d, args.admin, allow_uids=args.admin_allow_uid, tls=tls,
                                    state=state, runtime_nis=runtime)
        except (OSError, ValueError, PolicyError) as exc:
            print(f"vhostni run: {exc}", file=sys.stderr)
            if metrics:
                metrics.close()
            d.close()
            return 1
        try:
            d.run()
        finally:
            if admin:
                admin.close()
            if metrics:
                metrics.close()
            print(json.dumps(d.stats(), indent=1), file=sys.stderr)
            d.close()
            if sink:
                sink.close()
                logging.getLogger("vhostni").info(
                    "syslog: %d alerts sent, %d dropped, %d not sent", sink.sent, sink.dropped,
                    len(sink.backlog))
        return 0
    if args.command == "replay":
        from .replay import main as replay_main
        return replay_main(args)
    if args.command == "images":
        from .images import run_build
        return run_build(args)
    if args.command == "rules":
        from .signatures.config import main as rules_main
        return rules_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
