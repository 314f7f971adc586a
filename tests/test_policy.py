"""Policy files (vhostni/policy.py): loading, validation errors that name the key, the
rights subset check ``Match.within`` and, as a property, that ``within`` agrees with the
C matcher: if A.within(B), every frame the fast path matches with A it matches with B.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nikit import SCANNERS, arp, eth, ipv4, ipv6, tcp, udp, unsendable_configs
from vhostni._fastpath import ffi, lib
from vhostni.fastpath import Switch
from vhostni.policy import (
    DIR_FROM, DIR_TO, Match, Policy, PolicyError, load_policy, parse_match, parse_policy,
)
from vhostni.scanner import wire

NULL = os.path.join(SCANNERS, "decider.py")

TOML = f"""
comment = "everything a policy can say"
[ni]
mac = "02:00:00:00:0a:0a"
addresses = ["10.0.0.1/32", "fd00::1/128"]
anti_spoof = true
hold_timeout_ms = 250
default_decision = "pass"
held_frames_max = 100
held_bytes_max = 1048576
over_cap = "pass"
unparsed = "pass"
ipv6_router = true

[[prevent]]
direction = "from_guest"
proto = "tcp"
dport = "6660-6669"
tcp_flags = "syn,!ack"

[[prevent]]
ethertype = "0x88b5"
terms = [{{offset = 14, value = "de:ad", mask = "ff f0"}}]

[[scanner]]
name = "dec"
program = "{NULL}"
args = ["--x"]
config = {{subscribe = []}}
memory_mb = 64
cpu_seconds = 60
open_files = 16
max_timeouts = 5
messages_per_second = 1000
alerts_per_second = 2.5

[[scanner.allow]]
direction = "to_guest"
proto = "udp"
src = "10.0.0.0/8"
sport = [53, 53]
contain = true

[[scanner.inject]]
name = "rst"
frame = "{'ff' * 14}"
"""


def _load(tmp_path, text: str, ext: str):
    p = tmp_path / f"p.{ext}"
    p.write_text(text)
    return load_policy(str(p))


def test_toml_and_json_load_the_same_policy(tmp_path):
    import tomllib
    t = _load(tmp_path, TOML, "toml")
    j = _load(tmp_path, json.dumps(tomllib.loads(TOML)), "json")
    for p in (t, j):
        assert p.mac == bytes.fromhex("020000000a0a")
        assert [str(a) for a in p.addresses] == ["10.0.0.1/32", "fd00::1/128"]
        assert (p.hold_timeout, p.default_pass, p.over_cap_pass) == (0.25, True, True)
        assert (p.held_frames_max, p.held_bytes_max) == (100, 1 << 20)
        assert p.unparsed_pass and p.ipv6_router
        r0, r1 = p.prevent
        assert (r0.dirs, r0.proto, r0.dport, r0.flags_mask, r0.flags_value) == (DIR_FROM, 6, (6660, 6669), 0x12, 0x02)
        assert r1.ethertype == 0x88B5 and r1.terms == ((14, b"\xde\xad", b"\xff\xf0"),)
        (s,) = p.scanners
        assert s.argv[-2:] == [os.path.join(SCANNERS, "decider.py"), "--x"]
        assert (s.memory_mb, s.cpu_seconds, s.open_files, s.max_timeouts) == (64, 60, 16, 5)
        assert (s.messages_per_second, s.alerts_per_second) == (1000, 2.5)
        (right,) = s.rights
        assert right.contain and right.match.dirs == DIR_TO and right.match.sport == (53, 53)
        assert s.injections == [("rst", b"\xff" * 14)]
    assert t.prevent == j.prevent and t.scanners[0].rights == j.scanners[0].rights
    t.compile()            # and the fast path takes it


def test_relative_program_paths_resolve_against_the_policy_file(tmp_path):
    prog = tmp_path / "scan.py"
    prog.write_text("pass\n")
    p = _load(tmp_path, '[[scanner]]\nname = "s"\nprogram = "scan.py"\n', "toml")
    assert p.scanners[0].argv == [sys.executable, str(prog)]
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "__main__.py").write_text("pass\n")
    p = _load(tmp_path, '[[scanner]]\nname = "s"\nprogram = "pkg"\n', "toml")
    assert p.scanners[0].argv == [sys.executable, str(d)]


def test_shipped_scanners_by_name(tmp_path):
    """``program = "vhostni:NAME"`` names a scanner vhostni ships, wherever the policy file is; a plain
    relative path still resolves against the policy's directory, even when it looks like a name."""
    from vhostni import resources
    root = resources.data_root() / "scanners"
    p = _load(tmp_path, '[[scanner]]\nname = "c"\nprogram = "vhostni:codered"\n', "toml")
    assert p.scanners[0].argv == [sys.executable, str(root / "codered")]
    p = parse_policy({"scanner": [{"name": "n", "program": "vhostni:null"}]})
    assert p.scanners[0].argv == [sys.executable, str(root / "null.py")]
    (tmp_path / "codered.py").write_text("pass\n")       # a local file called like a shipped scanner
    p = _load(tmp_path, '[[scanner]]\nname = "c"\nprogram = "codered.py"\n', "toml")
    assert p.scanners[0].argv == [sys.executable, str(tmp_path / "codered.py")]
    for bad in ("vhostni:nope", "vhostni:../codered", "vhostni:", "vhostni:/etc/passwd"):
        with pytest.raises(PolicyError, match=r"scanner\[0\]\.program.*vhostni:codered"):
            parse_policy({"scanner": [{"name": "s", "program": bad}]})
    # the example policies name ../scanners/...: that works from the checkout and from an install
    assert load_policy(str(resources.path("examples/codered.toml"))).scanners[0].argv[1] == str(root / "codered")


