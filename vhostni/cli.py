"""Command line: ``vhostni run --ni NAME=SOCKET [--ni ...] [--uplink tap:IFNAME]``."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostni", description="Self-securing network interfaces for VMs")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve NIs in the foreground")
    run.add_argument("--ni", action="append", type=_ni_arg, default=[], metavar="NAME=SOCKET",
                     help="an NI: a vhost-user server socket QEMU connects to (repeatable)")
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
    run.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s vhostni %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "run":
        if not args.ni and not args.uplink:
            print("vhostni run: give at least one --ni NAME=SOCKET", file=sys.stderr)
            return 2
        from .daemon import Daemon
        try:
            d = Daemon(args.ni, args.uplink, poll=args.poll, offloads=args.offloads == "on",
                       stats_file=args.stats_file, policies=dict(args.policy),
                       alert_log=args.alert_log)
        except (OSError, ValueError) as exc:
            print(f"vhostni run: {exc}", file=sys.stderr)
            return 1
        try:
            d.run()
        finally:
            print(json.dumps(d.stats(), indent=1), file=sys.stderr)
            d.close()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
