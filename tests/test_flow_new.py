"""Subscriptions to flow-opening frames (``"flow": "new"``, csrc/policy.c vn_match_frame with
what csrc/flow.c computed for the frame): a flow's first frame is held, later ones pass
unheld once one left the NI that way; a cut opener leaves the flow unopened; what the flow
stage cannot place counts as opening (fail closed); and the rights check.

In-process: two sink ports of one switch (the guest's, with the policy and its live
subscriptions, and the network's), the kernel's part played by ``next_punt`` and
``release_held``.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from vhostni.fastpath import Switch
from vhostni.policy import PolicyError, parse_match, parse_policy

GMAC, NMAC = "02:00:00:00:0a:0a", "02:00:00:00:0b:0b"
GIP, NIP, NIP2 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
GIP6, NIP6 = "fd00::1", "fd00::2"

UDP_NEW = {"direction": "from_guest", "proto": "udp", "flow": "new"}


class Net:
    """The guest's NI (sink port 0) with frame subscriptions ``subs`` [(match dict, contain)],
    and the network (sink port 1)."""

    def __init__(self, subs, **ni):
        self.sw = Switch()
        self.guest = self.sw.add_sink_port()
        self.net = self.sw.add_sink_port()
        self.sw.set_clock(1_700_000_000 * 10**9)
        doc = {"ni": dict({"mac": GMAC, "addresses": [f"{GIP}/32", f"{GIP6}/128"]}, **ni)}
        self.policy = parse_policy(doc)
        self.guest.set_policy(self.policy.compile([(parse_match("t", m), c) for m, c in subs]))

    def _through(self, port, frame, to) -> bool:
        port.inject_from(bytes(frame))
        return any(p == to.index for p, _ in self.sw.sink_frames())

    def out(self, frame) -> bool:
        """The guest sends ``frame``: True if it reached the network at once."""
        return self._through(self.guest, frame, self.net)

    def into(self, frame) -> bool:
        return self._through(self.net, frame, self.guest)

    def punts(self) -> list:
        got = []
        while (p := self.sw.next_punt()) is not None:
            got.append(p)
        return got

    def held(self) -> list:
        return [p for p in self.punts() if p.id]

    def decide(self, held, passed: bool) -> bool:
        """Releases ``held``; True if it reached the network."""
        self.sw.release_held(held.id, passed)
        return any(p == self.net.index for p, _ in self.sw.sink_frames())

    def stats(self) -> dict:
        return self.guest.stats()

    def close(self):
        self.sw.close()


@pytest.fixture
def net():
    made = []

    def make(subs=((UDP_NEW, True),), **ni):
        made.append(Net(subs, **ni))
        return made[-1]
    yield make
    for n in made:
        n.close()


def g4(l4, dst=NIP, **ip):
    return Ether(src=GMAC, dst=NMAC) / IP(src=GIP, dst=dst, **ip) / l4


def n4(l4, src=NIP, **ip):
    return Ether(src=NMAC, dst=GMAC) / IP(src=src, dst=GIP, **ip) / l4


def dgram(sport=40000, dport=443, dst=NIP, size=100):
    return g4(UDP(sport=sport, dport=dport) / Raw(b"q" * size), dst=dst)


# ---------------------------------------------------------------------------
# what is held
# ---------------------------------------------------------------------------

def test_only_the_first_datagram_of_a_udp_flow_is_held(net):
    n = net()
    assert not n.out(dgram())                 # the opener: held
    (h,) = n.held()
    assert n.decide(h, True)
    for _ in range(5):                        # the rest of the flow: not held
        assert n.out(dgram())
    assert n.held() == []
    assert n.stats()["held"] == 1


def test_a_new_flows_first_datagram_is_held(net):
    n = net()
    assert not n.out(dgram())
    n.decide(n.held()[0], True)
    assert not n.out(dgram(sport=40001))      # another source port: another flow
    assert not n.out(dgram(dst=NIP2))         # another destination
    assert len(n.held()) == 2


def test_a_cut_opener_leaves_the_flow_unopened(net):
    """A worm's datagram the scanner cut must not make its retries look established."""
    n = net()
    assert not n.out(dgram())
    assert not n.decide(n.held()[0], False)
    assert not n.out(dgram())                 # the retry: held again
    (h,) = n.held()
    assert n.decide(h, True)
    assert n.out(dgram())


def test_frames_sent_while_the_opener_waits_are_held_too(net):
    """No race: the second datagram does not slip out before the first is decided."""
    n = net()
    assert not n.out(dgram())
    assert not n.out(dgram())
    assert not n.out(dgram())
    a, b, c = n.held()
    for h in (a, b, c):
        assert not n.decide(h, False)
    assert not n.out(dgram())


def test_an_answer_does_not_open_the_guests_direction(net):
    """A frame to the guest on a flow whose opener was cut (a colluding remote guessing the
    port) does not let the guest's later datagrams out unheld."""
    n = net()
    assert not n.out(dgram())
    n.decide(n.held()[0], False)
    assert n.into(n4(UDP(sport=443, dport=40000)))
    assert not n.out(dgram())
    assert len(n.held()) == 1


def test_the_guests_first_reply_to_an_inbound_flow_is_held_once(net):
    n = net()
    assert n.into(n4(UDP(sport=5060, dport=5060)))
    assert not n.out(dgram(sport=5060, dport=5060))
    n.decide(n.held()[0], True)
    assert n.out(dgram(sport=5060, dport=5060))


def test_a_flow_that_expired_opens_again(net):
    n = net(flow_udp_idle_ms=1000)
    n.out(dgram())
    n.decide(n.held()[0], True)
    assert n.out(dgram())
    n.sw.set_clock(1_700_000_002 * 10**9)
    n.sw.tcp_housekeeping()
    assert not n.out(dgram())
    assert len(n.held()) == 1