def test_defaults_fail_closed():
    p = parse_policy({})
    assert (p.anti_spoof, p.default_pass, p.over_cap_pass, p.hold_timeout) == (True, False, False, 1.0)
    assert (p.unparsed_pass, p.ipv6_router) == (False, False)
    assert p.mac is None and p.prevent == [] and p.scanners == []


S = {"name": "s", "program": NULL}


@pytest.mark.parametrize("doc, where", [
    ([], ""),
    ({"bogus": 1}, "bogus"),
    ({"ni": []}, "ni"),
    ({"ni": {"bogus": 1}}, "ni.bogus"),
    ({"ni": {"mac": "02:00:00:00:0a"}}, "ni.mac"),
    ({"ni": {"mac": "01:00:00:00:00:01"}}, "ni.mac"),
    ({"ni": {"mac": 5}}, "ni.mac"),
    ({"ni": {"addresses": ["10.0.0.300"]}}, "ni.addresses[0]"),
    ({"ni": {"addresses": ["10.0.0.1", "x"]}}, "ni.addresses[1]"),
    ({"ni": {"addresses": "10.0.0.1"}}, "ni.addresses"),
    ({"ni": {"addresses": [f"10.0.0.{i}" for i in range(33)]}}, "ni.addresses"),
    ({"ni": {"anti_spoof": "yes"}}, "ni.anti_spoof"),
    ({"ni": {"hold_timeout_ms": 0}}, "ni.hold_timeout_ms"),
    ({"ni": {"hold_timeout_ms": True}}, "ni.hold_timeout_ms"),
    ({"ni": {"hold_timeout_ms": 1.5}}, "ni.hold_timeout_ms"),
    ({"ni": {"default_decision": "drop"}}, "ni.default_decision"),
    ({"ni": {"over_cap": "cut"}}, "ni.over_cap"),
    ({"ni": {"held_frames_max": 0}}, "ni"),
    ({"ni": {"held_frames_max": 2**32}}, "ni.held_frames_max"),
    ({"ni": {"held_bytes_max": 2**64}}, "ni.held_bytes_max"),
    ({"prevent": {"proto": "tcp"}}, "prevent"),
    ({"prevent": [{"proto": "tcp"}] * 257}, "prevent"),
    ({"prevent": ["tcp"]}, "prevent[0]"),
    ({"prevent": [{"port": 80}]}, "prevent[0].port"),
    ({"prevent": [{"direction": "in"}]}, "prevent[0].direction"),
    ({"prevent": [{"direction": ["from_guest"]}]}, "prevent[0].direction"),
    ({"prevent": [{"ethertype": "ip"}]}, "prevent[0].ethertype"),
    ({"prevent": [{"ethertype": 0x10000}]}, "prevent[0].ethertype"),
    ({"prevent": [{"proto": "tcpp"}]}, "prevent[0].proto"),
    ({"prevent": [{"proto": 256}]}, "prevent[0].proto"),
    ({"prevent": [{"proto": -1}]}, "prevent[0].proto"),
    ({"prevent": [{"proto": True}]}, "prevent[0].proto"),
    ({"prevent": [{"src": "10.0.0.0/33"}]}, "prevent[0].src"),
    ({"prevent": [{"dst": "10.0.0.256/8"}]}, "prevent[0].dst"),
    ({"prevent": [{"dst": ["10.0.0.0/8"]}]}, "prevent[0].dst"),
    ({"prevent": [{"src": "10.0.0.0/8", "dst": "fd00::/8"}]}, "prevent[0]"),
    ({"prevent": [{"proto": "tcp", "dport": 70000}]}, "prevent[0].dport"),
    ({"prevent": [{"proto": "tcp", "dport": -1}]}, "prevent[0].dport"),
    ({"prevent": [{"proto": "tcp", "sport": "90-80"}]}, "prevent[0].sport"),
    ({"prevent": [{"proto": "tcp", "sport": "http"}]}, "prevent[0].sport"),
    ({"prevent": [{"proto": "tcp", "sport": [1, 2, 3]}]}, "prevent[0].sport"),
    ({"prevent": [{"proto": "tcp", "sport": True}]}, "prevent[0].sport"),
    ({"prevent": [{"proto": "tcp", "sport": 1.0}]}, "prevent[0].sport"),
    ({"prevent": [{"dport": 80}]}, "prevent[0]"),                       # ports need a protocol
    ({"prevent": [{"proto": "icmp", "dport": 80}]}, "prevent[0]"),
    ({"prevent": [{"tcp_flags": "syn,fun"}]}, "prevent[0].tcp_flags"),
    ({"prevent": [{"tcp_flags": ["syn"]}]}, "prevent[0].tcp_flags"),
    ({"prevent": [{"proto": "udp", "tcp_flags": "syn"}]}, "prevent[0]"),   # would never match
    ({"prevent": [{"terms": {"offset": 0, "value": "00"}}]}, "prevent[0].terms"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "00"}] * 9}]}, "prevent[0].terms"),
    ({"prevent": [{"terms": [{"value": "00"}]}]}, "prevent[0].terms[0]"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "00", "x": 1}]}]}, "prevent[0].terms[0]"),
    ({"prevent": [{"terms": [{"offset": -1, "value": "00"}]}]}, "prevent[0].terms[0].offset"),
    ({"prevent": [{"terms": [{"offset": 65520, "value": "00"}]}]}, "prevent[0].terms[0].offset"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "0g"}]}]}, "prevent[0].terms[0].value"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "abc"}]}]}, "prevent[0].terms[0].value"),
    ({"prevent": [{"terms": [{"offset": 0, "value": ""}]}]}, "prevent[0].terms[0].value"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "00" * 17}]}]}, "prevent[0].terms[0].value"),
    ({"prevent": [{"terms": [{"offset": 0, "value": 0}]}]}, "prevent[0].terms[0].value"),
    ({"prevent": [{"terms": [{"offset": 0, "value": "0000", "mask": "ff"}]}]}, "prevent[0].terms[0].mask"),
    ({"scanner": {}}, "scanner"),
    ({"scanner": ["s"]}, "scanner[0]"),
    ({"scanner": [{"program": NULL}]}, "scanner[0].name"),
    ({"scanner": [{"name": "s"}]}, "scanner[0].program"),
    ({"scanner": [{"name": "s", "program": "/nonexistent/scan.py"}]}, "scanner[0].program"),
    ({"scanner": [{"name": "s", "program": "/etc"}]}, "scanner[0].program"),
    ({"scanner": [dict(S, name="bad name")]}, "scanner[0].name"),
    ({"scanner": [S, S]}, "scanner[1].name"),
    ({"scanner": [dict(S, bogus=1)]}, "scanner[0].bogus"),
    ({"scanner": [dict(S, args="x")]}, "scanner[0].args"),
    ({"scanner": [dict(S, args=[1])]}, "scanner[0].args"),
    ({"scanner": [dict(S, config=[])]}, "scanner[0].config"),
    ({"scanner": [dict(S, allow={})]}, "scanner[0].allow"),
    ({"scanner": [dict(S, allow=[{"contain": 1}])]}, "scanner[0].allow[0].contain"),
    ({"scanner": [dict(S, allow=[{"proto": "tcp", "dport": 99999}])]}, "scanner[0].allow[0].dport"),
    ({"scanner": [dict(S, inject=[{"frame": "zz"}])]}, "scanner[0].inject[0].frame"),
    ({"scanner": [dict(S, inject=[{"frame": "ff" * 13}])]}, "scanner[0].inject[0].frame"),
    ({"scanner": [dict(S, inject=[{"name": "x"}])]}, "scanner[0].inject[0]"),
    ({"scanner": [dict(S, inject=[{"name": "x", "frame": "ff" * 14, "stream": "x"}])]}, "scanner[0].inject[0]"),
    ({"scanner": [dict(S, inject=[{"name": "x", "stream": "x", "stream_hex": "78"}])]}, "scanner[0].inject[0]"),
    ({"scanner": [dict(S, inject=[{"name": "x", "stream": "x", "bogus": 1}])]}, "scanner[0].inject[0]"),
    ({"scanner": [dict(S, inject=["x"])]}, "scanner[0].inject[0]"),
    ({"scanner": [dict(S, inject=[{"stream": "x"}])]}, "scanner[0].inject[0].name"),
    ({"scanner": [dict(S, inject=[{"name": 5, "stream": "x"}])]}, "scanner[0].inject[0].name"),
    ({"scanner": [dict(S, inject=[{"name": "a b", "stream": "x"}])]}, "scanner[0].inject[0].name"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": "x"}, {"name": "r", "stream_hex": "00"}])]},
     "scanner[0].inject[1].name"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": ""}])]}, "scanner[0].inject[0].stream"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": "x" * 65537}])]}, "scanner[0].inject[0].stream"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": "\u00e9" * 32769}])]}, "scanner[0].inject[0].stream"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": b"x"}])]}, "scanner[0].inject[0].stream"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream": ["x"]}])]}, "scanner[0].inject[0].stream"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream_hex": "zz"}])]}, "scanner[0].inject[0].stream_hex"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream_hex": ""}])]}, "scanner[0].inject[0].stream_hex"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream_hex": "00" * 65537}])]},
     "scanner[0].inject[0].stream_hex"),
    ({"scanner": [dict(S, inject=[{"name": "r", "stream_hex": 0}])]}, "scanner[0].inject[0].stream_hex"),
    ({"ni": {"tcp_resend_max": 0}}, "ni.tcp_resend_max"),
    ({"ni": {"tcp_resend_max": 21}}, "ni.tcp_resend_max"),
    ({"scanner": [dict(S, memory_mb=8)]}, "scanner[0].memory_mb"),
    ({"scanner": [dict(S, cpu_seconds=0)]}, "scanner[0].cpu_seconds"),
    ({"scanner": [dict(S, open_files=4)]}, "scanner[0].open_files"),
    ({"scanner": [dict(S, max_timeouts=0)]}, "scanner[0].max_timeouts"),
    ({"scanner": [dict(S, messages_per_second=0)]}, "scanner[0].messages_per_second"),
    ({"scanner": [dict(S, alerts_per_second=0)]}, "scanner[0].alerts_per_second"),
    ({"scanner": [dict(S, alerts_per_second=True)]}, "scanner[0].alerts_per_second"),
])
def test_bad_policies_name_the_key(doc, where):
    with pytest.raises(PolicyError) as exc:
        parse_policy(doc)
    assert exc.value.where == where
    assert str(exc.value).startswith(f"{where}: " if where else "")


