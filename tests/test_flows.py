"""The flow stage (csrc/flow.c): per NI, one entry per 5-tuple (both directions), TCP
handshake states, ICMP errors attributed to the flow they quote, idle expiry on the switch's
clock, a bounded table with its exception policy, and a bounded event queue.

The harness is in-process: two sink ports of one switch, the guest's (with the policy) and
the network's, on a clock the test hands in (vn_switch_set_clock), the kernel's side played
by draining ``Switch.next_flow_event`` directly.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6ND_NS, IPv6)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from vhostni.fastpath import Switch
from vhostni.policy import FLOW_EVENT_KINDS, PolicyError, parse_policy

GMAC, NMAC = "02:00:00:00:0a:0a", "02:00:00:00:0b:0b"
GIP, NIP, ROUTER = "10.0.0.1", "10.0.0.2", "10.0.0.254"
GIP6, NIP6 = "fd00::1", "fd00::2"
T0 = 1_700_000_000 * 10**9
S = 10**9


def ni(**keys) -> dict:
    return {"ni": dict({"mac": GMAC, "addresses": [f"{GIP}/32", f"{GIP6}/128"], "flows": True},
                       **keys)}


class Net:
    """The guest's NI (sink port 0, with the policy) and the network (sink port 1), on a
    clock handed in."""

    def __init__(self, doc: dict, events=FLOW_EVENT_KINDS):
        self.sw = Switch()
        self.guest = self.sw.add_sink_port()
        self.net = self.sw.add_sink_port()
        self.now = T0
        self.sw.set_clock(self.now)
        self.policy = parse_policy(doc)
        self.guest.set_policy(self.policy.compile(flow_events=frozenset(events) if events else None))
        self.events: list = []

    def _through(self, port, frame, to) -> bool:
        port.inject_from(bytes(frame))
        got = [f for p, f in self.sw.sink_frames() if p == to.index]
        self.drain()
        return bool(got)

    def out(self, frame) -> bool:
        """The guest sends ``frame``: True if it reached the network."""
        return self._through(self.guest, frame, self.net)

    def into(self, frame) -> bool:
        return self._through(self.net, frame, self.guest)

    def advance(self, seconds: float) -> None:
        """Time passes on the switch's clock; the housekeeping tick runs."""
        self.now += int(seconds * S)
        self.sw.set_clock(self.now)
        self.sw.tcp_housekeeping()
        self.drain()

    def drain(self) -> list:
        new = []
        while (ev := self.sw.next_flow_event()) is not None:
            new.append(ev)
        self.events += new
        return new

    def kinds(self) -> list:
        return [(e.kind, e.change or e.reason) for e in self.events]

    def stats(self) -> dict:
        return self.guest.stats()

    def flows(self) -> int:
        return self.sw.flow_count(self.guest.index)

    def close(self):
        self.sw.close()


@pytest.fixture
def net():
    made = []

    def make(doc=None, **kw):
        made.append(Net(doc or ni(), **kw))
        return made[-1]
    yield make
    for n in made:
        n.close()


def g4(l4, src=GIP, dst=NIP, **ip):
    return Ether(src=GMAC, dst=NMAC) / IP(src=src, dst=dst, **ip) / l4


def n4(l4, src=NIP, dst=GIP, **ip):
    return Ether(src=NMAC, dst=GMAC) / IP(src=src, dst=dst, **ip) / l4


def g6(l4, src=GIP6, dst=NIP6):
    return Ether(src=GMAC, dst=NMAC) / IPv6(src=src, dst=dst) / l4


def n6(l4, src=NIP6, dst=GIP6):
    return Ether(src=NMAC, dst=GMAC) / IPv6(src=src, dst=dst) / l4


def syn(sport=40000, dport=80, seq=1000):
    return g4(TCP(sport=sport, dport=dport, flags="S", seq=seq))


# ---------------------------------------------------------------------------
# TCP handshakes
# ---------------------------------------------------------------------------

