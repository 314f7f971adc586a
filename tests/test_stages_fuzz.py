"""Every C stage of an NI at once — header parser and anti-spoofing, the flow stage, packet and
stream signature rules, the TCP engine — fed frames a hostile tenant or network would craft:
VLAN stacks, IPv6 extension-header chains, fragments (overlapping, orphaned), truncations at any
byte, TCP with rule contents split anywhere.  Nothing may crash or hang the NI, and every frame
is either delivered or counted as dropped.  (Runs under ASan/UBSan too: SANITIZE_TESTS.)"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st

from nikit import time_limit, write_policy
from vhostni.policy import load_policy
from vhostni.replay import Replay, parse_mac

import scapy.all as scapy  # noqa: F401  (layers)
from scapy.all import (ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6DestUnreach, ICMPv6EchoRequest,
                       IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
                       Raw, fragment)

GUEST, PEER = "52:54:00:12:34:56", "52:54:00:00:00:01"
GIP, PIP = "10.0.0.5", "10.0.0.9"
GIP6, PIP6 = "fd00::5", "fd00::9"
RULES = r'''
drop tcp any any -> $HOME_NET any (msg:"jndi"; flow:to_server,established; content:"${jndi:"; nocase; sid:1;)
alert tcp $HOME_NET any -> any any (msg:"leak"; flow:to_client,established; content:"SECRET"; sid:2;)
drop udp any any -> $HOME_NET 1434 (msg:"slammer"; content:"|04|"; depth:1; sid:3;)
alert icmp any any -> any any (msg:"ping"; content:"PING"; sid:4;)
'''
PAYLOADS = [b"", b"${jndi:ldap://x}", b"SECRET", b"\x04" * 120, b"PING", b"GET / HTTP/1.0\r\n\r\n"]


def policy(tmp):
    rules = os.path.join(tmp, "f.rules")
    with open(rules, "w") as f:
        f.write(RULES)
    doc = (f'[ni]\nmac = "{GUEST}"\naddresses = ["{GIP}/32", "{GIP6}/128"]\nflows = true\nflows_max = 64\n'
           f'flow_events_max = 16\ntcp_flows_max = 16\n'
           f'[signatures]\nrules = ["{rules}"]\non_unsupported = "skip"\n')
    return load_policy(write_policy(os.path.join(tmp, "p.toml"), doc))


@st.composite
def frames(draw):
    to_guest = draw(st.booleans())
    v6 = draw(st.booleans())
    payload = draw(st.sampled_from(PAYLOADS)) + draw(st.binary(max_size=40))
    sport, dport = draw(st.sampled_from([80, 1434, 53, 4444])), draw(st.sampled_from([80, 1434, 53, 4444]))
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "icmp_err"]))
    if kind == "tcp":
        l4 = TCP(sport=sport, dport=dport, seq=draw(st.integers(0, 2**32 - 1)),
                 ack=draw(st.integers(0, 2**32 - 1)), flags=draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R"])),
                 urgptr=draw(st.integers(0, 65535))) / Raw(payload)
    elif kind == "udp":
        l4 = UDP(sport=sport, dport=dport) / Raw(payload)
    elif kind == "icmp":
        l4 = (ICMPv6EchoRequest(data=payload) if v6 else ICMP() / Raw(payload))
    else:
        inner = (IPv6(src=GIP6, dst=PIP6) if v6 else IP(src=GIP, dst=PIP)) / UDP(sport=sport, dport=dport)
        quote = bytes(inner)[:draw(st.integers(0, 60))]
        l4 = ICMPv6DestUnreach() / Raw(quote) if v6 else ICMP(type=3, code=3) / Raw(quote)
    src, dst = (PIP6, GIP6) if v6 else (PIP, GIP)
    if not to_guest:
        src, dst = dst, src
    if v6:
        ip = IPv6(src=src, dst=dst)
        for h in draw(st.lists(st.sampled_from(["hbh", "dst", "rt", "frag"]), max_size=5)):
            ip = ip / {"hbh": IPv6ExtHdrHopByHop(), "dst": IPv6ExtHdrDestOpt(),
                       "rt": IPv6ExtHdrRouting(), "frag": IPv6ExtHdrFragment(id=draw(st.integers(0, 3)))}[h]
        pkts = [ip / l4]
    else:
        ip = IP(src=src, dst=dst, id=draw(st.integers(0, 3)))
        pkts = [ip / l4]
        if draw(st.booleans()) and len(payload) > 16:
            pkts = fragment(pkts[0], fragsize=draw(st.sampled_from([8, 16, 24])))
            pkts = draw(st.permutations(pkts))
    eth_src, eth_dst = (PEER, GUEST) if to_guest else (GUEST, PEER)
    out = []
    for p in pkts:
        e = Ether(src=eth_src, dst=eth_dst)
        for tag in draw(st.lists(st.sampled_from(["q", "ad"]), max_size=3)):
            e = e / (Dot1Q(vlan=draw(st.integers(0, 4095))) if tag == "q" else Dot1AD(vlan=1))
        b = bytes(e / p)
        cut = draw(st.one_of(st.none(), st.integers(14, max(14, len(b)))))
        out.append(b if cut is None else b[:cut])
    return out


def test_every_stage_at_once_survives_crafted_frames(tmp_path):
    pol = policy(str(tmp_path))
    delivered = []
    with time_limit(240, "the fuzz run"), \
            Replay(parse_mac(GUEST), pol, on_frame=lambda ts, f, d: delivered.append(f), clock="capture") as r:
        r.start(at_ns=10**18)
        clock = [10**18]

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(frames(), min_size=1, max_size=6), st.integers(0, 70 * 10**9))
        def feed(batches, gap):
            for fs in batches:
                for f in fs:
                    clock[0] += gap // 8 + 1       # time passes: expiry and timers run too
                    r.feed(clock[0], f)

        feed()
        r.finish()
        s = r.summary()
        g = r.guest.stats()
    # every stage saw work: the parser refused some, flows opened, packet rules scanned, TCP ran
    assert g["flows_opened"] > 0 and g["sig_packets_scanned"] > 0 and g["tcp_flows_opened"] + g["tcp_no_flow"] > 0
    assert sum(v for k, v in g.items() if k.startswith("drop_unparsed_")) > 0
    fed = s["from_guest"] + s["to_guest"]
    # much was fed, some of it got through, and the NI forged no flood of its own (RSTs of
    # reject rules and killed connections may add a few frames)
    assert fed > 300 and 0 < len(delivered) <= fed * 2