def test_a_program_that_is_not_executable(tmp_path):
    prog = tmp_path / "scan"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o644)
    with pytest.raises(PolicyError, match="not executable") as exc:
        parse_policy({"scanner": [{"name": "s", "program": str(prog)}]})
    assert exc.value.where == "scanner[0].program"
    prog.chmod(0o755)
    assert parse_policy({"scanner": [{"name": "s", "program": str(prog)}]}).scanners[0].argv == [str(prog)]


@pytest.mark.parametrize("text, ext, what", [
    ("[ni\nmac = 1", "toml", "cannot parse"),
    ("ni = {", "toml", "cannot parse"),
    ("{", "json", "cannot parse"),
    ("\xff", "toml", "cannot parse"),
    ("[" * 100000, "json", "cannot parse"),
    ("x = " + "[" * 100000, "toml", "cannot parse"),
    ('{"ni": {"hold_timeout_ms": "x"}}', "json", "ni.hold_timeout_ms"),
], ids=["toml-syntax", "toml-unclosed", "json-syntax", "not-utf8", "json-deep", "toml-deep", "json-bad-value"])
def test_bad_files(tmp_path, text, ext, what):
    p = tmp_path / f"p.{ext}"
    p.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
    with pytest.raises(PolicyError) as exc:
        load_policy(str(p))
    assert what in str(exc.value) and str(p) in str(exc.value)


