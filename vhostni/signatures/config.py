"""The policy's ``[signatures]`` section, and the checks ``vhostni rules check`` runs.

    [signatures]
    rules = ["web.rules"]                   # relative to the policy file
    vars = { HOME_NET = "[10.0.0.2]", HTTP_PORTS = "[80,8080]" }   # default HOME_NET: [ni] addresses
    on_unsupported = "fail"                 # or "skip": leave out rules that cannot be enforced exactly
    lookback = 8192                         # stream bytes kept per direction for confirmations
    stream_memcap = 268435456               # bytes of matcher state for all streams of the NI
    track_entries = 16384                   # threshold/detection_filter table slots (power of two)
    http_body_limit = 65536                 # request-body bytes HTTP rules see (0 .. 16 MiB)
    http_memcap = 67108864                  # bytes of HTTP reader state for all connections

Loading compiles every group with the C engine too, so a pattern Hyperscan or PCRE2 rejects is
found at load time (off the data path), with its file:line, like a parse problem.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .rules import MAX_RULES, Problem, RuleError, RuleSet, Vars, load_rule_files

KEYS = {"rules", "vars", "on_unsupported", "lookback", "stream_memcap", "track_entries", "http_body_limit",
        "http_memcap", "comment"}
MAX_FILES = 64


class SignatureConfigError(ValueError):
    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(message)


@dataclass
class SignatureConfig:
    files: list[str]
    vars: dict
    on_unsupported: str = "fail"
    lookback: int = 8192
    stream_memcap: int = 256 << 20
    track_entries: int = 16384
    http_body_limit: int = 65536
    http_memcap: int = 64 << 20
    ruleset: RuleSet = field(default_factory=RuleSet)
    stage: Any = None          # vhostni.signatures.stage.Stage: what the NI's data path runs

    @property
    def problems(self) -> list[Problem]:
        return self.ruleset.problems


def check_rules(paths: Sequence[str], vars: Vars, lookback: int = 8192) -> RuleSet:
    """Parses the files and compiles every rule with the engine; the RuleSet keeps only the
    rules both accept, and lists every other one as a problem."""
    return compile_rules(paths, vars, lookback)[0]


def compile_rules(paths: Sequence[str], vars: Vars, lookback: int = 8192,
                  stream_memcap: int = 256 << 20, track_entries: int = 16384,
                  http_body_limit: int = 65536, http_memcap: int = 64 << 20):
    """check_rules, and the compiled in-line stage (vhostni.signatures.stage.Stage) of the rules
    accepted (the rejected ones are in it too, left out of its databases: they never match)."""
    from .stage import Stage
    rs = load_rule_files(paths, vars)
    stage = Stage(rs.rules, lookback=lookback, stream_memcap=stream_memcap, track_entries=track_entries,
                  http_body_limit=http_body_limit, http_memcap=http_memcap)
    bad: set = set()
    for p in stage.problems:
        rs.problems.append(p)
        bad.update((r.file, r.line) for r in rs.rules if (r.file, r.line) == (p.file, p.line))
    rs.rules = [r for r in rs.rules if (r.file, r.line) not in bad]
    rs.problems.sort(key=lambda p: (p.file, p.line))
    return rs, stage


def parse_section(d: Any, base: str, home: Sequence) -> SignatureConfig:
    if not isinstance(d, dict):
        raise SignatureConfigError("signatures", "expected a table")
    extra = set(d) - KEYS
    if extra:
        raise SignatureConfigError(f"signatures.{sorted(extra)[0]}",
                                   f"unknown key (known: {', '.join(sorted(KEYS))})")
    files = d.get("rules")
    if not isinstance(files, list) or not files or len(files) > MAX_FILES or \
            not all(isinstance(f, str) and f for f in files):
        raise SignatureConfigError("signatures.rules", f"expected a list of 1..{MAX_FILES} rule file names")
    files = [f if os.path.isabs(f) else os.path.normpath(os.path.join(base, f)) for f in files]
    raw_vars = d.get("vars", {})
    if not isinstance(raw_vars, dict):
        raise SignatureConfigError("signatures.vars", "expected a table of NAME = \"value\"")
    try:
        vars = Vars(raw_vars, home=home)
    except RuleError as exc:
        raise SignatureConfigError("signatures.vars", str(exc)) from None
    cfg = SignatureConfig(files=files, vars=dict(raw_vars))
    cfg.on_unsupported = d.get("on_unsupported", "fail")
    if cfg.on_unsupported not in ("fail", "skip"):
        raise SignatureConfigError("signatures.on_unsupported",
                                   "expected 'fail' (refuse the policy) or 'skip' (leave those rules out)")
    for key, lo, hi in (("lookback", 0, 1 << 20), ("stream_memcap", 1 << 20, 1 << 40),
                        ("http_body_limit", 0, 1 << 24), ("http_memcap", 1 << 20, 1 << 40)):
        v = d.get(key, getattr(cfg, key))
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise SignatureConfigError(f"signatures.{key}", f"expected an integer {lo}..{hi}")
        setattr(cfg, key, v)
    v = d.get("track_entries", cfg.track_entries)
    if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= 1 << 20 or v & (v - 1):
        raise SignatureConfigError("signatures.track_entries", "expected a power of two 8..1048576")
    cfg.track_entries = v
    cfg.ruleset, cfg.stage = compile_rules(files, vars, cfg.lookback, cfg.stream_memcap, cfg.track_entries,
                                           cfg.http_body_limit, cfg.http_memcap)
    unreadable = [p for p in cfg.problems if not p.unsupported]
    if unreadable:
        raise SignatureConfigError("signatures.rules", str(unreadable[0]))
    if cfg.problems and cfg.on_unsupported == "fail":
        n = len(cfg.problems)
        raise SignatureConfigError(
            "signatures.rules", f"{n} rule{'s' if n > 1 else ''} cannot be enforced exactly "
            f"(on_unsupported = \"fail\"); first: {cfg.problems[0]}  (`vhostni rules check` lists all)")
    if cfg.ruleset.accepted > MAX_RULES:
        raise SignatureConfigError("signatures.rules", f"more than {MAX_RULES} rules")
    return cfg


def summary(rs: RuleSet) -> str:
    modes: dict[str, int] = {}
    for r in rs.rules:
        modes[r.mode] = modes.get(r.mode, 0) + 1
    parts = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
    return (f"{rs.accepted} rule{'s' if rs.accepted != 1 else ''} accepted"
            f"{f' ({parts})' if parts else ''}, {rs.skipped} skipped")


# ---------------------------------------------------------------- vhostni rules check

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="rules_command", required=True)
    c = sub.add_parser("check", help="parse and compile rule files; list every rule that cannot be "
                                     "enforced exactly, with file:line and why")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--var", "--vars", action="append", default=[], metavar="NAME=VALUE",
                   help="a rule variable, e.g. HOME_NET=[10.0.0.0/24] (repeatable)")
    c.add_argument("--home-net", action="append", default=[], metavar="CIDR",
                   help="the NI's own addresses, the default of $HOME_NET (repeatable; "
                        "default: the RFC 1918 and ULA ranges)")
    c.add_argument("--quiet", action="store_true", help="only the counts")
    c.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)


def main(args, out=None, err=None) -> int:
    import sys
    out = out or sys.stdout
    err = err or sys.stderr
    given: dict[str, str] = {}
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep:
            print(f"vhostni rules check: --var {v!r}: expected NAME=VALUE", file=err)
            return 2
        given[name.lstrip("$")] = value
    try:
        vars = Vars(given, home=args.home_net)
    except (RuleError, ValueError) as exc:
        print(f"vhostni rules check: {exc}", file=err)
        return 2
    rs = check_rules(args.files, vars)
    if not args.quiet:
        for p in rs.problems:
            print(p, file=out)
    print(summary(rs), file=out)
    if any(not p.unsupported for p in rs.problems):
        return 2
    return 1 if rs.problems else 0