def test_answered_handshake_then_fin(net):
    n = net()
    assert n.out(syn())
    assert n.into(n4(TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001)))
    assert n.out(g4(TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)))
    assert n.kinds() == [("open", ""), ("state", "synack"), ("state", "established")]
    op = n.events[0]
    assert op.initiator == 1 and op.proto == 6 and op.family == 4
    assert op.guest_addr == bytes([10, 0, 0, 1]) and op.remote_addr == bytes([10, 0, 0, 2])
    assert (op.guest_port, op.remote_port) == (40000, 80)
    assert "syn" in op.state
    est = n.events[-1]
    assert est.packets == (2, 1) and est.bytes == (80, 40)
    assert {"syn", "synack", "established", "answered"} <= set(est.state)
    n.out(g4(TCP(sport=40000, dport=80, flags="FA", seq=1001, ack=5001)))
    n.into(n4(TCP(sport=80, dport=40000, flags="FA", seq=5001, ack=1002)))
    n.advance(2.9)
    assert n.kinds()[-1] == ("state", "established")       # lingers after both FINs
    n.advance(0.2)
    close = n.events[-1]
    assert (close.kind, close.reason) == ("close", "fin")
    assert close.packets == (3, 2)
    assert close.start_ns == T0 and close.time_ns == T0 + int(3.1 * S)
    st = n.stats()
    assert st["flows_opened"] == 1 and st["flows_closed"] == 1 and st["flows_active"] == 0
    assert n.flows() == 0


def test_inbound_handshake_initiated_by_the_remote(net):
    n = net()
    n.into(n4(TCP(sport=50000, dport=22, flags="S", seq=1)))
    n.out(g4(TCP(sport=22, dport=50000, flags="SA", seq=9, ack=2)))
    n.into(n4(TCP(sport=50000, dport=22, flags="A", seq=2, ack=10)))
    assert n.kinds() == [("open", ""), ("state", "synack"), ("state", "established")]
    assert n.events[0].initiator == 2
    assert (n.events[0].guest_port, n.events[0].remote_port) == (22, 50000)


def test_refused_handshake_is_reset(net):
    n = net()
    n.out(syn(dport=23))
    n.into(n4(TCP(sport=23, dport=40000, flags="RA", seq=0, ack=1001)))
    assert n.kinds() == [("open", ""), ("state", "reset")]
    n.advance(3.1)
    assert n.kinds()[-1] == ("close", "reset")
    assert "synack" not in n.events[-1].state


def test_unanswered_syn_reported_once_whatever_the_retransmissions(net):
    n = net()
    n.out(syn())
    n.advance(1)
    n.out(syn())               # the same SYN again: same flow, its deadline runs from the first
    n.advance(1)
    n.out(syn())
    assert n.flows() == 1
    n.advance(0.9)
    assert n.kinds() == [("open", "")]
    n.advance(0.2)
    assert n.kinds() == [("open", ""), ("state", "unanswered")]
    assert n.events[-1].packets == (3, 0)
    n.advance(3.1)
    assert n.kinds()[-1] == ("close", "unanswered")
    assert n.stats()["flows_active"] == 0


def test_synack_never_acknowledged_is_incomplete(net):
    n = net()
    n.out(syn())
    n.into(n4(TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001)))
    n.advance(3.1)
    assert n.kinds() == [("open", ""), ("state", "synack"), ("state", "incomplete")]


def test_established_flow_expires_idle_on_the_tcp_timeout(net):
    n = net(ni(flow_tcp_idle_ms=10_000))
    n.out(syn())
    n.into(n4(TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001)))
    n.out(g4(TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)))
    n.advance(9)
    n.out(g4(TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=5001) / Raw(b"x" * 10)))
    n.advance(9)               # renewed by the data: not idle yet
    assert n.kinds()[-1] == ("state", "established")
    n.advance(1.1)
    assert n.kinds()[-1] == ("close", "idle")
    assert n.events[-1].bytes == (40 + 40 + 50, 40)


def test_ipv6_handshake(net):
    n = net()
    n.out(g6(TCP(sport=40000, dport=443, flags="S", seq=1)))
    n.into(n6(TCP(sport=443, dport=40000, flags="SA", seq=7, ack=2)))
    n.out(g6(TCP(sport=40000, dport=443, flags="A", seq=2, ack=8)))
    assert n.kinds() == [("open", ""), ("state", "synack"), ("state", "established")]
    ev = n.events[-1]
    assert ev.family == 6 and len(ev.guest_addr) == 16 and ev.bytes == (120, 60)


def test_midstream_tcp_is_tracked_without_a_handshake(net):
    n = net()
    n.out(g4(TCP(sport=40000, dport=80, flags="PA", seq=1) / Raw(b"hi")))
    assert n.kinds() == [("open", "")]
    assert "midstream" in n.events[0].state and "syn" not in n.events[0].state


# ---------------------------------------------------------------------------
# UDP, ICMP echo, ICMP errors
# ---------------------------------------------------------------------------