def test_stream_injections(tmp_path):
    """[[scanner.inject]] stream / stream_hex: bytes for a contain scanner's streams, numbered
    apart from the frame injections of the same array, text taken exactly as TOML gives it."""
    p = _load(tmp_path, f"""
[[scanner]]
name = "s"
program = "{NULL}"
[[scanner.inject]]
name = "rst"
frame = "{'ff' * 14}"
[[scanner.inject]]
name = "replacement"
stream = "Content-Type: text/plain\\r\\n\\r\\nRemoved: caf\u00e9."
[[scanner.inject]]
name = "raw.bytes-1"
stream_hex = "00 ff:0d0a"
[[scanner.inject]]
name = "rst"
stream = "same name as the frame: another namespace"
[[scanner.inject]]
name = "max"
stream_hex = "{'41' * 65536}"
""", "toml")
    (s,) = p.scanners
    assert s.injections == [("rst", b"\xff" * 14)]
    assert [n for n, _ in s.stream_injections] == ["replacement", "raw.bytes-1", "rst", "max"]
    assert s.stream_injections[0][1] == "Content-Type: text/plain\r\n\r\nRemoved: café.".encode()
    assert s.stream_injections[1][1] == b"\x00\xff\r\n" and len(s.stream_injections[3][1]) == 65536
    assert parse_policy({"scanner": [S]}).scanners[0].stream_injections == []
    if hasattr(lib, "VN_TCP_INJECT_MAX"):       # the fast path takes every injection allowed
        from vhostni.policy import STREAM_INJECT_MAX
        assert STREAM_INJECT_MAX == lib.VN_TCP_INJECT_MAX