def test_icmp_echo_by_identifier(net):
    n = net([({"direction": "from_guest", "proto": "icmp", "flow": "new"}, True),
             ({"direction": "from_guest", "proto": "icmpv6", "flow": "new"}, True)])
    assert not n.out(g4(ICMP(type=8, id=7, seq=1)))
    n.decide(n.held()[0], True)
    assert n.out(g4(ICMP(type=8, id=7, seq=2)))
    assert not n.out(g4(ICMP(type=8, id=8, seq=1)))   # another identifier: another flow
    v6 = Ether(src=GMAC, dst=NMAC) / IPv6(src=GIP6, dst=NIP6) / ICMPv6EchoRequest(id=3, seq=1)
    assert not n.out(v6)
    assert len(n.held()) == 2


def test_read_only_copies_still_come_for_every_frame_without_the_key(net):
    """The key narrows only its own subscription: a read-only one without it sees everything."""
    n = net([(UDP_NEW, True), ({"direction": "from_guest", "proto": "udp"}, False)])
    assert not n.out(dgram())
    (h,) = [p for p in n.punts() if p.id]
    n.decide(h, True)
    assert n.out(dgram())
    copies = n.punts()
    assert len(copies) == 1 and copies[0].id == 0 and copies[0].subs == 0b10


def test_the_subscription_turns_the_flow_stage_on(net):
    n = net()
    n.out(dgram())
    assert n.sw.flow_count(n.guest.index) == 1


# ---------------------------------------------------------------------------
# what the flow stage cannot place counts as opening a flow (fail closed)
# ---------------------------------------------------------------------------

def test_full_table_with_flows_over_pass_holds_every_untracked_frame(net):
    n = net(flows_max=1, flows_over="pass")
    n.out(dgram(sport=1))
    n.decide(n.held()[0], True)
    assert n.out(dgram(sport=1))
    for _ in range(3):                        # no room: untracked, so each is an opener
        assert not n.out(dgram(sport=2))
    assert len(n.held()) == 3
    assert n.stats()["flows_over"] == 3


def test_orphan_later_fragment_is_held(net):
    """A later fragment whose first was never seen has no ports: unattributed, so held (a
    subscription without a transport constraint sees it; one with udp drops it, as before)."""
    n = net([({"direction": "from_guest", "flow": "new"}, True)])
    frags = fragment(IP(src=GIP, dst=NIP, id=78) / UDP(sport=41000, dport=7) / Raw(b"z" * 3000),
                     fragsize=1200)
    for _ in range(2):
        assert not n.out(Ether(src=GMAC, dst=NMAC) / frags[1])
    assert len(n.held()) == 2
    assert n.stats()["flow_unattributed"] == 2


def test_fragments_of_an_opened_flow_pass_once_it_is_admitted(net):
    n = net()
    n.out(dgram())
    n.decide(n.held()[0], True)
    frags = fragment(IP(src=GIP, dst=NIP, id=79) / UDP(sport=40000, dport=443) / Raw(b"z" * 3000),
                     fragsize=1200)
    assert all(n.out(Ether(src=GMAC, dst=NMAC) / f) for f in frags)
    assert n.held() == []


def test_unparsed_frames_let_through_are_held(net):
    n = net([({"direction": "from_guest", "flow": "new"}, True)], unparsed="pass")
    cut = bytes(dgram())[:14 + 10]            # an IPv4 header cut short
    for _ in range(2):
        assert not n.out(cut)
    assert len(n.held()) == 2


def test_icmp_that_is_no_echo_is_held_every_time(net):
    n = net([({"direction": "from_guest", "proto": "icmp", "flow": "new"}, True)])
    for _ in range(2):
        assert not n.out(g4(ICMP(type=3, code=3)
                            / IP(src=NIP, dst=GIP) / UDP(sport=1, dport=2)))
    assert len(n.held()) == 2


def test_over_cap_pass_does_not_admit_the_flow(net):
    """A frame let through past the held-frames cap was never decided: its flow stays new."""
    n = net(held_frames_max=1, over_cap="pass")
    assert not n.out(dgram())                 # held (the cap's one)
    assert n.out(dgram())                     # over the cap: passed undecided
    (h,) = n.held()
    n.decide(h, False)
    assert not n.out(dgram())                 # still an opener
    assert len(n.held()) == 1


# ---------------------------------------------------------------------------
# grammar and rights
# ---------------------------------------------------------------------------

def test_key_is_validated_and_kept_out_of_rules():
    assert parse_match("m", {"flow": "new"}).flow_new
    with pytest.raises(PolicyError, match=r"m\.flow"):
        parse_match("m", {"flow": "old"})
    with pytest.raises(PolicyError, match=r"prevent\[0\]\.flow"):
        parse_policy({"prevent": [{"proto": "udp", "flow": "new"}]})
    with pytest.raises(PolicyError, match=r"quarantine\.allow\[0\]\.flow"):
        parse_policy({"quarantine": {"allow": [{"proto": "udp", "flow": "new"}]}})


def test_a_right_without_the_key_covers_a_subscription_with_it():
    wide = parse_match("r", {"direction": "from_guest", "proto": "udp"})
    narrow = parse_match("s", UDP_NEW)
    assert narrow.within(wide)
    assert not wide.within(narrow)            # the reverse is refused
    assert narrow.within(narrow)


def test_the_admin_plane_shows_the_key_of_a_right():
    from vhostni.admin.commands import match_to_dict
    m = parse_match("r", UDP_NEW)
    assert match_to_dict(m) == UDP_NEW
    assert parse_match("r", match_to_dict(m)) == m