def test_udp_flow_answered_and_idle(net):
    n = net(ni(flow_udp_idle_ms=5000))
    n.out(g4(UDP(sport=5353, dport=53) / Raw(b"q" * 20)))
    n.into(n4(UDP(sport=53, dport=5353) / Raw(b"a" * 60)))
    n.into(n4(UDP(sport=53, dport=5353) / Raw(b"a" * 60)))
    assert n.kinds() == [("open", ""), ("state", "answered")]
    n.advance(5.1)
    close = n.events[-1]
    assert (close.kind, close.reason) == ("close", "idle")
    assert close.packets == (1, 2) and close.bytes == (48, 176)
    assert close.proto == 17


def test_icmp_echo_flows_by_identifier(net):
    n = net()
    n.out(g4(ICMP(type=8, id=7, seq=1)))
    n.into(n4(ICMP(type=0, id=7, seq=1)))
    n.out(g4(ICMP(type=8, id=7, seq=2)))
    n.out(g4(ICMP(type=8, id=8, seq=1)))
    assert n.flows() == 2
    assert n.kinds() == [("open", ""), ("state", "answered"), ("open", "")]
    assert (n.events[0].guest_port, n.events[0].remote_port) == (7, 7)
    assert n.events[2].guest_port == 8


def test_icmpv6_echo_and_neighbour_discovery(net):
    n = net()
    n.out(g6(ICMPv6EchoRequest(id=3)))
    n.into(n6(ICMPv6EchoReply(id=3)))
    n.into(Ether(src=NMAC, dst="33:33:ff:00:00:01") / IPv6(src=NIP6, dst="ff02::1:ff00:1", hlim=255)
           / ICMPv6ND_NS(tgt=GIP6))
    assert n.kinds() == [("open", ""), ("state", "answered")]
    assert n.events[0].family == 6 and n.events[0].proto == 58
    assert n.stats()["flow_unattributed"] == 1      # NDP is no flow


def test_port_unreachable_is_attributed_to_its_udp_flow(net):
    n = net()
    probe = g4(UDP(sport=41000, dport=1434) / Raw(b"\x04" * 30))
    n.out(probe)
    quoted = bytes(probe[IP])[:28]
    n.into(n4(ICMP(type=3, code=3) / Raw(quoted), src=ROUTER))
    assert n.kinds() == [("open", ""), ("state", "icmp_error")]
    ev = n.events[-1]
    assert (ev.icmp_type, ev.icmp_code, ev.icmp_from) == (3, 3, bytes([10, 0, 0, 254]))
    assert ev.packets == (1, 0)            # the error is an answer, not the flow's traffic
    assert n.flows() == 1
    st = n.stats()
    assert st["flow_icmp_errors"] == 1 and st["flow_icmp_unmatched"] == 0


def test_icmp_error_about_a_syn_and_about_an_echo(net):
    n = net()
    s = syn(dport=8080)
    n.out(s)
    n.into(n4(ICMP(type=3, code=1) / Raw(bytes(s[IP])[:28]), src=ROUTER))
    ping = g4(ICMP(type=8, id=99))
    n.out(ping)
    n.into(n4(ICMP(type=11, code=0) / Raw(bytes(ping[IP])[:28]), src=ROUTER))
    changes = [(e.kind, e.change, e.proto) for e in n.events if e.kind == "state"]
    assert changes == [("state", "icmp_error", 6), ("state", "icmp_error", 1)]


def test_icmpv6_unreachable_is_attributed(net):
    n = net()
    probe = g6(UDP(sport=41000, dport=9))
    n.out(probe)
    n.into(n6(ICMPv6DestUnreach(code=4) / Raw(bytes(probe[IPv6]))))
    assert n.kinds() == [("open", ""), ("state", "icmp_error")]
    assert n.events[-1].icmp_type == 1 and n.events[-1].icmp_code == 4


def test_the_guest_refusing_with_icmp_counts_for_the_inbound_flow(net):
    n = net()
    probe = n4(UDP(sport=5000, dport=69))
    n.into(probe)
    n.out(g4(ICMP(type=3, code=3) / Raw(bytes(probe[IP])[:28])))
    assert n.kinds() == [("open", ""), ("state", "icmp_error")]
    assert n.events[0].initiator == 2