def test_compiled_policy_is_accepted_by_the_fast_path():
    """Every limit the parser allows, the C side takes (VN_MAX_RULES etc. agree)."""
    p = parse_policy({"ni": {"addresses": [f"10.0.{i}.1/24" for i in range(32)],
                             "held_frames_max": 2**32 - 1, "held_bytes_max": 2**63 - 1},
                      "prevent": [{"terms": [{"offset": 65519, "value": "00" * 16}] * 8}] * 256})
    with Switch() as sw:
        port = sw.add_vhost_port()
        port.set_policy(p.compile([(parse_match("m", {"proto": "tcp"}), True)] * 64))


# ---------------------------------------------------------------------------
# Match.within: is a request at least as narrow as a right?
# ---------------------------------------------------------------------------

def m(**d) -> Match:
    return parse_match("m", d)


@pytest.mark.parametrize("narrow, wide, inside", [
    ({}, {}, True),
    ({"proto": "tcp"}, {}, True),
    ({}, {"proto": "tcp"}, False),
    # directions
    ({"direction": "from_guest"}, {"direction": "both"}, True),
    ({"direction": "from_guest"}, {}, True),
    ({"direction": "both"}, {"direction": "from_guest"}, False),
    ({}, {"direction": "to_guest"}, False),
    ({"direction": "to_guest"}, {"direction": "from_guest"}, False),
    # ethertype and protocol
    ({"ethertype": "ipv4", "proto": "tcp"}, {"ethertype": "ipv4"}, True),
    ({"proto": "tcp"}, {"ethertype": "ipv4"}, False),       # tcp over IPv6 too
    ({"proto": "udp"}, {"proto": "tcp"}, False),
    # prefixes
    ({"src": "10.1.2.0/24"}, {"src": "10.0.0.0/8"}, True),
    ({"src": "10.1.2.3"}, {"src": "10.1.2.3/32"}, True),
    ({"src": "10.0.0.0/8"}, {"src": "10.1.0.0/16"}, False),
    ({"src": "11.0.0.0/8"}, {"src": "10.0.0.0/8"}, False),
    ({}, {"src": "0.0.0.0/0"}, False),                      # non-IP frames too
    ({"src": "fd00::1"}, {"src": "0.0.0.0/0"}, False),
    ({"src": "fd00::1"}, {"src": "fd00::/8"}, True),
    ({"dst": "10.1.0.0/16"}, {"src": "10.0.0.0/8"}, False),  # src is not dst
    ({"src": "10.1.0.0/16", "dst": "10.2.0.0/16"}, {"dst": "10.0.0.0/8"}, True),
    # ports
    ({"proto": "tcp", "dport": 80}, {"proto": "tcp", "dport": "1-1024"}, True),
    ({"proto": "tcp", "dport": "80-2000"}, {"proto": "tcp", "dport": "1-1024"}, False),
    ({"proto": "tcp"}, {"proto": "tcp", "dport": "0-65535"}, True),
    ({"proto": "tcp"}, {"proto": "tcp", "dport": "0-65534"}, False),
    ({"proto": "tcp", "sport": 80}, {"proto": "tcp", "dport": 80}, False),
    ({"proto": "udp", "dport": 53}, {"proto": "tcp", "dport": 53}, False),
    # tcp flags
    ({"tcp_flags": "syn,!ack"}, {"tcp_flags": "syn"}, True),
    ({"tcp_flags": "syn"}, {"tcp_flags": "syn,!ack"}, False),
    ({"tcp_flags": "!ack"}, {"tcp_flags": "syn"}, False),
    ({"tcp_flags": "syn,ack"}, {"tcp_flags": "syn,!ack"}, False),
    ({"tcp_flags": "syn", "dport": 80}, {"proto": "tcp"}, True),
    ({"proto": "tcp"}, {"tcp_flags": ""}, True),             # no flags listed: no constraint
    # raw terms
    ({"terms": [{"offset": 12, "value": "0800"}]}, {"terms": [{"offset": 12, "value": "08"}]}, True),
    ({"terms": [{"offset": 12, "value": "08"}]}, {"terms": [{"offset": 12, "value": "0800"}]}, False),
    ({"terms": [{"offset": 12, "value": "0800"}]}, {"terms": [{"offset": 13, "value": "00"}]}, True),
    ({"terms": [{"offset": 12, "value": "0800"}]}, {"terms": [{"offset": 12, "value": "0806"}]}, False),
    ({"terms": [{"offset": 12, "value": "0800"}]},
     {"terms": [{"offset": 12, "value": "0800", "mask": "0f00"}]}, True),
    ({"terms": [{"offset": 12, "value": "0800", "mask": "0f00"}]}, {"terms": [{"offset": 12, "value": "08"}]},
     False),                                                 # the request leaves bits open
    ({"terms": [{"offset": 0, "value": "02"}, {"offset": 12, "value": "86dd"}]},
     {"terms": [{"offset": 12, "value": "86dd"}, {"offset": 0, "value": "02", "mask": "03"}]}, True),
    ({"terms": [{"offset": 12, "value": "08"}, {"offset": 13, "value": "00"}]},
     {"terms": [{"offset": 12, "value": "0800"}]}, False),   # sufficient test: one term must cover it
    ({}, {"terms": [{"offset": 0, "value": "00", "mask": "00"}]}, False),
    # a right's term needs the frame to be that long, even where its mask is zero
    ({"terms": [{"offset": 0, "value": "02"}]}, {"terms": [{"offset": 20, "value": "00", "mask": "00"}]}, False),
    ({"terms": [{"offset": 0, "value": "02"}]},
     {"terms": [{"offset": 0, "value": "0200000000", "mask": "ff00000000"}]}, False),
])
def test_within(narrow, wide, inside):
    assert m(**narrow).within(m(**wide)) is inside


# ---------------------------------------------------------------------------
# The property, against the C matcher
# ---------------------------------------------------------------------------

class Matcher:
    """Asks the fast path which of two matches a frame matches, in each direction: NI 0
    (the sender) holds them as read subscriptions (from_guest), NI 1 too (to_guest, the
    frame being flooded to it)."""

    def __init__(self):
        self.sw = Switch()
        self.ports = [self.sw.add_vhost_port(), self.sw.add_vhost_port()]
        self.punt = ffi.new("struct vn_punt *")

    def set(self, matches: list[Match]) -> None:
        c = Policy().compile([(x, False) for x in matches])
        for p in self.ports:
            p.set_policy(c)

    def matched(self, frame: bytes) -> dict[int, int]:
        """{direction: bitmask of the matches that matched}."""
        self.ports[0].inject_from(frame)
        out = {DIR_FROM: 0, DIR_TO: 0}
        while lib.vn_punt_next(self.sw._sw, self.punt):
            assert self.punt.id == 0
            out[self.punt.dir] |= self.punt.subs
        return out

    def close(self):
        self.sw.close()


@pytest.fixture(scope="module")
def matcher():
    mt = Matcher()
    yield mt
    mt.close()


SRC = bytes.fromhex("020000000a0a")
V4 = ["10.1.2.3", "10.1.2.4", "10.1.3.1", "10.2.0.1", "192.0.2.1", "0.0.0.0"]
V6 = ["fd00::1", "fd00::2", "fd00:0:0:1::1", "fe80::1", "::"]
PORTS = [0, 1, 53, 80, 1023, 1024, 65535]
PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.1.2.0/31", "0.0.0.0/0",
            "fd00::/8", "fd00::/64", "fd00::1/128", "::/0"]