def quoted_variants():
    """ICMP errors whose quoted header is cut, malformed, or names no flow."""
    good = bytes(IP(src=GIP, dst=NIP) / UDP(sport=41000, dport=1434))
    bad_ihl = bytes([0x4F]) + good[1:]                 # IHL 60 bytes, only 28 there
    v6_in_v4 = bytes([0x65]) + good[1:]
    later_frag = good[:6] + b"\x00\x10" + good[8:]     # offset 16: no ports in it
    other = bytes(IP(src=GIP, dst=NIP) / UDP(sport=41001, dport=1434))
    return {"empty": b"", "ip-cut": good[:12], "ports-cut": good[:22], "bad-ihl": bad_ihl,
            "wrong-version": v6_in_v4, "later-fragment": later_frag, "no-such-flow": other,
            "echo-reply-quoted": bytes(IP(src=GIP, dst=NIP) / ICMP(type=0, id=1))}


@pytest.mark.parametrize("name", list(quoted_variants()))
def test_hostile_quoted_headers_are_never_attributed(net, name):
    n = net()
    n.out(g4(UDP(sport=41000, dport=1434)))
    n.into(n4(ICMP(type=3, code=3) / Raw(quoted_variants()[name]), src=ROUTER))
    assert n.kinds() == [("open", "")]
    st = n.stats()
    assert st["flow_icmp_unmatched"] == 1 and st["flow_icmp_errors"] == 0


def test_quoted_ipv6_extension_headers_are_walked(net):
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
    n = net()
    probe = g6(IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=41000, dport=9))
    n.out(probe)
    n.into(n6(ICMPv6DestUnreach(code=4) / Raw(bytes(probe[IPv6]))))
    assert n.kinds() == [("open", ""), ("state", "icmp_error")]


def test_hostile_quoted_ipv6_extension_chain(net):
    n = net()
    n.out(g6(UDP(sport=41000, dport=9)))
    inner = bytes(IPv6(src=GIP6, dst=NIP6, nh=0)) + bytes([17, 200]) + b"\0" * 6   # hop-by-hop
    n.into(n6(ICMPv6DestUnreach(code=4) / Raw(inner)))                         # says 1608 bytes
    assert n.stats()["flow_icmp_unmatched"] == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(quote=st.binary(max_size=80), v6=st.booleans(), typ=st.sampled_from([3, 4, 5, 11, 12]))
def test_random_quotes_never_break_the_stage(net, quote, v6, typ):
    n = net()
    if v6:
        n.into(n6(ICMPv6DestUnreach(code=1) / Raw(quote)))
    else:
        n.into(n4(ICMP(type=typ, code=0) / Raw(quote), src=ROUTER))
    st_ = n.stats()
    assert st_["flow_icmp_errors"] + st_["flow_icmp_unmatched"] == 1
    assert n.flows() == 0


# ---------------------------------------------------------------------------
# fragments, VLAN tags
# ---------------------------------------------------------------------------

def test_fragments_count_for_the_flow_of_their_first(net):
    n = net()
    frags = fragment(IP(src=GIP, dst=NIP, id=77) / UDP(sport=41000, dport=7) / Raw(b"z" * 3000),
                     fragsize=1200)
    assert len(frags) == 3
    for f in frags:
        assert n.out(Ether(src=GMAC, dst=NMAC) / f)
    assert n.flows() == 1
    assert n.kinds() == [("open", "")]
    n.advance(61)
    assert n.events[-1].packets == (3, 0)


def test_orphan_fragment_is_unattributed(net):
    n = net()
    frags = fragment(IP(src=GIP, dst=NIP, id=78) / UDP(sport=41000, dport=7) / Raw(b"z" * 3000),
                     fragsize=1200)
    n.out(Ether(src=GMAC, dst=NMAC) / frags[1])
    assert n.flows() == 0 and n.stats()["flow_unattributed"] == 1


def test_a_later_tcp_fragment_does_not_replay_its_first_fragments_syn(net):
    n = net()
    frags = fragment(IP(src=GIP, dst=NIP, id=79) / TCP(sport=40000, dport=80, flags="S")
                     / Raw(b"s" * 2000), fragsize=1000)
    for f in frags:
        n.out(Ether(src=GMAC, dst=NMAC) / f)
    assert n.flows() == 1
    n.into(n4(TCP(sport=80, dport=40000, flags="RA")))
    assert n.kinds() == [("open", ""), ("state", "reset")]


def test_vlan_tagged_frames_are_the_same_flow(net):
    n = net()
    n.out(Ether(src=GMAC, dst=NMAC) / Dot1Q(vlan=5) / IP(src=GIP, dst=NIP) / UDP(sport=1, dport=2))
    n.out(g4(UDP(sport=1, dport=2)))
    assert n.flows() == 1 and n.events[0].packets == (1, 0)