FLAGS = ["fin", "syn", "rst", "psh", "ack", "urg"]


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["v4", "v4", "v6", "arp", "raw", "vlan"]))
    proto = draw(st.sampled_from([6, 6, 17, 1, 132, 58]))
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    flags = draw(st.integers(0, 255))
    payload = draw(st.binary(max_size=6))
    l4 = tcp(sport, dport, flags, payload) if proto == 6 else \
        udp(sport, dport, payload) if proto in (17, 132) else b"\x08\0\0\0" + payload
    dst = draw(st.sampled_from([b"\xff" * 6, bytes.fromhex("020000000b0b")]))
    if kind in ("v4", "vlan"):
        frag = draw(st.sampled_from([0, 0, 0, 185]))
        ip = ipv4(draw(st.sampled_from(V4)), draw(st.sampled_from(V4)), proto, l4, frag_offset=frag)
        f = eth(dst, SRC, 0x0800, ip, vlan=7 if kind == "vlan" else None)
    elif kind == "v6":
        f = eth(dst, SRC, 0x86DD, ipv6(draw(st.sampled_from(V6)), draw(st.sampled_from(V6)), proto, l4))
    elif kind == "arp":
        f = eth(dst, SRC, 0x0806, arp(1, SRC, draw(st.sampled_from(V4)), b"\0" * 6, draw(st.sampled_from(V4))))
    else:
        f = eth(dst, SRC, 0x88B5, draw(st.binary(min_size=0, max_size=40)))
    if draw(st.integers(0, 4)) == 0:                          # truncated anywhere after Ethernet
        f = f[:draw(st.integers(14, len(f)))]
    return f


@st.composite
def match_docs(draw, sample: bytes):
    d = {}
    if draw(st.booleans()):
        d["direction"] = draw(st.sampled_from(["from_guest", "to_guest", "both"]))
    if draw(st.integers(0, 3)) == 0:
        d["ethertype"] = draw(st.sampled_from(["ipv4", "ipv6", "arp", "0x88b5"]))
    if draw(st.booleans()):
        d["proto"] = draw(st.sampled_from(["tcp", "udp", "icmp", "sctp", 58]))
    for key in ("src", "dst"):
        if draw(st.integers(0, 2)) == 0:
            d[key] = draw(st.sampled_from(PREFIXES))
    if d.get("src") and d.get("dst") and (":" in d["src"]) != (":" in d["dst"]):
        del d["dst"]
    if d.get("proto") in ("tcp", "udp", "sctp"):
        for key in ("sport", "dport"):
            if draw(st.integers(0, 2)) == 0:
                lo, hi = sorted(draw(st.lists(st.sampled_from(PORTS), min_size=2, max_size=2)))
                d[key] = [lo, hi]
    if d.get("proto") in ("tcp", None) and draw(st.integers(0, 2)) == 0:
        names = draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True))
        d["tcp_flags"] = ",".join(("!" if draw(st.booleans()) else "") + n for n in names)
    nterms = draw(st.sampled_from([0, 0, 1, 2]))
    terms = []
    for _ in range(nterms):
        off = draw(st.integers(0, len(sample) + 2) | st.integers(max(0, len(sample) - 6), len(sample)))
        n = draw(st.integers(1, 4))
        val = bytes(sample[off:off + n]).ljust(n, b"\0")
        val = bytes(b ^ draw(st.sampled_from([0, 0, 0, 0, 0, 1, 0x80])) for b in val)
        mask = bytes(draw(st.sampled_from([0xFF, 0xFF, 0xF0, 0x0F, 0x00])) for _ in range(n))
        terms.append({"offset": off, "value": val.hex(), "mask": mask.hex()})
    if terms:
        d["terms"] = terms
    return d


@st.composite
def loosened(draw, d: dict):
    """A match at least as wide as ``d`` (usually): keys dropped, ranges and prefixes
    widened, flags and term bytes let go."""
    w = {}
    for key, v in d.items():
        if draw(st.integers(0, 3)) == 0 and key != "proto":
            continue
        if key == "direction":
            v = draw(st.sampled_from([v, "both"]))
        elif key in ("src", "dst"):
            import ipaddress
            net = ipaddress.ip_network(v)
            v = str(net.supernet(new_prefix=draw(st.integers(0, net.prefixlen))))
        elif key in ("sport", "dport"):
            v = [draw(st.integers(0, v[0])), draw(st.integers(v[1], 65535))]
        elif key == "tcp_flags":
            parts = [p for p in v.split(",") if p and draw(st.booleans())]
            v = ",".join(parts)
        elif key == "terms":
            out = []
            for t in v:
                if draw(st.integers(0, 3)) == 0:
                    continue
                val, mask = bytes.fromhex(t["value"]), bytes.fromhex(t["mask"])
                a = draw(st.integers(0, len(val) - 1))
                b = draw(st.integers(a + 1, len(val)))
                mask = bytes(x & draw(st.sampled_from([0xFF, 0xF0, 0x00])) for x in mask[a:b])
                val = val[a:b]
                if draw(st.integers(0, 3)) == 0 and len(val) < 16:    # don't-care bytes past its end
                    extra = draw(st.integers(1, 16 - len(val)))
                    val, mask = val + b"\x55" * extra, mask + b"\0" * extra
                out.append({"offset": t["offset"] + a, "value": val.hex(), "mask": mask.hex()})
            if not out:
                continue
            v = out
        w[key] = v
    if "proto" in w and draw(st.integers(0, 3)) == 0 and not {"sport", "dport", "tcp_flags"} & set(w):
        del w["proto"]
    return w