# ---------------------------------------------------------------------------
# bounds
# ---------------------------------------------------------------------------

def test_full_table_drops_new_flows_fail_closed(net):
    n = net(ni(flows_max=2))
    assert n.out(syn(sport=1))
    assert n.out(syn(sport=2))
    assert not n.out(syn(sport=3))            # a third flow: dropped
    assert n.out(syn(sport=1))                # a known one goes on
    st = n.stats()
    assert st["flows_over"] == 1 and st["flows_active"] == 2
    n.advance(3.1)                            # unanswered,
    n.advance(3.1)                            # lingered, gone: room again
    assert n.out(syn(sport=3))


def test_full_table_passes_untracked_with_flows_over_pass(net):
    n = net(ni(flows_max=1, flows_over="pass"))
    assert n.out(syn(sport=1))
    assert n.out(syn(sport=2))
    assert n.stats()["flows_over"] == 1 and n.flows() == 1


def test_event_queue_overflow_is_counted_never_blocking(net):
    n = net(ni(flow_events_max=5))
    for sport in range(1, 11):
        n.guest.inject_from(bytes(syn(sport=sport)))       # no drain in between
    assert len([f for f in n.sw.sink_frames()]) == 10      # every frame went on
    assert len(n.drain()) == 5
    st = n.stats()
    assert st["flow_events"] == 5 and st["flow_events_dropped"] == 5 and st["flows_opened"] == 10


def test_the_punt_eventfd_stays_readable_while_flow_events_wait(net):
    import select
    n = net()
    n.guest.inject_from(bytes(syn()))
    assert n.sw.next_punt() is None                 # no frames: the kernel looks at the rest
    assert select.select([n.sw.punt_fd], [], [], 0)[0], "a flow event waits unannounced"
    assert n.sw.next_flow_event() is not None
    assert n.sw.next_punt() is None
    assert not select.select([n.sw.punt_fd], [], [], 0)[0]


def test_events_not_subscribed_are_not_queued(net):
    n = net(events=["close"])
    n.out(syn())
    n.into(n4(TCP(sport=80, dport=40000, flags="RA")))
    assert n.events == []
    n.advance(3.1)
    assert n.kinds() == [("close", "reset")]


def test_counters_only_without_subscribers(net):
    n = net(events=None)
    n.out(syn())
    assert n.events == [] and n.flows() == 1 and n.stats()["flow_events"] == 0


def test_stage_off_costs_nothing(net):
    n = net({"ni": {"mac": GMAC, "addresses": [f"{GIP}/32"]}}, events=None)
    n.out(syn())
    assert n.flows() == 0 and n.stats()["flows_opened"] == 0


def test_turning_the_stage_off_frees_the_table(net):
    n = net()
    n.out(syn())
    assert n.flows() == 1
    n.guest.set_policy(parse_policy({"ni": {"mac": GMAC}}).compile())
    n.advance(0.1)
    assert n.flows() == 0 and n.stats()["flows_active"] == 0


def test_events_of_a_removed_port_never_reach_its_successor(net):
    n = net()
    n.guest.inject_from(bytes(syn()))
    n.guest.remove()
    assert n.sw.next_flow_event() is None
    again = n.sw.add_sink_port()
    assert again.index == 0 and n.sw.flow_count(again.index) == 0


def test_summaries_of_long_flows(net):
    n = net(ni(flow_summary_ms=1000))
    for _ in range(5):
        n.out(g4(UDP(sport=1, dport=2)))
        n.advance(0.6)
    kinds = [e.kind for e in n.events]
    assert kinds == ["open", "summary", "summary"]
    assert n.events[1].packets == (3, 0)


def test_policy_keys_are_validated():
    for bad in ({"flows_over": "maybe"}, {"flows_max": 0}, {"flow_tcp_syn_ms": 5},
                {"flows": "yes"}, {"flow_events_max": 10**6}):
        with pytest.raises(PolicyError):
            parse_policy({"ni": bad})
    with pytest.raises(PolicyError):
        parse_policy({"scanner": [{"name": "s", "program": __file__,
                                   "allow": [{"flows": True, "contain": True}]}]})
    p = parse_policy({"scanner": [{"name": "s", "program": __file__,
                                   "allow": [{"flows": True, "proto": ["tcp", "udp"],
                                              "direction": "from_guest"}]}]})
    right = p.scanners[0].flow_rights[0]
    assert right.protos == {6, 17} and right.dirs == 1