def _parse(d) -> Match:
    try:
        return parse_match("m", d)
    except PolicyError:
        assume(False)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(data=st.data())
@example(data=None)
def test_within_agrees_with_the_c_matcher(matcher, data):
    if data is None:       # the regression hypothesis found: a zero-mask term past a short frame
        fs = [eth(b"\xff" * 6, SRC, 0x88B5, b"")]
        a, b = m(terms=[{"offset": 0, "value": "ff"}]), m(terms=[{"offset": 20, "value": "00", "mask": "00"}])
    else:
        fs = data.draw(st.lists(frames(), min_size=1, max_size=6))
        da = data.draw(match_docs(fs[0]))
        db = data.draw(loosened(da)) if data.draw(st.integers(0, 4)) else data.draw(match_docs(fs[-1]))
        a, b = _parse(da), _parse(db)
    if not a.within(b):
        return
    matcher.set([a, b])
    for f in fs:
        for direction, bits in matcher.matched(f).items():
            if bits & 1:
                assert bits & 2, f"A matched but B did not ({direction=}): {a} within {b}, frame {f.hex()}"


def test_the_matcher_harness_sees_matches(matcher):
    """The property above is only worth something if the harness reports matches."""
    f = eth(b"\xff" * 6, SRC, 0x0800, ipv4("10.1.2.3", "10.2.0.1", 6, tcp(1024, 80, 0x02)))
    matcher.set([m(direction="from_guest", proto="tcp", dport=80), m(src="10.1.2.0/24"),
                 m(direction="to_guest", tcp_flags="syn,!ack"), m(proto="udp")])
    assert matcher.matched(f) == {DIR_FROM: 0b0011, DIR_TO: 0b0110}


# ---------------------------------------------------------------------------
# What the scanner wire carries (the hello: config, injection names) is validated
# ---------------------------------------------------------------------------

def _with_config(config) -> dict:
    return {"scanner": [{"name": "s" * 32, "program": NULL, "config": config}]}


@pytest.mark.parametrize("kind", ["oversize", "deep"])
def test_a_config_the_wire_cannot_carry_does_not_validate(kind, tmp_path):
    doc = _with_config(unsendable_configs()[kind])
    with pytest.raises(PolicyError, match=r"scanner\[0\]\.config: .*hello") as info:
        parse_policy(doc)
    assert ("exceeds" if kind == "oversize" else "nested deeper") in str(info.value)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match="hello"):
        load_policy(str(path))


def test_the_largest_and_deepest_config_the_wire_carries_validates():
    # as deep as a hello can carry it, and as long as fits with the longest NI name
    deep = unsendable_configs()["deep"]["d"]
    assert parse_policy(_with_config(deep)).scanners[0].config == deep
    n = wire.MAX_JSON - len(wire.encode_hello("s" * 32, "n" * 32, {"b": ""}, [], [], 65536, 65536)) + 1
    assert parse_policy(_with_config({"b": "x" * n})).scanners[0].config == {"b": "x" * n}
    with pytest.raises(PolicyError, match="exceeds"):
        parse_policy(_with_config({"b": "x" * (n + 1)}))
    # long injection names count too
    doc = _with_config({"b": "x" * (n - 100)})
    doc["scanner"][0]["inject"] = [{"name": "i" * 200, "frame": "00" * 14}]
    with pytest.raises(PolicyError, match="exceeds"):
        parse_policy(doc)


def test_a_document_nested_beyond_any_use_is_refused_before_it_is_walked():
    doc = _with_config({})
    doc["comment"] = json.loads("[" * 900 + "]" * 900)
    with pytest.raises(PolicyError, match="nested deeper than"):
        parse_policy(doc)


def test_non_json_values_in_a_config_do_not_validate(tmp_path):
    """NaN (JSON policy files as Python reads them) and TOML dates have no strict-JSON form."""
    js = tmp_path / "p.json"
    js.write_text('{"scanner": [{"name": "s", "program": "%s", "config": {"r": NaN}}]}' % NULL)
    with pytest.raises(PolicyError, match="not strict JSON"):
        load_policy(str(js))
    tm = tmp_path / "p.toml"
    tm.write_text(f'[[scanner]]\nname = "s"\nprogram = "{NULL}"\nconfig = {{ when = 2026-01-01 }}\n')
    with pytest.raises(PolicyError, match="not strict JSON"):
        load_policy(str(tm))
